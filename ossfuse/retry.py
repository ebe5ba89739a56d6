"""The one retry policy of ossfuse: a few attempts, exponential backoff with jitter, and an
overall deadline per operation.

A leaf module (stdlib and ``tenacity`` only), used by the OSS store (``store/oss.py``), the KMS
client (``kms.py``) and the ECS metadata credentials (``store/credentials.py``).

Why tenacity itself and not ``stamina`` (its friendlier wrapper): stamina's ``timeout`` is
tenacity's ``stop_after_delay``, checked only *after* a failed attempt, so it may start a
backoff sleep that ends past the deadline and then one more full attempt; and its
instrumentation logs every retry at WARNING through a process-wide hook registry. Here the stop
is ``stop_before_delay`` (no sleep that would end past the deadline) and each attempt gets a
:class:`Budget` so the caller can bound the attempt itself (a blocking request in a worker
thread cannot be cancelled; its socket timeout must be shortened instead). tenacity sleeps with
``trio.sleep`` under trio (it detects the running library) and ``time.sleep`` in threads.

The guarantee: with ``Budget.timeout`` used as each attempt's network timeout, one operation
takes at most ``deadline`` seconds plus scheduling noise, whatever the server does (answers 503
at once, refuses connections, or accepts and never answers): no attempt starts with less than
``min_attempt`` seconds left, no sleep ends past the deadline, and no attempt waits longer than
what is left. (A body that trickles in a byte per read timeout can still run long: the read
timeout of ``requests`` is per socket read. The OSS store's lean path, HEAD, GET, LIST and
small PUTs, bounds that with a low-speed rule: ``store/paced.py``.)
"""
from __future__ import annotations

import errno
import http.client
import logging
import random
import socket
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Protocol, TypeVar

import tenacity

log = logging.getLogger(__name__)

T = TypeVar("T")

#: errno values of failures that may heal by themselves (the network, not the request)
_TEMPORARY_ERRNOS = {errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.ETIMEDOUT,
                     errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN, errno.EPIPE, errno.EAGAIN}


def is_temporary(exc: BaseException) -> bool:
    """Whether retrying ``exc`` may help.

    An exception that carries a boolean ``temporary`` attribute (``StoreError``,
    ``KmsUnavailable``/``KmsRefused``, ``CredentialsError``) decides for itself. Otherwise:
    connection refused/reset/aborted, timeouts, DNS failures (``socket.gaierror``: a resolver
    may come up after boot) and truncated HTTP answers are temporary; everything else (a bug, a
    4xx refusal, a missing file) is not. ``BaseException``s that are not ``Exception``s
    (cancellation, KeyboardInterrupt) are never retried."""
    if not isinstance(exc, Exception):
        return False
    flag = getattr(exc, "temporary", None)
    if isinstance(flag, bool):
        return flag
    if isinstance(exc, (ConnectionError, TimeoutError, socket.gaierror, http.client.IncompleteRead,
                        http.client.RemoteDisconnected)):
        return True
    if isinstance(exc, OSError) and exc.errno in _TEMPORARY_ERRNOS:
        return True
    return False


@dataclass(frozen=True)
class RetryPolicy:
    """How one operation is retried.

    :param attempts: tries in all (≥ 1; 1 = no retry).
    :param deadline: seconds from the operation's start after which no attempt starts and no
        attempt may wait (see :class:`Budget`); None = no deadline (attempts alone bound it).
    :param backoff: seconds before the 2nd try; doubled for each later one, capped at
        ``backoff_max``; each delay is multiplied by a random factor in [0.5, 1] (jitter, so
        clients that failed together do not retry together).
    :param min_attempt: an attempt is not started with fewer seconds than this left.
    """

    attempts: int = 6
    deadline: float | None = 60.0
    backoff: float = 0.25
    backoff_max: float = 8.0
    min_attempt: float = 0.5

    def __post_init__(self):
        if self.attempts < 1:
            raise ValueError(f"retry attempts must be at least 1, not {self.attempts}")
        if self.deadline is not None and self.deadline <= 0:
            raise ValueError(f"retry deadline must be positive seconds, not {self.deadline}")

    def delay(self, attempt: int) -> float:
        """Seconds to sleep after failed attempt number ``attempt`` (1-based)."""
        return min(self.backoff_max, self.backoff * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)


