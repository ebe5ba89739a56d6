"""Writes given up on without knowing their outcome ("in doubt"), and the check that one did
not take effect late, over a later write of this mount to the same key.

A write that got no answer (its request sent, the read timed out) or whose connection was
lost may still be carried out by the store after the mount went on: a PUT answered 68 s late
replaced the version an ``fsync`` had put since, and a delete batch deleted a file made again
(break-test trial I; OSS has no conditional PUT or DELETE, so no request can say "only if still
version X"). OSS refuses a request whose signed date is more than 15 minutes off its clock
(oss-rest-api.md, RequestTimeTooSkewed), which bounds when a request given up on can still
land: :data:`WINDOW` after it was sent.

:class:`InDoubt` keeps, per key, what each such request would leave there (the ETag of the
object it writes, OSS's MD5 of the body for a PUT, or :data:`DELETED`), and the last write
this mount made to that key since (``wrote``). ``check_due`` HEADs the keys that have both,
every ``interval`` seconds while the daemon runs (``watch``): when the key holds what the
request in doubt would leave, and not the later write, the request landed late, and is undone:
over this mount's later version, that version is put back from this machine's block cache
(``put_back``: the filesystem's, ``Commit.put_back``; one WARNING line); where it cannot be
(its blocks evicted, the file changed since), one ERROR line names the key, the request, when
it was given up and what the bucket now holds (the mount then sees that object as another
client's version). Over this mount's delete (or where it moved the file away from), an
upload of its own is its stale object and is deleted again (one WARNING; break trial BT16 F2:
a deleted file came back); any other request is said in one ERROR line, not undone (a rename's
late copy there may be a file's only copy: ``fs/latecopies.py`` keeps or takes it back). A
request in doubt whose window ended is forgotten. At unmount, ``pending`` lists the keys still
in their window (the daemon says so in one WARNING line).

The requests given up on, the later writes to their keys and the landings undone are also
kept in a file of the cache dir (:meth:`InDoubt.keep_in`, ``indoubt.log``), which the next
mount takes over (:func:`read_kept`): a crash or an unmount does not end a request's window
(break trial BT16 F1: after a `kill -9`, a PUT given up on landed at a name the user had
removed the file from, and stayed, silently), and one whose window ended while no mount ran
gets one look. Each landing found is one request (an upload and its retry leave one ETag:
each may land), noted as dealt with only once undone (a failed undo is tried again at each
check, also by the next mount).

A later mount of the same cache dir learns of a rename's copy given up on from the rename's
log (``fs/latecopies.py``, :meth:`InDoubt.given_up_earlier`), so that its own writes there are
noted too.

After a crash, the upload of each version recovered from the journal may have been sent by the
run that died (:meth:`InDoubt.sent_before_a_crash`): its ETag is not known, so its object is
told by its wrapped data key, and its window starts at the mount. Landed over a later write it
is undone like any other; landed where this mount has nothing any more (the file moved or
removed: ``ObjectStore.vacated``) it is this mount's stale object, and ``check_due`` deletes it.

Between the HEAD that finds a landing and the PUT or DELETE that undoes it, another client's
write to the key would be replaced (OSS has no conditional PUT): the window of every upload
(docs/semantics.md).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import trio

from ..envelope import H_KEY
from .base import ObjectInfo, StoreError, same_etag

log = logging.getLogger(__name__)

#: seconds after a request was sent during which OSS may still carry it out (its 15-minute
#: clock-skew limit on signed requests, plus a minute for clocks and queues)
WINDOW = 16 * 60.0
#: what a DELETE leaves at its key
DELETED = ""
#: the ETag of every empty object (OSS: the MD5 of its body)
EMPTY_ETAG = "D41D8CD98F00B204E9800998ECF8427E"
#: seconds between the checks of ``watch``
INTERVAL = 30.0
# what a put-back returns when this mount's newer save has replaced the late object since
# (nothing to undo: said at INFO)
REPLACED_SINCE = "a newer save of this mount has replaced it since"
# what a put-back returns when another put-back of the key ran meanwhile (it waited for that
# one, which said what came of it: nothing more to say)
PUT_BACK_ELSEWHERE = "another put-back of it ran meanwhile"


#: the effect of an upload whose ETag is not known (:meth:`InDoubt.sent_before_a_crash`)
_UNKNOWN = "\0unknown"


@dataclass
class _Doubt:
    op: str
    effect: str  # the ETag the request would leave, or DELETED (or _UNKNOWN: see ``wrapped``)
    until: float  # monotonic seconds: it cannot land after this
    given_up_at: float  # wall clock, for the log line
    later: str | None = None  # the ETag (or DELETED) this mount wrote there since; None: nothing yet
    # an upload of the run before a crash: the wrapped data key of its object (what tells it)
    wrapped: str | None = None
    repair_failed: bool = False  # landed, and undoing it (put-back, delete) failed (said once)
    earlier: bool = False  # given up on by an earlier run of this mount (InDoubt.given_up_earlier)
    last_look: bool = False  # its window ended while no mount ran: one look, then never again (read_kept)


#: the requests whose object is this mount's own upload (store/oss.py ``_call`` names them so)
_UPLOADS = frozenset({"PUT", "CompleteMultipartUpload"})


def _stale_own(d: _Doubt, info: ObjectInfo | None) -> bool:
    """Whether landed request ``d`` left this mount's own object where this mount has nothing
    any more: an upload (of the run before a crash, or one given up on), its file moved or
    removed since. Not a copy: a rename's late copy may be a file's only copy
    (fs/latecopies.py keeps or takes it back)."""
    return (d.wrapped is not None or d.op in _UPLOADS) and d.later == DELETED and info is not None


def _note_later(d: _Doubt, result: str, wrapped: str | None) -> None:
    """This mount wrote ``d``'s key since, leaving ``result`` (``wrapped``: the written
    object's wrapped data key): the same version as ``d``'s is harmless (no later write)."""
    same = same_etag(d.effect, result) or (wrapped is not None and wrapped == d.wrapped)
    d.later = None if same else result


def _given_up_line(d: _Doubt, key: str, now_wall: float, now: float) -> str:
    """The line of :meth:`InDoubt.keep_in`'s file for request ``d`` at ``key`` (its window's end
    in wall-clock seconds, from ``now`` monotonic = ``now_wall``)."""
    rec = {"op": d.op, "key": key, "effect": d.effect, "until": now_wall + (d.until - now), "at": d.given_up_at}
    if d.wrapped is not None:
        rec["wrapped"] = d.wrapped
    if d.last_look:
        rec["last_look"] = True
    return json.dumps(rec) + "\n"


def read_kept(path: str, now_wall: float | None = None) -> list[tuple[str, _Doubt]]:
    """The requests in doubt the file ``path`` of :meth:`InDoubt.keep_in` holds (key, request,
    its ``until`` in wall-clock seconds; [] when there is no file): its lines replayed in order
    (a request given up on, marked ``earlier``; a later write to its key; one dealt with), less
    those dealt with. A request whose window ended may still have landed while no mount ran
    (break trial BT16b F6: the next mount dropped it unlooked, and the removed file stayed):
    with a later write to compare, it gets one more check (``until`` a minute from
    ``now_wall``). A line that is not one (damaged, not UTF-8, an ``until`` that is no finite
    time) is skipped with one WARNING; a last line cut by a crash silently. Raises OSError."""
    now_wall = time.time() if now_wall is None else now_wall
    try:
        with open(path, encoding="utf-8", errors="replace") as f:  # (bytes that are no UTF-8: a damaged line)
            lines = f.read().splitlines()
    except FileNotFoundError:
        return []
    taken: dict[str, list[_Doubt]] = {}
    for n, line in enumerate(lines, 1):
        try:
            rec = json.loads(line)
            key = str(rec["key"])
            if "op" in rec:
                until, at = float(rec["until"]), float(rec["at"])
                if not (math.isfinite(until) and math.isfinite(at) and until - now_wall < 2 * WINDOW):
                    raise ValueError(f"not a time in the window: until {rec['until']!r}")
                wrapped = rec.get("wrapped")
                taken.setdefault(key, []).append(_Doubt(str(rec["op"]), str(rec["effect"]), until, at, earlier=True,
                                                        wrapped=None if wrapped is None else str(wrapped),
                                                        last_look=bool(rec.get("last_look"))))
            elif "settled" in rec:  # (landed, and dealt with: it cannot land again)
                doubts = taken.get(key, [])
                for d in doubts:
                    if same_etag(d.effect, str(rec["settled"])) and d.wrapped == rec.get("wrapped"):
                        doubts.remove(d)
                        break
            else:
                for d in taken.get(key, ()):
                    _note_later(d, str(rec["result"]), rec.get("wrapped"))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            if n < len(lines):  # (the last one may be cut by the crash: nothing to say)
                log.warning("%s, line %d: not a request in doubt (%s); skipped", path, n, e)
    out = []
    for key, doubts in taken.items():
        for d in doubts:
            if d.until < now_wall:
                if d.later is None or d.last_look:
                    continue  # (over, and nothing of this mount's there to compare with, or looked at)
                d.until, d.last_look = now_wall + 2 * INTERVAL, True  # (break trial BT16c: at every mount)
            out.append((key, d))
    return out


def _what(d: _Doubt) -> str:
    """The request in doubt ``d`` as a log line names it."""
    if d.wrapped is not None:
        return f"an {d.op}"
    if d.earlier:
        return f"a {d.op} an earlier run of this mount gave up on (no answer)"
    return f"a {d.op} this mount gave up on at {time.strftime('%H:%M:%S', time.localtime(d.given_up_at))} (no answer)"


class InDoubt:
    """The requests in doubt of one store (see the module doc). Runs on the trio thread: the
    store's worker threads report through :meth:`given_up` and :meth:`wrote`, which only
    append to and update plain dicts (atomic under the GIL)."""

    def __init__(self, window: float = WINDOW):
        self.window = window
        self._doubts: dict[str, list[_Doubt]] = {}
        # key → (monotonic seconds until which it counts, what this mount's last write left
        # there): this mount wrote the key after a request in doubt there; kept for the doubt's
        # window even once the doubt is settled (check, landed): what written_since answers
        self._written_after: dict[str, tuple[float, str]] = {}
        # called (key, what the write left, its ObjectInfo or None) at each such write, on the trio
        # thread (ObjectStore.on_write_after_doubt: fs/latecopies.py notes it in a rename's log at once)
        self.on_written: Callable[[str, str, ObjectInfo | None], None] = lambda key, result, info: None
        self._wake = trio.Event()  # set by landed_over: ``watch`` checks at once
        # one check_due at a time (the watch's and the unmount's last one): each HEADs, then
        # undoes what it found; two at once took twin requests of one ETag and sent two
        # unconditional DELETEs, the second able to meet a write made between them. Only
        # checks wait for it: no file-system request does.
        self._checking = trio.Lock()
        # key → the request a check has taken off the list and is undoing (``wrote`` still
        # updates it), and key → set once the check's DELETE of a stale upload there returned:
        # this mount's writes to the key wait for that first (``writing``; break trial BT16c: a
        # file re-created at the name was uploaded while the DELETE was in flight, and deleted)
        self._undoing: dict[str, _Doubt] = {}
        self._deleting: dict[str, trio.Event] = {}
        self._writing: dict[str, int] = {}  # key → this mount's writes there in flight (``writing``)
        self._kept_in: str | None = None  # the file that keeps them across runs (keep_in)

    def keep_in(self, path: str) -> int:
        """From now on, note each request given up on (:meth:`given_up`), each later write to
        its key (:meth:`wrote`) and each one dealt with in the file ``path`` (one JSON line
        each, flushed and fsynced: the daemon may be killed next), and first take over what an
        earlier run of this mount left there (:func:`read_kept`): a crash or an unmount does
        not end a request's window, and after a `kill -9` a PUT given up on that landed at a
        name the user had removed or moved the file from stayed there, silently (break trial
        BT16 F1). They are watched in this run also when the file cannot be rewritten (then
        OSError, and nothing more is noted: break trial BT16b F4, the earlier run's requests
        went unwatched). Returns how many were taken over."""
        now_wall, now = time.time(), time.monotonic()
        kept = 0
        lines = []
        for key, d in read_kept(path, now_wall):
            d.until = now + (d.until - now_wall)  # (wall clock in the file)
            self._doubts.setdefault(key, []).append(d)
            kept += 1
            lines.append(_given_up_line(d, key, now_wall, now))
            if d.later is not None:  # (a later write, replayed onto this one doubt alone)
                lines.append(json.dumps({"key": key, "result": d.later}) + "\n")
        tmp = path + ".new"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(lines)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        self._kept_in = path
        return kept

    def _keep(self, line: str) -> None:
        """Append ``line`` to the file of :meth:`keep_in`, if any (an OSError: one WARNING; the
        doubt still counts in this run)."""
        if self._kept_in is None:
            return
        try:
            with open(self._kept_in, "a", encoding="utf-8") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            log.warning("%s: cannot note a request in doubt (%s): a crash of this run would forget it", self._kept_in,
                        e)

    def _settled(self, key: str, d: _Doubt) -> None:
        """Request ``d`` at ``key`` landed and was dealt with (off the list already): said in
        the file of :meth:`keep_in` once done, not before (break trial BT16b F1: noted before
        its DELETE, which failed, the next check and the next mount no longer watched it)."""
        self._keep(json.dumps({"key": key, "settled": d.effect, "wrapped": d.wrapped}) + "\n")

    def _forget(self, key: str, d: _Doubt) -> None:
        """Take request ``d`` off ``key``'s list, and say it was dealt with (:meth:`_settled`)."""
        self._doubts[key].remove(d)
        if not self._doubts[key]:
            del self._doubts[key]
        self._settled(key, d)

    def _reinstate(self, key: str, d: _Doubt) -> None:
        """Request ``d``, found landed (:meth:`_landed`), is not dealt with yet: back on the
        list (its file still has it: :meth:`_settled` was not said)."""
        self._doubts.setdefault(key, []).append(d)

    def given_up(self, op: str, key: str, effect: str) -> None:
        """Request ``op`` on ``key`` got no answer (or its connection was lost): it may still
        leave ``effect`` there (an ETag, or DELETED) within the window."""
        d = _Doubt(op, effect, time.monotonic() + self.window, time.time())
        self._doubts.setdefault(key, []).append(d)
        self._keep(_given_up_line(d, key, time.time(), time.monotonic()))

    def given_up_earlier(self, op: str, key: str, effect: str, until: float) -> None:
        """Request ``op`` on ``key``, given up on by an earlier run of this mount (a rename's
        copy: its log, fs/latecopies.py), may still leave ``effect`` there until ``until``
        (wall-clock seconds): this mount's writes there are noted as after any request in
        doubt (:meth:`wrote`; break trial BT15: they were not, and a later mount's write at a
        failed rename's new name was lost to the copy landing over it)."""
        self._doubts.setdefault(key, []).append(
            _Doubt(op, effect, time.monotonic() + (until - time.time()), time.time(), earlier=True))

    def sent_before_a_crash(self, key: str, wrapped: str) -> None:
        """An upload to ``key`` of the object whose wrapped data key is ``wrapped`` may have
        been sent by the run before a crash (a version recovered from the journal): it may land
        within the window from now (trial BT10: a PUT held 8 s landed over the next mount's
        newer save, silently; a `mv` or `rm` of the file brought the old name back)."""
        for d in self._doubts.get(key, ()):
            if d.wrapped == wrapped:
                return  # (taken over from the file already: its window runs from the first crash)
        d = _Doubt("upload sent before the daemon's crash", _UNKNOWN, time.monotonic() + self.window, time.time(),
                   wrapped=wrapped)
        self._doubts.setdefault(key, []).append(d)
        # (kept in the file too: once the file is removed or moved, the journal no longer names
        # it, and a second crash forgot it; break trial BT16c)
        self._keep(_given_up_line(d, key, time.time(), time.monotonic()))

    @contextlib.asynccontextmanager
    async def writing(self, key: str) -> AsyncIterator[None]:
        """Around each write of this mount's to ``key`` (the store's PUT, Complete, copy): it
        starts once no check is deleting a stale upload there (at once, nearly always), and
        while it runs no check starts one (:meth:`_delete_stale`)."""
        while (done := self._deleting.get(key)) is not None:
            await done.wait()
        self._writing[key] = self._writing.get(key, 0) + 1
        try:
            yield
        finally:
            self._writing[key] -= 1
            if not self._writing[key]:
                del self._writing[key]

    def wrote(self, key: str, result: str, wrapped: str | None = None, info: ObjectInfo | None = None) -> None:
        """This mount's write to ``key`` succeeded, leaving ``result`` (an ETag, or DELETED;
        ``wrapped``: the wrapped data key of the object put; ``info``: the object written, its
        size and user metadata, when known): a request in doubt that would leave something
        else is now worth checking."""
        if (undoing := self._undoing.get(key)) is not None:
            _note_later(undoing, result, wrapped)
        doubts = self._doubts.get(key)
        if not doubts:
            return
        for d in doubts:
            _note_later(d, result, wrapped)
        self._keep(json.dumps({"key": key, "result": result, "wrapped": wrapped}) + "\n")
        if any(d.later is not None for d in doubts):
            self._written_after[key] = (max(d.until for d in doubts), result)
            self.on_written(key, result, info)

    def landed(self, key: str, etag: str) -> None:
        """A request in doubt that leaves ``etag`` at ``key`` was seen there, and dealt with
        (a rename's late copy, taken back or adopted: fs/latecopies.py): it cannot land again;
        the oldest such request is forgotten (trial AI: a later check blamed it for another)."""
        for d in self._doubts.get(key, []):
            if same_etag(d.effect, etag):
                self._forget(key, d)
                break

    def has(self, key: str) -> bool:
        """Whether a request given up on may still take effect at ``key`` (within its window)."""
        now = time.monotonic()
        return any(d.until >= now for d in self._doubts.get(key, ()))

    def written_since(self, key: str) -> str | None:
        """What this mount's last write to ``key`` left there (an ETag, or DELETED) when it came
        after a request in doubt there whose window is not over (also once that request is
        settled: trial AK, a check that saw it land forgot it, and the mount's own `rm` was
        undone), else None."""
        until, result = self._written_after.get(key, (0.0, ""))
        if until < time.monotonic():
            self._written_after.pop(key, None)
            return None
        return result

    def due(self) -> list[str]:
        """Keys with a request in doubt and a later write of this mount to check against."""
        now = time.monotonic()
        for key in [k for k, ds in self._doubts.items() if all(d.until < now for d in ds)]:
            del self._doubts[key]
        for key in [k for k, (until, _) in self._written_after.items() if until < now]:
            del self._written_after[key]
        return [k for k, ds in self._doubts.items() if any(d.later is not None for d in ds)]

    def check(self, key: str, info: ObjectInfo | None) -> bool:
        """Compare what ``key`` holds now (``info``; None: nothing) with its requests in doubt;
        True when one landed late over this mount's later write (logged, not repaired: see
        :meth:`check_due`; that request forgotten)."""
        d = self._landed(key, info)
        if d is not None:
            self._say_landed(key, d, info)
            self._settled(key, d)
        return d is not None

    def landed_over(self, key: str, info: ObjectInfo) -> bool:
        """Whether ``info``, seen at ``key`` (a lookup's or an upload's HEAD), is what a request
        in doubt there leaves, landed over this mount's later version: the mount is not to take
        it for another client's version (a break trial: a `stat` between the landing and the
        next check made the mount adopt the late object, and the check then had nothing to put
        back). Changes nothing; wakes :meth:`watch`, which undoes it at once."""
        for d in self._doubts.get(key, ()):
            if (d.later is not None and d.later != DELETED and self._leaves(d, info)
                    and not same_etag(info.etag, d.later)):
                self._wake.set()
                return True
        return False

    @staticmethod
    def _leaves(d: _Doubt, info: ObjectInfo | None) -> bool:
        """Whether ``info`` (None: nothing) is what request ``d`` leaves."""
        now_holds = info.etag if info is not None else DELETED
        if d.wrapped is not None:  # (told by its wrapped data key: its ETag is not known)
            return info is not None and info.metadata.get(H_KEY) == d.wrapped
        # every empty object's ETag is the MD5 of nothing: one there may be anyone's (break
        # trial BT16c: another client's empty file was deleted, and put-back over; a PUT the
        # store refused was said to have landed)
        return same_etag(now_holds, d.effect) and not same_etag(d.effect, EMPTY_ETAG)

    def _landed(self, key: str, info: ObjectInfo | None) -> _Doubt | None:
        """The request found landed late at ``key``, taken off the list (the oldest that
        leaves what is there: two requests of one version, an upload and its retry, leave the
        same ETag, and the other may land after this one is undone: break trial BT16b F2), or
        None. The caller deals with it, then :meth:`_settled`, or puts it back on the list."""
        now_holds = info.etag if info is not None else DELETED
        for d in self._doubts.get(key, ()):
            if d.later is None or not self._leaves(d, info) or same_etag(now_holds, d.later):
                continue
            self._doubts[key].remove(d)
            if not self._doubts[key]:
                del self._doubts[key]
            return d
        return None

    @staticmethod
    def _say_landed(key: str, d: _Doubt, info: ObjectInfo | None, more: str = "") -> None:
        """One ERROR line: ``d`` landed at ``key`` over this mount's later write; ``info``: what
        the key holds now."""
        log.error("%r: %s took effect late, over this mount's %s; the bucket now holds %s%s", key, _what(d),
                  "delete" if d.later == DELETED else f"later version {d.later}",
                  "nothing there" if info is None else f"that request's version {info.etag}", more)

    async def check_due(self, head: Callable[[str], Awaitable[ObjectInfo | None]],
                        delete: Callable[[str, str], Awaitable[None]] | None = None,
                        put_back: Callable[[str, str, ObjectInfo | None], Awaitable[str | None]] | None = None) -> int:
        """One pass of :meth:`check` over the keys :meth:`due` lists (a HEAD each; one that
        fails is tried at the next pass), repairing what landed: a request found landed where
        this mount has nothing any more left this mount's own stale object there, and
        ``delete(key, etag)`` removes it (that version only); one found landed over this
        mount's later version is undone by ``put_back(key, later_etag, now_there)``, which
        puts that version back and returns None, or :data:`REPLACED_SINCE` (INFO), or
        :data:`PUT_BACK_ELSEWHERE` (nothing said; checked again), or returns why it cannot (one
        ERROR line then says what the bucket holds). One pass at a time (``_checking``).
        Returns how many landed late."""
        async with self._checking:
            return await self._check_due(head, delete, put_back)

    async def _check_due(self, head: Callable[[str], Awaitable[ObjectInfo | None]],
                         delete: Callable[[str, str], Awaitable[None]] | None,
                         put_back: Callable[[str, str, ObjectInfo | None], Awaitable[str | None]] | None) -> int:
        """:meth:`check_due`'s pass (``_checking`` held)."""
        landed = 0
        for key in self.due():
            try:
                info = await head(key)
            except StoreError:
                continue
            self._repaired_since(key, info)
            d = self._landed(key, info)
            if d is None:
                continue
            landed += 1
            if _stale_own(d, info):
                assert info is not None  # (_stale_own)
                if await self._delete_stale(key, d, info, delete):
                    self._settled(key, d)
                else:  # (the store, for now, or this mount wrote there since the HEAD: the next
                    self._reinstate(key, d)  # check looks again; break trial BT16b F1)
                continue
            if d.later == DELETED:
                # over this mount's delete: said, not undone (the late object may be a file's
                # only copy: a rename's late copy is fs/latecopies.py's to keep or take back)
                self._say_landed(key, d, info)
                self._settled(key, d)
                continue
            assert d.later is not None  # (_landed)
            why = "nothing here puts it back" if put_back is None else None
            if put_back is not None:
                try:
                    why = await put_back(key, d.later, info)
                except StoreError as e:  # (the store, for now: the next check tries again)
                    self._reinstate(key, d)
                    log.log(logging.DEBUG if d.repair_failed else logging.ERROR,
                            "%r: %s took effect late, over this mount's later version %s; putting that version "
                            "back failed: %s; tried again at each check while the request's window lasts", key,
                            _what(d), d.later, e)
                    d.repair_failed = True
                    continue
            if why == PUT_BACK_ELSEWHERE:  # (a late copy's watch: the next check looks again)
                self._reinstate(key, d)
                continue
            if why is None:
                log.warning("%r: %s took effect late, over this mount's later version %s; that version is put back "
                            "(from this machine's cache)", key, _what(d), d.later)
            elif why == REPLACED_SINCE:
                log.info("%r: %s took effect late, over this mount's later version %s; %s", key, _what(d), d.later,
                         why)
            else:
                self._say_landed(key, d, info, f"; not repaired: {why}")
            self._settled(key, d)
        return landed

    def _repaired_since(self, key: str, info: ObjectInfo | None) -> None:
        """Forget the requests at ``key`` whose landing a put-back failed to undo (said as an
        ERROR) once ``info`` shows this mount's version there again (the put-back's own
        request, given up on, landed; or a later upload): one WARNING line says so (a break
        trial: the ERROR was the last word while the bucket was right)."""
        for d in list(self._doubts.get(key, ())):
            if d.repair_failed and info is not None and same_etag(info.etag, d.later):
                self._forget(key, d)
                log.warning("%r: this mount's version %s is in the bucket again, over what %s had left there "
                            "(the put-back said failed above landed, or a later upload did it)", key, d.later,
                            _what(d))

    async def _delete_stale(self, key: str, d: _Doubt, info: ObjectInfo,
                            delete: Callable[[str, str], Awaitable[None]] | None) -> bool:
        """Delete this mount's stale object ``info`` that landed request ``d`` left at ``key``,
        unless this mount wrote the key since the HEAD that found it, or writes it now
        (``d.later`` no longer DELETED, a write in flight: False, nothing said; the next check
        looks again); this mount's writes there wait for the DELETE (:meth:`writing`). False
        when the DELETE failed (one ERROR line, then DEBUG at each try again)."""
        self._undoing[key] = d
        try:
            if d.later != DELETED or self._writing.get(key):
                return False
            done = self._deleting[key] = trio.Event()
            try:
                if delete is None:
                    raise StoreError("nothing here deletes it")
                await delete(key, info.etag)
            finally:
                del self._deleting[key]
                done.set()
        except StoreError as e:
            log.log(logging.DEBUG if d.repair_failed else logging.ERROR,
                    "%r: %s took effect late, after this mount had moved or removed that file; deleting its object "
                    "there (version %s) failed: %s; tried again at each check", key, _what(d), info.etag, e)
            d.repair_failed = True  # (said once)
            return False
        finally:
            del self._undoing[key]
        log.warning("%r: %s took effect late, after this mount had moved or removed that file; its object "
                    "there (version %s) is deleted again", key, _what(d), info.etag)
        return True

    async def watch(self, head: Callable[[str], Awaitable[ObjectInfo | None]],
                    delete: Callable[[str, str], Awaitable[None]] | None = None,
                    put_back: Callable[[str, str, ObjectInfo | None], Awaitable[str | None]] | None = None,
                    interval: float = INTERVAL) -> None:
        """Run forever (a daemon task): :meth:`check_due` every ``interval`` seconds, and at
        once when :meth:`landed_over` saw a landing."""
        while True:
            with trio.move_on_after(interval):
                await self._wake.wait()
            self._wake = trio.Event()
            await self.check_due(head, delete, put_back)

    def pending(self) -> list[str]:
        """Keys whose request in doubt may still land over a later write of this mount (not
        one whose window ended while no mount ran: it can only have landed, and was looked at;
        nor one that landed and whose undo failed: :meth:`stale_left`, said already)."""
        return [k for k in self.due() if any(not d.last_look and not d.repair_failed for d in self._doubts[k])]

    def stale_left(self) -> list[str]:
        """Keys where a late upload of this mount's stale object landed and deleting it again
        failed (said; the next check, or the next mount, tries again)."""
        return [k for k, ds in self._doubts.items() if any(d.repair_failed and d.later == DELETED for d in ds)]

    def earlier_only(self, key: str) -> bool:
        """Whether every request in doubt at ``key`` was sent by an earlier run
        (:meth:`given_up_earlier`, :meth:`sent_before_a_crash`), none by this one."""
        return all(d.earlier or d.wrapped is not None for d in self._doubts.get(key, ()))


__all__ = ["InDoubt", "DELETED", "WINDOW"]
