"""Plain helpers and constants that several test modules share (fixtures are in conftest.py).

Test modules import from here, never from each other's fixtures, so a module moved to
another folder keeps working.
"""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "raw"  # the bundled plays: the real text every corpus is cut from