class Budget:
    """The time left to one operation under its policy (monotonic clock)."""

    def __init__(self, policy: RetryPolicy):
        self.policy = policy
        self.start = time.monotonic()
        self.attempt = 0  # number of the attempt in progress (1-based)

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def remaining(self) -> float | None:
        """Seconds left before the deadline (may be ≤ 0); None without a deadline."""
        if self.policy.deadline is None:
            return None
        return self.policy.deadline - self.elapsed()

    def timeout(self, limit: float) -> float:
        """A network timeout for this attempt: ``limit`` seconds, shortened to what is left of
        the deadline (never below ``min_attempt``)."""
        left = self.remaining()
        if left is None:
            return limit
        return max(self.policy.min_attempt, min(limit, left))


OnRetry = Callable[[BaseException, int, float], None]


class Health(Protocol):
    """What the retry loop asks of a store's online/offline tracker (``store.health``):
    ``timeout``, the offline bound in seconds, and whether to give up."""

    timeout: float

    def give_up(self, failing_for: float, upcoming_sleep: float) -> bool: ...


class _Unreachable(tenacity.stop.stop_base):
    """Stop retrying an unreachable store: EIO after the offline timeout, not the whole
    deadline. Counted from the first failure: a long transfer that is then reset is still
    retried; one that timed out counts from when the store went silent (``silent_for``). A
    ``short`` request (metadata: no long body) counts from its start, so one that waited out
    its timeout is not sent again past the offline bound. One instance per call
    (it remembers that call's first failure); a module-level class because defining one per
    call cost ~10% of the CPU of ``ls -l`` over OSS (a HEAD per entry)."""

    def __init__(self, health: Health, short: bool, start: float):
        self.health = health
        self.short = short
        self.start = start  # monotonic start of the operation (Budget.start)
        self.first_failure: float | None = None

    def failing_for(self, state: tenacity.RetryCallState) -> float:
        """Seconds the store has failed this call, as of ``state``'s last outcome."""
        now = state.outcome_timestamp if state.outcome_timestamp is not None else time.monotonic()
        if self.first_failure is None:
            # a timeout: the store has failed since it went silent (StoreError.silent_for), so
            # a long GET that then got nothing for the offline timeout is not sent again
            exc = state.outcome.exception() if state.outcome is not None else None
            silent = getattr(exc, "silent_for", 0.0) or 0.0
            self.first_failure = self.start if self.short else max(self.start, now - silent)
        return now - self.first_failure

    def wait(self, state: tenacity.RetryCallState, delay: float) -> float:
        """The backoff ``delay``, cut to end at the offline bound: the last attempt is made
        there (a read gave up 2.7 s into an outage of 3 s with a bound of 5 s, as the next
        backoff would have ended past it: a trial)."""
        return max(0.0, min(delay, self.health.timeout - self.failing_for(state)))

    def __call__(self, state: tenacity.RetryCallState) -> bool:
        return self.health.give_up(self.failing_for(state), state.upcoming_sleep or 0.0)


class _BeforeDeadline(tenacity.stop.stop_base):
    """tenacity's ``stop_before_delay(max_delay)`` counted from the operation's start
    (``Budget.start``), not from tenacity's: :func:`retry_async` makes the first attempt before
    it sets tenacity up."""

    def __init__(self, start: float, max_delay: float):
        self.start = start
        self.max_delay = max_delay

    def __call__(self, state: tenacity.RetryCallState) -> bool:
        now = state.outcome_timestamp if state.outcome_timestamp is not None else time.monotonic()
        return now - self.start + (state.upcoming_sleep or 0.0) >= self.max_delay


