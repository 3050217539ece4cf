"""pjdfstest, the POSIX conformance suite, built from ../shared/suites and run on a
directory (tests/test_58_pjdfstest.py; by hand: python -m tests.pjdfstest DIR).

The archive is built into a temporary directory (its code never enters the repository).
Each of its test files runs on its own (`prove FILE`), four at a time, from inside the
directory under test, so that one file that bails out does not stop the others; a file
passes when prove says so. Needs root, autoconf, automake, libtool and perl's prove.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.helpers import SuiteMissing, unpack_suite

PACKAGES = {"autoreconf": "autoconf", "automake": "automake", "libtoolize": "libtool"}
PACKAGES["prove"] = "perl"
FILE_TIMEOUT_S = 120  # the slowest file takes about 10 s on tmpfs here
PARALLEL = 4


def missing_packages() -> list[str]:
    return sorted({pkg for tool, pkg in PACKAGES.items() if shutil.which(tool) is None})


def build(into: Path) -> Path:
    """Build pjdfstest under into; the directory of its tests."""
    missing = missing_packages()
    if missing:
        raise SuiteMissing(f"pjdfstest is built from source: apt-get install {' '.join(missing)}")
    unpack_suite("pjdfstest.tar.gz", into)
    src = into / "pjdfstest"
    for step in (["autoreconf", "-ifs"], ["./configure"], ["make", "pjdfstest"]):
        r = subprocess.run(step, cwd=src, capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            raise AssertionError(f"pjdfstest: {' '.join(step)} failed:\n{r.stdout}{r.stderr}")
    return src / "tests"


def test_files(tests: Path) -> list[Path]:
    return sorted(tests.rglob("*.t"))


def run(tests: Path, where: Path) -> dict[str, bool]:
    """Every test file (by its path under tests) and whether it passed, run in where."""

    def one(t: Path) -> tuple[str, bool]:
        try:
            r = subprocess.run(
                ["prove", str(t)],
                cwd=where,
                capture_output=True,
                timeout=FILE_TIMEOUT_S,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired:
            return str(t.relative_to(tests)), False
        return str(t.relative_to(tests)), r.returncode == 0

    with ThreadPoolExecutor(PARALLEL) as pool:
        return dict(pool.map(one, test_files(tests)))


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="pjdfstest-") as tmp:
        got = run(build(Path(tmp)), Path(sys.argv[1]))
    failed = sorted(name for name, ok in got.items() if not ok)
    print(f"{len(got) - len(failed)} of {len(got)} test files pass; failing:", *failed)
