"""A training run: from a `TrainRequest` to a `TrainSummary`.

Owns setup (resume point, tokenizer, token shards, memory check, the `Trainer`), the
loop around it (when to log, evaluate, checkpoint and stop) and `metrics.jsonl`. One
step is fragment_llm/train/trainer.py's; device, DDP, lock and signals are runtime.py's.
It does not print: progress goes out through `on_event(TrainEvent)` (the kinds are in
fragment_llm/events.py), and `metrics.jsonl` is the record.
Exact resume: with the same settings, on CPU in fp32, a run resumed from a checkpoint
ends with the same weights, bit for bit, as one that never stopped. Everything the
next step depends on (weights, optimizer moments, data cursor, RNG states, step,
elapsed training time) is in the checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fragment_llm import __version__
from fragment_llm.checkpoint.layout import METRICS_FILE
from fragment_llm.checkpoint.provenance import (
    HINT_RESUME,
    checked_tokenizer,
    require,
    resume_links,
    tokens_links,
)
from fragment_llm.checkpoint.records import (
    CheckpointConfig,
    Provenance,
    TrainerState,
    model_config_sha256,
)
from fragment_llm.config import GivenSettings, ModelConfig, TrainConfig
from fragment_llm.data.shards import TokenShards
from fragment_llm.errors import (
    CheckpointError,
    ConfigError,
    DatasetError,
    TrainingError,
)
from fragment_llm.events import (
    CheckpointEvent,
    EvalEvent,
    EventFn,
    NoteEvent,
    PlanEvent,
    ProbeEvent,
    ProgressEvent,
    StepEvent,
)
from fragment_llm.model.size import (
    MemoryPlan,
    count_parameters,
    default_memory_limit,
    flops_per_token,
    plan_memory,
)
from fragment_llm.safety.files import atomic_write_text, make_dirs, translate_os_errors
from fragment_llm.safety.signals import uninterrupted
from fragment_llm.safety.workers import cap_workers, tokenizer_bytes
from fragment_llm.train.recipe import Pretraining, Recipe
from fragment_llm.train.resume import ResumedSettings, resumed_settings
from fragment_llm.train.runtime import (
    DistEnv,
    InterruptFlag,
    RunLock,
    agree,
    broadcast_text,
    init_distributed,
    raise_peer_failed,
    run_on_main,
    select_device,
    select_precision,
)
from fragment_llm.train.trainer import MAX_NONFINITE_IN_A_ROW, StepResult, Trainer

if TYPE_CHECKING:
    from fragment_llm.checkpoint.load import Checkpoint
    from fragment_llm.tokenizer.tokenizer import Tokenizer

# ------------------------------------------------------------------------ the request


@dataclass(frozen=True)
class TrainRequest:
    """Everything `train` needs, already validated by the config layer.

    On resume, `model` and `train` are checked against the checkpoint's recorded ones
    (fragment_llm/train/resume.py): `given` says which of their keys the user chose (None: a
    library caller chose every [train] value that is not None). `resumed` is filled in
    by `run_training` with the settings the run continues.
    """

    data: Path
    tokenizer: Path
    out: Path
    model: ModelConfig
    train: TrainConfig
    resume: bool = False
    tokens_dir: Path | None = None  # default: <data>/../tokens
    given: GivenSettings | None = None
    resumed: ResumedSettings | None = None
    init_from: Path | None = None  # start from this checkpoint's weights (pretraining)
    recipe: Recipe | None = None  # None: pretraining (train/recipe.py)


@dataclass(frozen=True)
class TrainSummary:
    """What a run did, for the CLI's summary table and `--json`."""

    out: Path
    steps: int
    tokens: int
    seconds: float
    final_train_loss: float | None
    val_loss: float | None
    val_bpb: float | None
    checkpoint: Path | None
    interrupted: bool
    parameters: int
    terminated: bool = False  # the interruption was a SIGTERM (exit 143, not 130)


# ----------------------------------------------------------------------- orchestration


