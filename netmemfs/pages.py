"""Page size, page numbers and segment names: the units every layer shares.

Where it sits: beside errors.py at the bottom; imports nothing of ours but errors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NewType, TypeAlias

from netmemfs.errors import InvalidName, NameTooLong, OutOfRange

PAGE_SIZE = 4096
PAGE_SHIFT = 12

PageNo = NewType("PageNo", int)

Buffer: TypeAlias = bytes | bytearray | memoryview


@dataclass(frozen=True, slots=True)
class PageRun:
    """Consecutive pages of one segment: data holds a whole number of pages."""

    segment: str
    first: int
    data: Buffer = field(repr=False)

    @property
    def count(self) -> int:
        return len(self.data) // PAGE_SIZE


MAX_NAME_BYTES = 255
# Segments are addressed by page number as an unsigned 64-bit value on the wire; sizes
# are capped well below that so page arithmetic never overflows.
MAX_SEGMENT_BYTES = 1 << 50


def pages_for(size_bytes: int) -> int:
    """Number of pages needed to hold size_bytes (the last one may be partial)."""
    return (size_bytes + PAGE_SIZE - 1) >> PAGE_SHIFT


def consecutive(pages: list[int], max_run: int | None = None) -> list[tuple[int, int]]:
    """Sorted page numbers as (first, count) runs of consecutive pages, each at most
    max_run long if given."""
    runs: list[tuple[int, int]] = []
    for p in pages:
        if runs and runs[-1][0] + runs[-1][1] == p and (max_run is None or runs[-1][1] < max_run):
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((p, 1))
    return runs


def check_name(name: str) -> str:
    """Return name if it is a valid segment name, else raise InvalidName saying why."""
    if not name:
        raise InvalidName("segment name is empty; give a name such as 'seg0'")
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        raise InvalidName(
            f"segment name {name[:40]!r}... is longer than {MAX_NAME_BYTES} bytes; shorten it"
        )
    if name in (".", ".."):
        raise InvalidName(f"segment name {name!r} is reserved; choose another")
    for ch in name:
        if ch == "/" or ord(ch) < 0x20 or ord(ch) == 0x7F:
            raise InvalidName(
                f"segment name {name!r} contains {ch!r}; names may not hold '/' or "
                "control characters"
            )
        if 0xD800 <= ord(ch) <= 0xDFFF:
            raise InvalidName(f"segment name {name!r} is not valid UTF-8")
    return name


def check_entry_name(name: str) -> str:
    """Return name if it may name an entry of a directory (POSIX: any bytes but '/' and
    NUL, at most MAX_NAME_BYTES, not '.' or '..'; bytes that are not UTF-8 arrive
    surrogate-escaped, as os.fsdecode gives them), else raise saying why."""
    if not name:
        raise InvalidName("a name in a directory is empty")
    if name in (".", ".."):
        raise InvalidName(f"{name!r} names a directory itself, not an entry in it")
    if "/" in name or "\0" in name:
        raise InvalidName(f"name {name[:40]!r} holds '/' or NUL, which no name may")
    try:
        n = len(name.encode("utf-8", "surrogateescape"))
    except UnicodeEncodeError:
        raise InvalidName(f"name {name[:40]!r} is not a sequence of bytes") from None
    if n > MAX_NAME_BYTES:
        raise NameTooLong(f"name {name[:40]!r}... has {n} bytes, more than {MAX_NAME_BYTES}")
    return name


def check_size(size_bytes: int) -> int:
    if not 0 <= size_bytes <= MAX_SEGMENT_BYTES:
        raise OutOfRange(f"segment size {size_bytes} is outside 0..{MAX_SEGMENT_BYTES} bytes")
    return size_bytes
