"""Shared test setup: hypothesis profiles, and the `no_hang` and `runner` fixtures.

- `ci` (the default): Hypothesis' usual 100 examples for a bare `@given`, no deadline
  (a busy 2-core runner makes per-example timings meaningless; tests/test_fuzz.py
  guards against hangs with its own alarm instead) and no "too slow" health check.
  The fuzz tests take a fraction of `max_examples`, sized so tests/test_fuzz.py stays
  under 45 s on 2 cores.
- `fuzz`: 20x the examples, for a long local run:
  `HYPOTHESIS_PROFILE=fuzz pytest tests/test_fuzz.py`.

Tests that pass their own `@settings(max_examples=...)` keep it under either profile.
"""

from __future__ import annotations

import os
import signal

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, settings

from fragment_llm.cli.common import FLAGS

CI_EXAMPLES = 100

settings.register_profile("ci", max_examples=CI_EXAMPLES, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("fuzz", parent=settings.get_profile("ci"),
                          max_examples=20 * CI_EXAMPLES)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def no_hang():
    """Fail, rather than hang the suite, if a refusal blocks (a FIFO opened for reading)."""
    def timeout(signum, frame):
        raise TimeoutError("blocked on a hostile input")

    previous = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def runner() -> CliRunner:
    """A CLI runner with the global flags reset (another test may have set --quiet)."""
    FLAGS.debug = FLAGS.quiet = False
    return CliRunner()


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module's tests (`pytestmark = pytest.mark.usefixtures(...)`):
    batch-1 steps of a tiny model are too small to split, and on a busy 2-core machine a
    second thread only waits for a core (up to 10x slower)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
