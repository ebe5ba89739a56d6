"""Small trio helpers shared by the layers."""
from __future__ import annotations

from typing import Awaitable, Callable, Iterable

import trio


def first_leaf(exc: BaseException) -> BaseException:
    """The first non-group exception inside a (nested) exception group."""
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


async def run_all(jobs: Iterable[Callable[[], Awaitable[None]]], limit: int) -> None:
    """Run ``jobs`` concurrently, at most ``limit`` at once; the first failure cancels the rest
    and is raised as itself (not wrapped in an ExceptionGroup)."""
    limiter = trio.CapacityLimiter(limit)

    async def one(job):
        async with limiter:
            await job()

    try:
        async with trio.open_nursery() as nursery:
            for job in jobs:
                nursery.start_soon(one, job)
    except BaseExceptionGroup as eg:
        raise first_leaf(eg) from None
