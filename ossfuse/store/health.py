"""Whether the store answers: one mount's online/offline state (issue 17, docs/design.md
"Offline").

A :class:`StoreHealth` is attached to a store as ``store.health`` (the daemon does it; a store
without one behaves as before). ``ObjectStore``'s per-operation wrapper (``store/base.py``)
reports every outermost store call to it, and the OSS retry loop (``ossfuse.retry``) asks it
how long to keep retrying. States:

* **online** (``offline_since`` None): calls go through. A call that ends in a temporary
  failure *without an HTTP answer* (``StoreError.unreachable``: refused/reset connections,
  timeouts, DNS failures, after the store's own retries, which stop after ``timeout`` seconds
  of failing) takes the mount offline: one WARNING line, ``offline_since`` = that wall-clock
  time, and the call raises :class:`StoreOffline` (a ``StoreUnavailable``) so the file system
  can answer from what it has cached; unless the store is alive all the same — it answered a
  call sent after this one, or answers a confirming one-key listing (``confirm``, set by the
  daemon) within half the offline timeout (at most 1 s): then it is this request's failure (a slow or
  damaged object), raised as itself (EIO for that request), and the mount stays online. A
  body cut short after the answer's status line is an answer too (``store/oss.py``), unless it
  went silent for the whole timeout: then, as a call without an answer, the confirming listing
  tells.
* **offline**: calls fail fast with :class:`StoreOffline` (no network wait), except one call
  at a time that is let through as a probe, ``probe_interval`` seconds after the last probe
  ended. While the daemon's :meth:`StoreHealth.watch` task runs, only its own calls probe, and
  calls made while a probe runs fail at once: a store that accepts connections and never
  answers holds each probe for ``timeout`` seconds, and a file-system request must not wait
  that long for an answer its cache has (a trial: `ls` of cached directories took 5-120 s).
  Without a watcher (and from :meth:`probe_next` on: the unmount's drain) any call may be the
  probe and the calls made while it runs wait for its outcome (at most ``timeout`` seconds).
  The first call that succeeds takes the mount online again: one INFO line and every
  ``on_online`` callback runs (the write-back scheduler queues its pending uploads at once
  instead of after ``mount.retry_interval``).

Every failure that came with an HTTP answer proves the store reachable and counts as success:
403, 404, a precondition, and also 5xx and throttling (OSS 503 "Please reduce your request
rate", 429) that outlived the retries: the caller gets that error itself (EIO for the one
request), and the mount stays online (a busy store is no outage: taking the mount offline
would fail every other request for seconds, and the background batched deletes alone can be
throttled). Everything runs on the trio thread; no lock, no await inside the state changes.
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
import time
from typing import Awaitable, Callable, Iterator

import trio

from .base import StoreError, StoreUnavailable

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 5.0  # seconds: config store.offline_timeout
_SAID_MAX = 10_000  # lines first_time remembers per outage (then each further one is said)

# True in the watcher's task (set by watch()): its calls may be the probe
_WATCHER_PROBE: contextvars.ContextVar[bool] = contextvars.ContextVar("ossfuse_watcher_probe", default=False)


class StoreOffline(StoreUnavailable):
    """The store is taken to be unreachable (``StoreHealth`` is offline): raised at once, or by
    the call that found it unreachable. ``temporary`` like every StoreUnavailable."""

    outage = True


class StoreHealth:
    """Online/offline state of one store (see the module doc).

    :param timeout: seconds a store call may keep retrying an unreachable store before it fails
        (and the mount goes offline); also the longest connect timeout of one attempt.
    :param probe_interval: seconds between the calls let through while offline (default: a
        fifth of ``timeout``, at least 0.2 s and at most 2 s).
    """

    def __init__(self, timeout: float = DEFAULT_TIMEOUT, probe_interval: float | None = None):
        if timeout <= 0:
            raise ValueError(f"offline timeout must be positive seconds, not {timeout}")
        self.timeout = float(timeout)
        self.probe_interval = probe_interval if probe_interval is not None else min(2.0, max(0.2, timeout / 5))
        self.offline_since: float | None = None  # wall-clock seconds; None: online
        self.last_error: str | None = None  # why the store went offline (one line)
        self.on_online: list[Callable[[], None]] = []
        self._next_probe = 0.0  # monotonic time from which one call is let through while offline
        self._probe: trio.Event | None = None  # trio.Event of the probe call running now, if any
        self._watched = False  # watch() runs and probes: other calls never probe nor wait
        self._said: set[str] = set()  # lines logged in this outage (first_time)
        # monotonic send time of the latest-sent call the store answered (failed(started=))
        self._answered_sent = float("-inf")
        # a cheap store call (a one-key listing, set by the daemon) that confirms an outage
        # before an unanswered call takes the mount offline; None: none (core tests)
        self.confirm: Callable[[], Awaitable[object]] | None = None
        self._confirming: _Confirm | None = None  # the confirming call in flight
        self._abandonable: set[trio.CancelScope] = set()  # requests that change nothing, in flight

    @contextlib.contextmanager
    def abandoned_when_offline(self) -> Iterator[None]:
        """Run one attempt of a request that changes nothing (GET, HEAD, LIST) inside; it is
        cancelled when the mount goes offline meanwhile (the body ends early: the caller then
        raises :class:`StoreOffline`): such a request sent before the
        outage was found waited its own ``timeout`` on, and a read that met it, after a retry,
        got EIO after twice the offline timeout (a trial: 10 s, not 5)."""
        scope = trio.CancelScope()
        self._abandonable.add(scope)
        try:
            with scope:
                yield
        finally:
            self._abandonable.discard(scope)

    @property
    def offline(self) -> bool:
        return self.offline_since is not None

    @staticmethod
    def in_watcher() -> bool:
        """Whether the calling task is :meth:`watch`'s: its failed probes of a store that is
        down are expected, one per ``probe_interval``, and not worth a log line each."""
        return _WATCHER_PROBE.get()

    async def admit(self, op: str, key: str) -> bool:
        """Before a store call. Online: returns False (go ahead). Offline: the call becomes the
        probe (returns True: the caller must call :meth:`probe_done` when it ends) if none is
        running, ``probe_interval`` has passed since the last ended and no watcher probes
        instead (or this is its call); without a watcher, while a probe runs, waits for it (at
        most ``timeout`` seconds) and goes ahead if it brought the store back; otherwise
        raises StoreOffline at once."""
        if self.offline_since is None:
            return False
        watcher_only = self._watched and not _WATCHER_PROBE.get()
        if self._probe is not None:
            if not watcher_only:
                with trio.move_on_after(self.timeout):
                    await self._probe.wait()
                if self.offline_since is None:
                    return False
        elif time.monotonic() >= self._next_probe and not watcher_only:
            self._probe = trio.Event()
            self._next_probe = time.monotonic() + self.probe_interval
            return True
        raise StoreOffline(f"store offline since {_when(self.offline_since)} ({self.last_error}): "
                           f"{op} {key!r} not tried", key=key, code="Offline")

    def first_time(self, line: str) -> bool:
        """Whether ``line`` (a failure the outage explains, e.g. "listing 'k/': not listed
        here") is said for the first time in this outage: eight ``ls -lR`` at once failing on
        one directory log one line, not eight (the outage has its WARNING)."""
        if line in self._said:
            return False
        if len(self._said) < _SAID_MAX:
            self._said.add(line)
        return True

    def probe_done(self) -> None:
        """The probe call ended (answered, failed or cancelled): wake the calls waiting for it;
        still offline, the next probe is due ``probe_interval`` from now (a probe of a store
        that never answers lasts ``timeout``: no probe right after another)."""
        if self._probe is not None:
            self._probe.set()
            self._probe = None
            if self.offline_since is not None:
                self._next_probe = time.monotonic() + self.probe_interval

    def probe_next(self) -> None:
        """Let the next call through as a probe at once, and any call probe from now on (the
        unmount's drain tries the store before it gives up on pending uploads; its uploads
        wait for that probe's outcome)."""
        self._next_probe = 0.0
        self._watched = False

    def succeeded(self, sent: float | None = None) -> None:
        """A store call (sent at monotonic time ``sent``) got an answer: back online if
        offline (one INFO line, callbacks)."""
        if sent is not None and sent > self._answered_sent:
            self._answered_sent = sent
        if self.offline_since is None:
            return
        gone = time.time() - self.offline_since
        self.offline_since = None
        self._said.clear()
        log.info("store is back online after %.1f s offline", gone)
        for callback in list(self.on_online):
            try:
                callback()
            except Exception:  # a listener's bug must not fail the call that succeeded
                log.exception("back-online callback %r failed", callback)

    def failed(self, exc: StoreError, started: float | None = None, alive: bool = False) -> StoreError:
        """A store call (sent at monotonic time ``started``) raised ``exc``; returns what the
        caller should raise: a StoreOffline (same message) for a failure without an answer
        (``exc.unreachable``), which takes the mount offline if it was online (one WARNING
        line); ``exc`` itself otherwise (the store answered, maybe with a 503: online), and
        also for an unanswered call while the store is alive (``alive``: what
        :meth:`confirm_alive` said of it: the store answered a call sent after this one, or
        the confirming listing). That is the one request's
        failure (a slow or damaged object), not an outage (a trial: one HEAD that hung 30 s
        took the mount offline, and its cached listings hid a new directory)."""
        if not exc.unreachable:
            self.succeeded(started)
            return exc
        if isinstance(exc, StoreOffline):
            return exc
        if self.offline_since is None and alive:
            return exc
        if self.offline_since is None:
            self.offline_since = time.time()
            self.last_error = str(exc)
            self._next_probe = time.monotonic() + self.probe_interval
            log.warning("store unreachable, working offline from the cache: %s", exc)
            for scope in self._abandonable:  # they would fail the same way, one timeout later
                scope.cancel()
        err = StoreOffline(exc.message, key=exc.key, request_id=exc.request_id, code=exc.code)
        err.__cause__ = exc
        return err

    def answered_since(self, started: float | None) -> bool:
        """Whether the store answered a call sent after monotonic time ``started`` (a call
        sent before, answered as the store went away, proves nothing)."""
        return started is not None and self._answered_sent > started

    async def confirm_alive(self, started: float | None) -> bool:
        """For a call sent at ``started`` that got no answer while the mount is online:
        whether the store is alive all the same (answered a later call, or answers
        :attr:`confirm` within half the offline timeout, at most 1 s; one confirming call at a time, the
        others wait for its outcome). False without ``confirm``."""
        if self.offline_since is not None or self.answered_since(started):
            return self.offline_since is None
        if self.confirm is None:
            return False
        if self._confirming is not None:
            # its own outcome, not the flag of a newer confirm begun before this task wakes
            # (trial AG: 40 HEADs failing at once, one read the reset flag: offline)
            mine = self._confirming
            await mine.done.wait()
            return mine.alive or self.answered_since(started)
        self._confirming = mine = _Confirm()
        sent = time.monotonic()
        try:
            with trio.move_on_after(min(1.0, self.timeout / 2)):  # a live store lists one key at once
                await self.confirm()
                mine.alive = True
                self.succeeded(sent)  # an answer to a call sent after every call that fails now
        except StoreError:
            pass
        finally:
            self._confirming = None
            mine.done.set()
        return mine.alive

    def give_up(self, failing_for: float, upcoming_sleep: float) -> bool:
        """For a retry loop: stop retrying one call that has failed for ``failing_for`` seconds
        and would sleep ``upcoming_sleep`` more: the mount went offline meanwhile, the call has
        failed for ``timeout`` already (a GET silent that long: not sent again), or the sleep
        would end past it (``retry`` cuts its last sleep to end there). Both within a
        millisecond: float rounding must not decide (a GET silent for exactly ``timeout``
        came out 0.29999999999995 s of 0.3 with the monotonic clock at ~1,700 s, and was sent
        again)."""
        return (self.offline or failing_for >= self.timeout - 0.001
                or failing_for + upcoming_sleep > self.timeout + 0.001)

    async def watch(self, probe: Callable[[], Awaitable[object]]) -> None:
        """Run forever (a daemon task): while offline, ``await probe()`` (a cheap store call,
        e.g. a one-key listing) every ``probe_interval`` seconds so the mount comes back
        online, and its uploads resume, without waiting for a file-system request; while it
        runs, only it probes (see the module doc). The probe's errors are the store's to
        report (they are expected while offline)."""
        self._watched = True
        _WATCHER_PROBE.set(True)  # this task's calls (its probes) may probe
        try:
            while True:
                await trio.sleep(self.probe_interval)
                if self.offline_since is not None and time.monotonic() >= self._next_probe:
                    try:
                        await probe()
                    except StoreError:
                        pass
        finally:
            self._watched = False

    def status(self) -> dict:
        """For ``ossfuse status``: {"online": bool, "offline_since": wall-clock seconds or None,
        "reason": the failure that took it offline or None}."""
        return {"online": self.offline_since is None, "offline_since": self.offline_since,
                "reason": self.last_error if self.offline_since is not None else None}


def say_once_offline(store: object, logger: logging.Logger, line: str, detail: object = "") -> None:
    """Log ``line`` (and ``: detail``) at INFO, once per outage of ``store`` (keyed by
    ``line``: :meth:`StoreHealth.first_time`; every time for a store without health): what
    an outage makes fail, which has its own WARNING."""
    health = getattr(store, "health", None)
    if health is None or health.first_time(line):
        logger.info("%s: %s" if detail else "%s%s", line, detail)


class _Confirm:
    """One confirming call (:meth:`StoreHealth.confirm_alive`): ``done`` once it ended,
    ``alive`` whether the store answered it."""

    __slots__ = ("done", "alive")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.alive = False


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


__all__ = ["StoreHealth", "StoreOffline", "DEFAULT_TIMEOUT", "say_once_offline"]