def _effective_model_config(request: TrainRequest, vocab_size: int) -> ModelConfig:
    """The [model] config with the tokenizer's vocabulary, its only source: a vocab_size
    given in [model] must agree with it, or the run is refused naming both."""
    given = request.model.vocab_size
    if given is not None and given != vocab_size:
        came = request.given.model.get("vocab_size") if request.given else None
        raise ConfigError(f"model.vocab_size is {given} in {came.source if came else 'the request'}"
                          f", but the tokenizer {request.tokenizer} has {vocab_size} tokens",
                          hint="leave vocab_size out of [model]: it comes from the tokenizer")
    try:
        return ModelConfig.model_validate({**request.model.model_dump(), "vocab_size": vocab_size})
    except ValueError as exc:
        raise ConfigError(f"model config does not fit the tokenizer: {exc}") from None


def pretraining(request: TrainRequest) -> Pretraining:
    """The recipe of `fragment train`: the processed corpus, tokenized into a cache."""
    from fragment_llm.checkpoint.load import open_checkpoint

    init_from = open_checkpoint(request.init_from) if request.init_from is not None else None
    return Pretraining(request.data, request.tokenizer,
                       request.tokens_dir or request.data.parent / "tokens",
                       request.train.val_fraction, request.train.workers, init_from)


def prepare_shards(recipe: Recipe, env: DistEnv, vocab_size: int, on_event: EventFn,
                   device: torch.device) -> TokenShards:
    """Rank 0 builds the shards (or reuses the cache); every rank then opens and verifies."""
    folder, error = None, None
    if env.is_main:
        try:
            folder = recipe.build_shards(lambda phase, done, total: on_event(
                ProgressEvent(phase, done, total)))
        except BaseException as exc:  # Ctrl-C and SIGTERM too: the others wait for us
            if env.world == 1:
                raise
            error = exc
    if env.world > 1:
        with uninterrupted():  # two collectives: a signal must not split them
            text = broadcast_text(str(folder) if folder else None, device)
        folder = Path(text) if text else None
    if error is not None:
        raise error
    if folder is None:
        raise_peer_failed(env)
    return TokenShards.open(folder, vocab_size)


def check_memory(plan: MemoryPlan, limit: int) -> None:
    if plan.total > limit:
        raise ConfigError(
            f"estimated peak memory {plan.total / 2**20:,.0f} MiB exceeds the limit of "
            f"{limit / 2**20:,.0f} MiB (--max-memory)",
            hint="lower --batch-size (raise --grad-accum to keep tokens per step), use a "
                 "smaller --preset, or add --activation-checkpointing")


def run_training(request: TrainRequest, on_event: EventFn, dry_run: bool = False) -> TrainSummary:
    """Train (or resume) a GPT on the processed corpus; see the module docstring.

    Under torchrun, the process group this starts is destroyed on every way out
    (done, interrupted, refused, failed), so no rank leaves a peer waiting on it.
    """
    started_group = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    try:
        return _train(request, on_event, dry_run)
    finally:
        if started_group and torch.distributed.is_available() \
                and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _train(request: TrainRequest, on_event: EventFn, dry_run: bool) -> TrainSummary:
    from fragment_llm.tokenizer.tokenizer import Tokenizer

    env = DistEnv.from_environ()
    resume_from = _find_resume_point(request, env, on_event) if request.resume else None
    if resume_from is not None:  # the run's own settings, before anything uses them
        resumed = resumed_settings(resume_from, request.model, request.train, request.given)
        request = dataclasses.replace(request, model=resumed.model, train=resumed.train,
                                      resumed=resumed)
    device = select_device(request.train.device)
    precision = select_precision(request.train.precision, device)
    init_distributed(env, device)
    tokenizer = Tokenizer.load(request.tokenizer)
    request = _with_capped_workers(request, tokenizer.vocab_size, on_event)
    model_config = (request.model if resume_from
                    else _effective_model_config(request, tokenizer.vocab_size))
    if model_config.vocab_size != tokenizer.vocab_size:
        raise ConfigError(f"checkpoint vocab size {model_config.vocab_size} differs from the "
                          f"tokenizer's {tokenizer.vocab_size}")
    if resume_from is not None:  # refuse a changed tokenizer before tokenizing anything
        checked_tokenizer(resume_from)
        require(resume_links(resume_from, tokenizer), CheckpointError, HINT_RESUME)
    recipe = request.recipe or pretraining(request)
    recipe.check(model_config, tokenizer)
    # Planned from the config, before the shards are built or a tensor allocated.
    plan = plan_memory(model_config, request.train, precision, device.type,
                       trainable=recipe.trainable_parameters(model_config))
    check_memory(plan, request.train.max_memory or default_memory_limit(device))
    shards = prepare_shards(recipe, env, tokenizer.vocab_size, on_event, device)
    _check_shard_chain(request, tokenizer, shards, resume_from)
    if request.train.epochs is not None and resume_from is None:
        request = _steps_for_epochs(request, shards, model_config, env)
    torch.manual_seed(request.train.seed)  # the initial weights are part of the run
    model = recipe.build_model(model_config, device)
    trainer = Trainer(model, request.train, shards, device, precision, env)
    if resume_from is not None:
        _restore(trainer, recipe, resume_from)
        if request.resumed is not None and request.resumed.budget_extended:
            trainer.extend_budget(request.resumed.recorded)
    on_event(_plan_event(trainer, plan, device, precision))
    if dry_run:
        on_event(ProbeEvent(seconds_per_step=_probe(trainer)))
        return _summary(request, trainer, None, None, interrupted=False, seconds=0.0)
    if resume_from is not None:
        on_event(NoteEvent(f"resumed from {resume_from.path}"))
    with contextlib.ExitStack() as stack:
        interrupt = stack.enter_context(InterruptFlag())
        run_on_main(env, device, lambda: _open_run_folder(request.out, stack))
        loop = TrainLoop(request, trainer, tokenizer, model_config, on_event,
                         recipe, _carried_provenance(resume_from))
        return loop.run(interrupt)


