"""The one retry policy (ossfuse/retry.py): attempts, backoff with jitter, an overall deadline
that bounds sleeps and attempts, the temporary/permanent classifier, trio and thread flavours."""
from __future__ import annotations

import errno
import socket
import time

import pytest
import trio
import trio.testing

from ossfuse.retry import Budget, RetryPolicy, is_temporary, retry_async, retry_sync
from ossfuse.store.base import NoSuchKey, PreconditionFailed, StoreError, StoreUnavailable
from ossfuse.store.health import StoreHealth


class Temp(Exception):
    temporary = True


class Perm(Exception):
    temporary = False


def test_classifier():
    assert is_temporary(StoreUnavailable("x"))
    assert is_temporary(StoreError("x", temporary=True))
    for e in (StoreError("x"), NoSuchKey("x"), PreconditionFailed("x"), ValueError("bug"), KeyError("k"),
              FileNotFoundError(errno.ENOENT, "no"), Perm()):
        assert not is_temporary(e), e
    for e in (ConnectionRefusedError(), ConnectionResetError(), TimeoutError(), socket.gaierror(-2, "dns"),
              OSError(errno.ENETUNREACH, "unreachable"), Temp()):
        assert is_temporary(e), e
    assert not is_temporary(trio.Cancelled.__new__(trio.Cancelled))
    assert not is_temporary(KeyboardInterrupt())


def test_attempts_then_the_last_error():
    calls = []
    retried = []

    def attempt(budget: Budget):
        calls.append(budget.attempt)
        raise Temp(f"try {budget.attempt}")

    policy = RetryPolicy(attempts=4, deadline=10, backoff=0.01, backoff_max=0.02)
    with pytest.raises(Temp, match="try 4"):
        retry_sync(policy, attempt, on_retry=lambda e, n, d: retried.append((str(e), n, d)))
    assert calls == [1, 2, 3, 4]
    assert [(m, n) for m, n, _ in retried] == [("try 1", 1), ("try 2", 2), ("try 3", 3)]
    assert all(0.005 <= d <= 0.02 for _, _, d in retried)  # backoff × jitter in [0.5, 1], capped


def test_permanent_fails_at_once():
    calls = []

    def attempt(budget):
        calls.append(1)
        raise StoreError("403 SignatureDoesNotMatch")

    with pytest.raises(StoreError):
        retry_sync(RetryPolicy(attempts=10, backoff=5.0), attempt)
    assert calls == [1]


def test_success_after_failures_returns_the_value():
    def attempt(budget):
        if budget.attempt < 3:
            raise ConnectionResetError()
        return "ok"

    assert retry_sync(RetryPolicy(attempts=3, backoff=0.001), attempt) == "ok"


def test_backoff_grows_and_is_jittered():
    p = RetryPolicy(backoff=0.25, backoff_max=8.0)
    for n, nominal in ((1, 0.25), (2, 0.5), (3, 1.0), (6, 8.0), (30, 8.0)):
        ds = [p.delay(n) for _ in range(200)]
        assert all(nominal * 0.5 <= d <= nominal for d in ds)
        assert max(ds) - min(ds) > nominal * 0.2  # jittered, not constant


def test_deadline_stops_before_a_sleep_that_would_pass_it():
    """Fast temporary failures with long backoffs: no sleep ends past the deadline, so the
    operation fails within it even with attempts to spare."""
    calls = []

    def attempt(budget):
        calls.append(time.monotonic())
        raise Temp()

    policy = RetryPolicy(attempts=100, deadline=1.0, backoff=0.4, backoff_max=0.4, min_attempt=0.1)
    t0 = time.monotonic()
    with pytest.raises(Temp):
        retry_sync(policy, attempt)
    elapsed = time.monotonic() - t0
    assert elapsed < 1.0
    assert 2 <= len(calls) <= 5


def test_budget_cuts_each_attempt_timeout_to_the_deadline():
    """A server that accepts and never answers: every attempt waits its (cut) timeout, so
    attempts × read timeout never exceeds the deadline (10 s timeouts, 1.2 s deadline)."""
    waits = []

    def attempt(budget):
        t = budget.timeout(10.0)
        waits.append(t)
        time.sleep(t)  # the request that never gets an answer
        raise TimeoutError()

    policy = RetryPolicy(attempts=6, deadline=1.2, backoff=0.01, backoff_max=0.01, min_attempt=0.2)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        retry_sync(policy, attempt)
    # the values prove the cut; the clock only that no second 10 s wait followed (slack: a
    # loaded machine wakes a 1.2 s sleep late)
    assert waits[0] == pytest.approx(1.2, abs=0.05) and len(waits) == 1
    assert time.monotonic() - t0 < 1.2 + 2.0


def test_budget_without_deadline_and_min_attempt():
    b = Budget(RetryPolicy(deadline=None))
    assert b.remaining() is None and b.timeout(7.0) == 7.0
    b = Budget(RetryPolicy(deadline=0.001, min_attempt=0.5))
    time.sleep(0.01)
    assert b.remaining() < 0 and b.timeout(7.0) == 0.5
    with pytest.raises(ValueError):
        RetryPolicy(attempts=0)
    with pytest.raises(ValueError):
        RetryPolicy(deadline=0)


