"""Human sizes on the command line: 4096, 64K, 512M, 2G, 1T (powers of 1024)."""

from __future__ import annotations

import re

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes in text; ValueError with an example if it is not a size."""
    m = _SIZE.match(text)
    if m is None:
        raise ValueError(f"{text!r} is not a size; write e.g. 4096, 64K, 512M or 2G")
    return int(m.group(1)) * _UNITS[m.group(2).upper()]


def format_size(n: int) -> str:
    """Bytes as parse_size writes them, in the largest unit that divides them (64M)."""
    for unit in ("T", "G", "M", "K"):
        if n and n % _UNITS[unit] == 0:
            return f"{n // _UNITS[unit]}{unit}"
    return str(n)


def parse_host_port(text: str, default_port: int) -> tuple[str, int]:
    """'host', 'host:port', '[v6]:port' or ':port' -> (host, port)."""
    host, port = text, default_port
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"{text!r}: missing ']' after an IPv6 address")
        host = text[1:end]
        rest = text[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"{text!r}: expected ':PORT' after ']'")
            port = _port(rest[1:], text)
    elif text.count(":") == 1:
        host, _, p = text.partition(":")
        port = _port(p, text)
    return host or "127.0.0.1", port


def _port(text: str, whole: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise ValueError(f"{whole!r}: the port must be a number from 0 to 65535")
    return int(text)
