"""Which store a --server names, connected: a netmemfs-server or a Redis.

Where it sits: above remote.py and redis_store.py, below the doors' entry points (the
mount daemon, a region's agent, the device provider, the cli). The same address works
on every command and API:

    HOST[:PORT]                          a netmemfs-server (port 7733 by default)
    redis://HOST:PORT[,HOST:PORT...]     a standalone Redis, or a Redis Cluster's seeds
    rediss://...                         the same over TLS

With a Redis, `token` (the --token-file's contents) is its password: one line,
PASSWORD or USER PASSWORD (a Redis ACL user).
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from netmemfs.remote import DEFAULT_PORT, RemoteStore
from netmemfs.sizes import parse_host_port
from netmemfs.store import Store

__all__ = ["check_address", "connect_store", "is_redis_url"]

# redis_store (and coredis with it: about 0.8 s of imports here, far more in a slow
# guest) is imported only when an address names a Redis: every command, and every
# region's agent, starts without it otherwise.


def is_redis_url(text: str) -> bool:
    return text.startswith(("redis://", "rediss://"))


def check_address(text: str) -> None:
    """Raise ValueError, saying what is wrong, unless text names a store."""
    if is_redis_url(text):
        from netmemfs.redis_store import RedisAddress

        RedisAddress.parse(text)
    else:
        parse_host_port(text, DEFAULT_PORT)


@asynccontextmanager
async def connect_store(
    address: str,
    *,
    token: bytes | None = None,
    tls: ssl.SSLContext | None = None,
    retry_for_s: float = 30.0,
    claim: bytes | None = None,
) -> AsyncIterator[Store]:
    """The store address names, connected (retrying for up to retry_for_s)."""
    if not is_redis_url(address):
        async with RemoteStore.connect(
            address, token=token, tls=tls, retry_for_s=retry_for_s, claim=claim
        ) as remote:
            yield remote
        return
    from netmemfs.redis_store import RedisStore

    async with RedisStore.connect(
        address, retry_for_s=retry_for_s, credentials=token, tls=tls, claim=claim
    ) as redis:
        yield redis
