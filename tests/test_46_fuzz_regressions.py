"""Every input the fuzzers (fuzz/, atheris) once crashed on, replayed through the same
targets without the fuzzer, with the seeds: each must now pass through cleanly."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

FUZZ = Path(__file__).resolve().parent.parent / "fuzz"
sys.path.insert(0, str(FUZZ))

import fuzz_frames  # noqa: E402
import fuzz_journal  # noqa: E402

TARGETS = {"frames": fuzz_frames.one_input, "journal": fuzz_journal.one_input}
# A target with no crash yet has no folder (git keeps no empty ones).
CASES = sorted((t, p) for t in TARGETS for p in (FUZZ / "regressions").glob(f"{t}/*"))


@pytest.mark.parametrize(("target", "path"), CASES, ids=[f"{t}/{p.name}" for t, p in CASES])
def test_regression_input_passes(target: str, path: Path) -> None:
    TARGETS[target](path.read_bytes())


def test_there_are_regression_inputs() -> None:
    assert CASES, "fuzz/regressions/ is empty: the parametrized test would run nothing"
