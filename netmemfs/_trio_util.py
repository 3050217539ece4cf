"""Small trio helpers shared by the client-side modules."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from netmemfs.errors import NetmemError


@asynccontextmanager
async def open_quiet_nursery() -> AsyncIterator[trio.Nursery]:
    """A nursery whose lone error comes out as itself, not wrapped in an ExceptionGroup.

    Background tasks of ours catch their own expected errors, so a group almost always
    holds one exception from the body; callers then catch NetmemError as usual. A group
    of several is re-raised as it is, unless all are Cancelled-free NetmemErrors, where
    the first stands for them all.
    """
    try:
        async with trio.open_nursery() as nursery:
            yield nursery
    except BaseExceptionGroup as group:
        leaves = list(_leaves(group))
        if len(leaves) == 1 or all(isinstance(e, NetmemError) for e in leaves):
            raise leaves[0] from None
        raise


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for e in group.exceptions:
        if isinstance(e, BaseExceptionGroup):
            out.extend(_leaves(e))
        else:
            out.append(e)
    return out