def _carried_provenance(resume_from: Checkpoint | None) -> dict[str, str]:
    """What a run started from (`base_*` keys) stays in the provenance of every step it
    saves, resumed or not."""
    if resume_from is None:
        return {}
    return {key: value for key, value in resume_from.provenance.document().items()
            if key.startswith("base_") and isinstance(value, str)}


def _steps_for_epochs(request: TrainRequest, shards: TokenShards, model_config: ModelConfig,
                      env: DistEnv) -> TrainRequest:
    """`epochs` passes over the training blocks, as optimizer steps (at least one); the
    run records the steps, so a resume needs no shards to know its budget."""
    cfg = request.train
    blocks = shards.train.num_blocks(model_config.block_size)
    per_step = cfg.batch_size * cfg.grad_accum * env.world
    steps = max(1, math.ceil(float(cfg.epochs or 0) * blocks / per_step))
    return dataclasses.replace(request, train=cfg.model_copy(update={"max_steps": steps}))


def _open_run_folder(out: Path, stack: contextlib.ExitStack) -> None:
    from fragment_llm.checkpoint.layout import clean_stale_temporaries

    make_dirs(out, hint="choose another --out")
    stack.enter_context(RunLock(out))
    # Half-written or half-pruned step folders of a killed run: saving step N only
    # cleans up after step N, so a step this run never writes again would keep its
    # leftovers forever. Safe now that we hold the lock: no live trainer writes here.
    clean_stale_temporaries(out)


def _with_capped_workers(request: TrainRequest, vocab_size: int,
                         on_event: EventFn) -> TrainRequest:
    """`[train] workers` lowered to the cores and memory there are, with a note; the
    lowered value is what the run's config records."""
    cap = cap_workers(request.train.workers, tokenizer_bytes(vocab_size))
    if cap.note is None:
        return request
    on_event(NoteEvent(cap.note))
    return dataclasses.replace(request, train=request.train.model_copy(
        update={"workers": cap.count}))


def _check_shard_chain(request: TrainRequest, tokenizer: Tokenizer, shards: TokenShards,
                       resume_from: Checkpoint | None) -> None:
    """The same link checks as `fragment verify`: the shards were built from this
    tokenizer (their manifest is unedited), and a resumed run uses the shards it began on."""
    require(tokens_links(shards, tokenizer, str(request.tokenizer)), DatasetError,
            hint=f"delete {shards.folder}; `fragment train` rebuilds it from {request.data}")
    if resume_from is not None:
        require(resume_links(resume_from, tokenizer, shards), CheckpointError, HINT_RESUME)