def test_async_flavour_sleeps_in_trio_and_is_cancellable():
    async def main():
        calls = []

        async def attempt(budget):
            calls.append(budget.attempt)
            if budget.attempt < 3:
                raise StoreUnavailable("503")
            return budget.attempt

        t0 = trio.current_time()
        assert await retry_async(RetryPolicy(attempts=5, backoff=1.0, backoff_max=1.0), attempt) == 3
        assert calls == [1, 2, 3]
        assert 1.0 <= trio.current_time() - t0 <= 2.0  # two sleeps of [0.5, 1] s, in trio time

        # cancellation during a backoff sleep ends the retrying, it is not retried
        async def always(budget):
            raise StoreUnavailable("503")

        with trio.move_on_after(3) as scope:
            await retry_async(RetryPolicy(attempts=1000, deadline=None, backoff=1.0, backoff_max=1.0), always)
        assert scope.cancelled_caught

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_async_first_attempt_outside_tenacity_keeps_the_policy():
    """retry_async makes its first attempt before setting tenacity up: the same outcomes as
    before. A permanent first failure is raised as itself with no retry; a temporary one is
    retried with on_retry numbering it attempt 1; the deadline counts from the operation's
    start, so a slow first attempt (0.3 s of a 0.4 s deadline) leaves no room for a
    backoff; the offline bound (health) of a short request counts from the start too."""
    async def main():
        perm = Perm()

        async def permanent(budget):
            raise perm

        with pytest.raises(Perm) as ei:
            await retry_async(RetryPolicy(attempts=5), permanent)
        assert ei.value is perm

        retried = []

        async def flaky(budget):
            if budget.attempt == 1:
                raise Temp()
            return budget.attempt

        assert await retry_async(RetryPolicy(attempts=3, backoff=0.1), flaky,
                                 on_retry=lambda e, n, d: retried.append((type(e), n))) == 2
        assert retried == [(Temp, 1)]

        calls = []

        async def slow_then_fail(budget):  # the budget runs on the real monotonic clock
            calls.append(budget.attempt)
            if budget.attempt == 1:
                time.sleep(0.3)
            raise Temp()

        with pytest.raises(Temp):
            await retry_async(RetryPolicy(attempts=10, deadline=0.4, backoff=0.2, backoff_max=0.2, min_attempt=0.05),
                              slow_then_fail)
        # 0.3 s + a sleep of [0.1, 0.2] s: past 0.4 - 0.05 s from the start whatever the jitter
        assert calls == [1]

        class Tracker:
            offline = False
            timeout = 5.0

            def __init__(self):
                self.asked = []

            def give_up(self, failing_for, upcoming_sleep):
                self.asked.append(failing_for)
                return failing_for + upcoming_sleep > 5.0

        tracker = Tracker()
        calls.clear()
        with pytest.raises(Temp):
            await retry_async(RetryPolicy(attempts=10, deadline=None, backoff=0.1, backoff_max=0.1), slow_then_fail,
                              health=tracker, short=True)
        assert 0.3 <= tracker.asked[0] < 1.0  # failing since the start, the slow attempt included
        assert len(calls) == 10 and len(tracker.asked) == 9  # (not asked after the last attempt)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_timeout_counts_the_store_failing_since_it_went_silent():
    """A long request (not ``short``) counts its failing time from its first failure, so a
    reset after a long transfer is retried; but a timeout's ``silent_for`` seconds (the store
    sent nothing that long) count too: a GET that got nothing for the offline timeout is not
    sent again (it was, and an unreachable store held a read twice the offline timeout: a trial).
    Each attempt here takes 0.3 s of real time; the offline bound is 0.3 s."""
    from ossfuse.store.base import StoreUnavailable

    class Tracker:
        offline = False
        timeout = 0.3

        def __init__(self):
            self.asked: list[float] = []

        def give_up(self, failing_for, upcoming_sleep):
            self.asked.append(failing_for)
            return StoreHealth.give_up(self, failing_for, upcoming_sleep)  # the product's rule, rounding and all

    async def main():
        for silent, attempts in ((0.3, 1), (0.0, 2)):
            calls = []

            async def fails(budget):
                calls.append(budget.attempt)
                time.sleep(0.3)  # the budget and tenacity run on the real monotonic clock
                err = StoreUnavailable("no answer", code="Timeout" if silent else "ConnectionReset")
                err.silent_for = silent
                raise err

            tracker = Tracker()
            with pytest.raises(StoreUnavailable):
                await retry_async(RetryPolicy(attempts=10, deadline=None, backoff=0.05, backoff_max=0.05), fails,
                                  health=tracker, short=False)
            assert len(calls) == attempts, (silent, calls, tracker.asked)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_the_last_attempt_is_made_at_the_offline_bound():
    """Found by a trial: with an offline bound of 5 s, a read gave up 2.7 s into an outage of
    3 s (the next backoff would have ended past the bound) and got EIO, though the README
    promises the store is retried for the bound. The last sleep is cut to end at the bound,
    and the attempt made there succeeds. Real time, scaled down: bound 1 s, backoffs of 0.6 s
    (the second would end at 1.2 s: it gave up there), a store down for the first two attempts
    (counted, not timed: a loaded CI machine's sleep overshot a 0.3 s outage by 10 ms)."""
    import unittest.mock

    from ossfuse.store.health import StoreHealth

    async def main():
        start = time.monotonic()
        calls = []

        async def down_for_a_while(budget):
            calls.append(round(time.monotonic() - start, 2))
            if len(calls) < 3:
                raise StoreUnavailable("connection refused", code="ConnectionRefused")
            return "answered"

        policy = RetryPolicy(attempts=10, deadline=None, backoff=0.6, backoff_max=0.6)
        with unittest.mock.patch("ossfuse.retry.random.uniform", lambda a, b: b):
            assert await retry_async(policy, down_for_a_while, health=StoreHealth(1.0), short=True) == "answered"
        assert len(calls) == 3 and 0.95 <= calls[-1] <= 1.3, calls  # at 0, 0.6 and the bound

    trio.run(main)
