"""Token challenge-response, both ways, without the token ever crossing the wire.

Where it sits: beside protocol.py (pure functions, no I/O). The client proves it holds the
token by an HMAC over both nonces; the server answers with its own HMAC in the other
order, so a client also knows it reached a server that holds the token.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
from pathlib import Path

from netmemfs.errors import AuthFailed

NONCE_BYTES = 32


def new_nonce() -> bytes:
    return os.urandom(NONCE_BYTES)


def client_proof(token: bytes, server_nonce: bytes, client_nonce: bytes) -> bytes:
    msg = b"netmemfs-client\0" + server_nonce + client_nonce
    return hmac.new(token, msg, hashlib.sha256).digest()


def server_proof(token: bytes, server_nonce: bytes, client_nonce: bytes) -> bytes:
    msg = b"netmemfs-server\0" + client_nonce + server_nonce
    return hmac.new(token, msg, hashlib.sha256).digest()


def proofs_match(a: bytes, b: bytes) -> bool:
    return hmac.compare_digest(a, b)


def read_token_file(path: Path) -> bytes:
    """The token in path, refusing a file others may read or an empty one."""
    try:
        st = path.stat()
        data = path.read_bytes().strip()
    except OSError as e:
        raise AuthFailed(f"cannot read token file {path}: {e.strerror}") from e
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise AuthFailed(
            f"token file {path} may be read by other users (mode "
            f"{stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {path}"
        )
    if len(data) < 16:
        raise AuthFailed(
            f"token file {path} holds {len(data)} bytes; put at least 16 random bytes in it, "
            f"e.g.: head -c 32 /dev/urandom | base64 > {path}"
        )
    return data