def _plan_event(trainer: Trainer, plan: MemoryPlan, device: torch.device,
                precision: str) -> PlanEvent:
    return PlanEvent(
        parameters=count_parameters(trainer.model),
        non_embedding_parameters=count_parameters(trainer.model, exclude_embeddings=True),
        flops_per_token=flops_per_token(trainer.model.config), memory_bytes=plan.total,
        tokens_per_step=trainer.tokens_per_step, device=str(device), precision=precision,
        world_size=trainer.env.world, train_tokens=trainer.shards.manifest.train.tokens,
        val_tokens=trainer.shards.manifest.val.tokens, max_steps=trainer.config.max_steps,
        max_time_s=trainer.config.max_time_s, step=trainer.step, elapsed_s=trainer.elapsed)


def _probe(trainer: Trainer, steps: int = 2) -> float:
    """Seconds per optimizer step, measured after one warm-up step; state is discarded."""
    snapshot = trainer.stream.cursor
    trainer.train_step()
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    trainer.stream.cursor = snapshot
    return (time.perf_counter() - start) / steps


def _find_resume_point(request: TrainRequest, env: DistEnv,
                       on_event: EventFn) -> Checkpoint | None:
    from fragment_llm.checkpoint.load import latest_valid_checkpoint

    latest, damaged = latest_valid_checkpoint(request.out)
    for path, reason in damaged:
        on_event(NoteEvent(f"skipping damaged checkpoint {path}: {reason}"))
    if latest is None:
        on_event(NoteEvent(f"no checkpoint in {request.out}; starting from scratch"))
        return None
    return latest


def _restore(trainer: Trainer, recipe: Recipe, checkpoint: Checkpoint) -> None:
    recipe.restore(trainer.model, checkpoint)
    checkpoint.load_optimizer_into(trainer.optimizer)
    trainer.load_state_dict(checkpoint.trainer_state.document())
    from fragment_llm.checkpoint.rng import restore_rng_state

    restore_rng_state(checkpoint.trainer_state.rng)


def _summary(request: TrainRequest, trainer: Trainer, last: StepResult | None,
             evaluation: tuple[float, float] | None, *, interrupted: bool, seconds: float,
             checkpoint: Path | None = None, terminated: bool = False) -> TrainSummary:
    return TrainSummary(
        out=request.out, steps=trainer.step, tokens=trainer.step * trainer.tokens_per_step,
        seconds=seconds, final_train_loss=last.loss if last else None,
        val_loss=evaluation[0] if evaluation else None,
        val_bpb=evaluation[1] if evaluation else None, checkpoint=checkpoint,
        interrupted=interrupted, parameters=count_parameters(trainer.model),
        terminated=terminated)