def _tenacity_kwargs(policy: RetryPolicy, budget: Budget, classify: Callable[[BaseException], bool],
                     on_retry: OnRetry | None, health: Health | None = None, short: bool = False) -> dict:
    stop: tenacity.stop.stop_base = tenacity.stop_after_attempt(policy.attempts)
    if policy.deadline is not None:
        # no sleep that ends with less than min_attempt seconds left before the deadline
        stop = stop | _BeforeDeadline(budget.start, max(0.0, policy.deadline - policy.min_attempt))
    unreachable = _Unreachable(health, short, budget.start) if health is not None else None
    if unreachable is not None:
        stop = stop | unreachable

    def wait(state: tenacity.RetryCallState) -> float:
        delay = policy.delay(state.attempt_number)
        return unreachable.wait(state, delay) if unreachable is not None else delay

    def before_sleep(state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome is not None else None
        if on_retry is not None and exc is not None:
            on_retry(exc, state.attempt_number, state.upcoming_sleep)

    return dict(stop=stop, wait=wait,
                retry=tenacity.retry_if_exception(classify), reraise=True, before_sleep=before_sleep)


async def retry_async(policy: RetryPolicy, attempt: Callable[[Budget], Awaitable[T]], *,
                      classify: Callable[[BaseException], bool] = is_temporary,
                      on_retry: OnRetry | None = None, health: Health | None = None, short: bool = False) -> T:
    """``await attempt(budget)`` until it returns, raises what ``classify`` calls permanent, or
    the policy's attempts or deadline run out; then the last exception is raised as itself.
    ``on_retry(exc, attempt_number, delay_seconds)`` is called before each backoff sleep (to log
    it). ``attempt`` should bound its own waiting with ``budget.timeout(...)``. Sleeps with
    ``trio.sleep`` under trio; cancellation is never retried. ``health`` (a store's
    ``store.health.StoreHealth``): no retry once ``health.give_up(seconds failing, next
    sleep)`` says so (the store is offline, or the sleep would end past its offline timeout);
    seconds failing count from the first failure, or from the start when ``short`` (a request
    without a long body, whose time waiting for an answer is time the store failed it)."""
    budget = Budget(policy)
    # The first attempt runs before tenacity is set up: almost every call succeeds at once,
    # and building and driving an AsyncRetrying was ~10% of the daemon's CPU in ``ls -l`` over
    # OSS (a HEAD per entry). A retryable failure is handed to tenacity as its first attempt's
    # outcome; its time-based stops count from ``budget.start`` (the same as before).
    budget.attempt = 1
    try:
        return await attempt(budget)
    except Exception as e:  # BaseException (cancellation) is never retried: it propagates
        if not classify(e):
            raise
        first: list[BaseException] = [e]

    async def one() -> T:
        if first:
            raise first.pop()  # the first attempt's failure, as tenacity's attempt 1
        budget.attempt += 1
        return await attempt(budget)

    retrying = tenacity.AsyncRetrying(**_tenacity_kwargs(policy, budget, classify, on_retry, health, short))
    return await retrying(one)


def retry_sync(policy: RetryPolicy, attempt: Callable[[Budget], T], *,
               classify: Callable[[BaseException], bool] = is_temporary,
               on_retry: OnRetry | None = None) -> T:
    """:func:`retry_async` for blocking code in a worker thread (sleeps with ``time.sleep``)."""
    budget = Budget(policy)

    def one() -> T:
        budget.attempt += 1
        return attempt(budget)

    retrying = tenacity.Retrying(sleep=time.sleep, **_tenacity_kwargs(policy, budget, classify, on_retry))
    return retrying(one)


__all__ = ["RetryPolicy", "Budget", "is_temporary", "retry_async", "retry_sync"]
