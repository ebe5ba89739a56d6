"""Small trio helpers shared by the layers."""
from __future__ import annotations

import logging
from typing import Awaitable, Callable, Iterable

import trio

log = logging.getLogger(__name__)


def first_leaf(exc: BaseException) -> BaseException:
    """The first non-group exception inside a (nested) exception group."""
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


async def run_all(jobs: Iterable[Callable[[], Awaitable[object]]], limit: int) -> None:
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


class Supervisor:
    """Starts background tasks in ``nursery`` so that none can fail silently or hang the
    daemon: a task that raises is logged in one line naming it and the reason, and
    ``on_failure(name, exc)`` is called (the daemon then unmounts and exits non-zero). Passed
    wherever a layer wants a nursery (it has the ``start_soon`` the layers use)."""

    def __init__(self, nursery: trio.Nursery, on_failure: Callable[[str, BaseException], None]):
        self.nursery = nursery
        self.on_failure = on_failure

    def start_soon(self, fn: Callable[..., Awaitable[object]], *args: object, name: str | None = None) -> None:
        label = str(name or getattr(fn, "__qualname__", repr(fn)))

        async def supervised() -> None:
            try:
                await fn(*args)
            except Exception as e:  # noqa: BLE001 - Cancelled (a BaseException) passes through
                exc = first_leaf(e)
                log.error("background task %s failed: %s: %s", label, type(exc).__name__, exc,
                          exc_info=log.isEnabledFor(logging.DEBUG))
                self.on_failure(label, exc)

        self.nursery.start_soon(supervised, name=label)