class TrainLoop:
    """The loop around `Trainer`: when to log, evaluate, checkpoint and stop.

    Under torchrun every rank runs the same collectives in the same order on every way
    out: whether to stop is agreed before each step (`_should_stop`), a NaN stop follows
    from the loss averaged over ranks, and rank 0's writes end in an agreement
    (`run_on_main`, or a metrics failure held until the next `_should_stop`).
    """

    def __init__(self, request: TrainRequest, trainer: Trainer, tokenizer: Tokenizer,
                 model_config: ModelConfig, on_event: EventFn, recipe: Recipe,
                 carried_provenance: dict[str, str]) -> None:
        self.request, self.trainer, self.tokenizer = request, trainer, tokenizer
        self.model_config, self.on_event = model_config, on_event
        self.recipe, self.carried_provenance = recipe, carried_provenance
        self.failure: Exception | None = None  # rank 0's, until the ranks agree to stop
        self.metrics = MetricsLog(request.out / METRICS_FILE, trainer.env.is_main)
        self._hold_failure(lambda: self.metrics.truncate_after(trainer.step))
        self.evaluation: tuple[float, float] | None = None
        self.checkpoint: Path | None = None
        self.saved_step: int | None = None

    def _hold_failure(self, work: Callable[[], None]) -> None:
        """Run rank 0's `work`; with peers, keep its error for the next agreement."""
        try:
            work()
        except Exception as exc:
            if self.trainer.env.world == 1:
                raise
            self.failure = self.failure or exc

    def run(self, interrupt: InterruptFlag) -> TrainSummary:
        cfg, trainer = self.request.train, self.trainer
        started, last = time.perf_counter(), None
        while not self._should_stop(interrupt):
            step_start = time.perf_counter()
            last = trainer.train_step()
            seconds = time.perf_counter() - step_start
            trainer.elapsed += seconds
            self._after_step(last, seconds)
            if trainer.nonfinite_in_a_row >= MAX_NONFINITE_IN_A_ROW:
                raise TrainingError(
                    f"loss or gradients were not finite for {MAX_NONFINITE_IN_A_ROW} steps in "
                    f"a row (step {trainer.step})",
                    hint="lower --lr, keep --grad-clip on, or use --precision fp32")
            # The planned last step is saved once, after the final evaluation, so its
            # config.json records the figure the run ended on.
            if (cfg.checkpoint_every and trainer.step % cfg.checkpoint_every == 0
                    and trainer.step < cfg.max_steps):
                self._save()
        # As agreed by the last `_should_stop`: a signal arriving from here on must not
        # make this rank's final evaluation differ from the others'.
        interrupted = interrupt.agreed is not None
        terminated = interrupt.agreed == signal.SIGTERM
        self._final_evaluation(interrupted)
        if self.saved_step != trainer.step:  # the same on every rank (not only rank 0)
            self._save()
        if self.failure is not None:  # no collective follows: rank 0 may stop alone
            raise self.failure
        return _summary(self.request, trainer, last, self.evaluation,
                        interrupted=interrupted, terminated=terminated,
                        seconds=time.perf_counter() - started, checkpoint=self.checkpoint)

    def _should_stop(self, interrupt: InterruptFlag) -> bool:
        """The same answer on every rank. Ranks time themselves, and a signal may reach
        one rank a step before another: elapsed time, signals and rank 0's failure are
        agreed (the largest over ranks) in one all-reduce before each step."""
        cfg, trainer = self.request.train, self.trainer
        elapsed, sigint, sigterm, failed = agree(
            [trainer.elapsed, float(interrupt.signum == signal.SIGINT),
             float(interrupt.terminated), float(self.failure is not None)],
            trainer.env, trainer.device)
        if self.failure is not None:
            raise self.failure
        if failed:
            raise_peer_failed(trainer.env)
        trainer.elapsed = elapsed
        interrupt.adopt(sigint > 0, sigterm > 0)
        out_of_time = cfg.max_time_s is not None and trainer.elapsed >= cfg.max_time_s
        # `agreed`, not `requested`: a signal handled since this rank's flags went into
        # the all-reduce is this rank's alone until the next agreement (InterruptFlag).
        return interrupt.agreed is not None or trainer.step >= cfg.max_steps or out_of_time

    def _after_step(self, result: StepResult, seconds: float) -> None:
        """Report the step, and log it to metrics.jsonl: every `log_every` steps, the
        first, and any with a periodic evaluation (whose figures join its line)."""
        cfg, trainer = self.request.train, self.trainer
        event = StepEvent(step=trainer.step, train_loss=result.loss, lr=result.lr,
                          grad_norm=result.grad_norm, skipped=not result.finite,
                          tokens_per_s=trainer.tokens_per_step / max(seconds, 1e-9),
                          elapsed_s=trainer.elapsed, progress=trainer.progress)
        record: dict[str, Any] = dataclasses.asdict(event)
        evaluation = None
        if cfg.eval_every and event.step % cfg.eval_every == 0:
            evaluation = self._evaluate(log=False)
        if evaluation is not None:
            record.update(val_loss=evaluation.val_loss, val_bpb=evaluation.val_bpb)
        if event.step % cfg.log_every == 0 or event.step == 1 or evaluation is not None:
            self._hold_failure(lambda: self.metrics.write(record))
        self.on_event(event)

    def _final_evaluation(self, interrupted: bool) -> None:
        """The number a run ends on: `final_eval_blocks` spread over the held-out split.
        After Ctrl-C, the quicker periodic size (the user is waiting to get out)."""
        cfg, step = self.request.train, self.trainer.step
        evaluated_now = self.evaluation is not None and self.metrics.last_eval_step == step
        if interrupted or cfg.final_eval_blocks <= cfg.eval_blocks:
            if not evaluated_now:
                self._evaluate()
            return
        self._evaluate(max_blocks=cfg.final_eval_blocks)

    def _evaluate(self, log: bool = True, max_blocks: int | None = None) -> EvalEvent | None:
        """Evaluate, report it, and with `log` write its own metrics.jsonl line."""
        self.evaluation = self.trainer.evaluate(max_blocks)
        self.metrics.last_eval_step = self.trainer.step
        if self.evaluation is None:
            return None
        event = EvalEvent(self.trainer.step, *self.evaluation)
        if log:  # with the training time, so a report can place it on a time axis
            record = {**dataclasses.asdict(event), "elapsed_s": self.trainer.elapsed}
            self._hold_failure(lambda: self.metrics.write(record))
        self.on_event(event)
        return event

    def _save(self) -> None:
        """Rank 0 writes the checkpoint; every rank waits for it and learns the outcome."""
        from fragment_llm.checkpoint.layout import step_path

        trainer = self.trainer
        run_on_main(trainer.env, trainer.device, self._write_checkpoint)
        self.saved_step = trainer.step
        self.checkpoint = step_path(self.request.out, trainer.step)

    def _write_checkpoint(self) -> None:
        from fragment_llm.checkpoint.rng import capture_rng_state
        from fragment_llm.checkpoint.save import save_checkpoint

        if self.failure is not None:  # a metrics write failed: stop here, with everyone
            raise self.failure
        trainer = self.trainer
        state = TrainerState.model_validate({**trainer.state_dict(), "rng": capture_rng_state()})
        config = self._config_record()
        provenance = Provenance(
            tokenizer_sha256=self.tokenizer.sha256,
            tokens_manifest_sha256=trainer.shards.manifest_sha256,
            processed_manifest_sha256=trainer.shards.manifest.processed_manifest_sha256,
            model_config_sha256=model_config_sha256(config.model),
            # A resumed fine-tuning run has its base both ways: one set of keys, and the
            # one it started from wins.
            **{**self.recipe.provenance(), **self.carried_provenance})
        adapter = self.recipe.adapter_weights(trainer.model)
        path = save_checkpoint(
            self.request.out, trainer.step, model=None if adapter else trainer.model,
            optimizer=trainer.optimizer, trainer_state=state, config=config,
            tokenizer_file=self.request.tokenizer, provenance=provenance,
            keep_last=self.request.train.keep_checkpoints, adapter=adapter)
        self.on_event(CheckpointEvent(trainer.step, path))

    def _config_record(self) -> CheckpointConfig:
        evaluation = self.evaluation
        return CheckpointConfig(
            model=self.model_config.model_dump(mode="json"),
            train=self.request.train.model_dump(mode="json"),
            fragment_version=__version__,
            # How chat renders turns for this model (chat.py): plain-text documents
            # train a model that continues a "User: ... Assistant:" transcript, and
            # conversations one that answers between special tokens.
            chat_format=self.recipe.chat_format,
            val_loss=evaluation[0] if evaluation else None,
            val_bpb=evaluation[1] if evaluation else None,
            # What resuming changed ([train] holds the values in force now).
            resume_changes=(self.request.resumed.change_record()
                            if self.request.resumed else []))


class MetricsLog:
    """OUT/metrics.jsonl, one JSON object per line, appended and flushed by rank 0."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled
        self.last_eval_step: int | None = None

    def write(self, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                 for k, v in values.items()}
        line = (json.dumps(clean, sort_keys=True) + "\n").encode("utf-8")
        # O_NOFOLLOW: a metrics.jsonl planted as a symlink must not redirect our appends
        # into some other file; a full disk is one OutputError line, not an internal error.
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        with translate_os_errors(self.path):
            fd = os.open(self.path, flags, 0o644)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)

    def truncate_after(self, step: int) -> None:
        """On resume, drop lines logged after the checkpoint (and any torn last line)."""
        if not self.enabled or not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            with contextlib.suppress(ValueError, TypeError, AttributeError):
                if int(json.loads(line).get("step", -1)) <= step:
                    kept.append(line)
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))
