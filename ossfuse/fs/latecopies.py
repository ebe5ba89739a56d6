"""Copies of an undone rename that land late, looked for and taken back.

A directory rename that is undone (``fs/renames.py``: a copy failed, or a crash cut it off
while copying) deletes each copy whose original is still there. A copy sent but not logged
that is not there may still land: OSS carries a request out until ``indoubt.WINDOW`` after it
was sent (a trial: copies in flight at a ``kill -9`` landed after the next mount's undo, and
stayed at the new name for good). The rename's log then stays (line 4, ``fs/renamelog.py``),
and the running mount looks for those keys until then (:class:`~.renamelog.LateCopies`): at
growing intervals, and whenever a lookup or listing is about a path at, above or below the
rename's target; a copy found is taken back when it is its original's copy
(:func:`same_object`: the same wrapped data key), and the replaced empty directory's marker is
put back when its own late copy was taken back.

A file rename whose one copy got no answer and is not at the new name fails, and its copy is
watched the same way (``Namespace._move_file``; after a crash, ``renames._settle_file``): see
:func:`_look_file` (a copy that lands over the file it replaces finishes the rename instead,
since that file is gone; one that lands over a version this mount wrote there since is
replaced by that version, put back from the block cache: ``Commit.put_back``) and
:func:`take_back_at` (an upload to the new name, or a directory rename above it, meeting the
late copy takes it back first).

Lock order: :func:`_look` takes the rename's tree locks (``NameLocks.hold``) after its HEADs,
and sends the deletes under them; nothing else is held across those awaits. :func:`_look_file`'s
put-back runs after it released them (it takes the file's upload lock). :func:`take_back_at`
takes none: its callers hold what keeps a rename of the key away (an upload, the node lock of
the key's file; a directory rename, the tree lock above it), and taking a rename lock there
would invert the order (name locks before node locks).
"""
from __future__ import annotations

import errno
import functools
import logging
import os
import time
from collections.abc import Awaitable, Callable

from .. import envelope as env
from .. import integrity
from ..aio import run_all
from ..store.base import ObjectInfo, ObjectStore, StoreError, etag_norm, same_etag
from ..store.indoubt import DELETED, PUT_BACK_ELSEWHERE, REPLACED_SINCE, WINDOW
from .copying import delete_version
from .errors import FsError
from .locks import NameLocks
from .naming import Naming
from .renamelog import LATE_FIRST_LOOK, LateCopies, RenameLog, RenameLogs, moved_key

log = logging.getLogger(__name__)

# put_back(key, etag, now_there, known) -> None once this mount's version etag is back at key,
# else why not (Commit.put_back; known: the version's (size, metadata) from the rename's log)
PutBack = Callable[[str, str, ObjectInfo | None, tuple[int, dict[str, str]] | None], Awaitable[str | None]]
# in_use(path, writing): whether this mount holds the file at path changed (not yet uploaded, or
# its upload running) or open (with ``writing``: open for writing; a reader uploads nothing)
InUse = Callable[[str, bool], bool]

SETTLE_PARALLEL = 16  # objects settled at once (as a rename's copies: namespace.RENAME_PARALLEL)
LATE_WINDOW = WINDOW  # seconds after it was sent during which OSS may carry a request out (store/indoubt.py)
LATE_LAST_STEP = 60.0  # seconds: the longest time between two looks
NEAR_INTERVAL = 1.0  # seconds: the shortest time between two looks a lookup or listing asks for


def originals_by_copy(entry: RenameLog, naming: Naming) -> dict[str, tuple[str, str]]:
    """Directory rename ``entry``'s new keys → (the original's key, its logged ETag)."""
    old, new = naming.dir_key(entry.source), naming.dir_key(entry.target)
    return {moved_key(key, old, new, naming.prefix): (key, etag) for key, etag in entry.objects.items()}


async def put_back_replaced(store: ObjectStore, entry: RenameLog, naming: Naming) -> None:
    """Put back the marker of the empty directory undone rename ``entry`` replaced, if none is
    there. Raises StoreError."""
    new = naming.dir_key(entry.target)
    if entry.replaced is not None and await store.head(new) is None:
        await store.put_bytes(new, b"", entry.replaced)


async def take_back(store: ObjectStore, target: str, there: ObjectInfo, key: str | None, etag: str | None,
                     copy_etag: str | None) -> int:
    """Delete ``there``, what an undone rename finds at ``target``: the copy of original
    ``key`` (logged ETag ``etag``; None: not one of the rename's), logged as ``copy_etag``
    (None: sent, not logged). Returns 1 when it stays (its original is gone, or it is not shown
    to be the original's copy, or it changed since), else 0. Raises StoreError, FsError."""
    original = await store.head(key) if key is not None else None
    if original is None:
        return 1  # the original is gone: the copy may be its only one
    if copy_etag is None and not (same_etag(original.etag, etag) and same_object(there, original)):
        return 1  # sent, not logged, and not shown to be a copy of the original: maybe another client's
    # a logged copy goes even when another client rewrote its original since: the old name
    # holds the newer version, and a stale copy left at the new name made coreutils' `mv`,
    # retrying, move the tree into it (a trial)
    try:
        await delete_version(store, target, copy_etag or there.etag, head=there)
    except FsError as e:
        if e.errno != errno.ESTALE:
            raise
        return 1  # changed at the new name since: kept (logged)
    return 0

def watch_or_end(logs: RenameLogs, entry: RenameLog, store: ObjectStore, since: float | None = None) -> bool:
    """After ``renames.undo`` of ``entry``: watch its late copies (:class:`LateCopies`, the log
    stays) when some were not found and may still land, else end its log. ``since``: the
    wall-clock time its last copy was sent, by an earlier run (a crash: any copy sent and not
    logged may have been in flight; a local bucket's requests never land late, each is done
    when it returns); None: by this run, which knows which copies got no answer
    (``store.may_still_land``: a copy that failed with an answer, or was cancelled between
    attempts, will not land). True when watched."""
    if since is None:
        entry.late = {t for t in entry.late if store.may_still_land(t)}
        since = time.time()
    if store.local_disk or not entry.late or not watch(logs, entry, since + LATE_WINDOW):
        logs.end(entry)
        return False
    try:  # line 4: a later mount only looks for the late copies, never undoes it again (the
        # logged copies' ETags match what a user makes there since: every empty object's; trial AE)
        entry.append_closed(entry.line4(entry.late, entry.undone_until))
    except OSError as e:
        log.warning("rename log %s: cannot note that the rename of %r was undone (%s); a later mount undoes it "
                    "again", entry.path, entry.source, e)
    return True


def watch(logs: RenameLogs, entry: RenameLog, until: float) -> bool:
    """Look for ``entry.late`` until ``until`` (wall clock), if that is still to come (True);
    else False (the caller ends the log)."""
    if time.time() >= until:
        return False
    logs.leave(entry)  # (this run's: its log file is closed, and stays)
    logs.detach(entry)  # (a file rename's lines leave the shared log)
    entry.undone_until = until
    known = ({etag_norm(entry.written_after): entry.written_version}
             if entry.written_after and entry.written_version is not None else {})  # (an earlier run's)
    logs.watched.append(LateCopies(entry, set(entry.late), until, time.time() + LATE_FIRST_LOOK,
                                   over=dict(entry.late_over), versions=known))
    return True

def clock_text(t: float) -> str:
    return time.strftime("%H:%M", time.localtime(t))


async def look_for_late_copies(logs: RenameLogs, store: ObjectStore, naming: Naming, locks: NameLocks,
                               near: str | None = None, changed: Callable[[str], None] = lambda path: None,
                               in_use: InUse = lambda path, writing: False,
                               put_back: PutBack | None = None) -> int:
    """One look for the late copies of the watched renames (:class:`LateCopies`) that are due,
    or, with ``near`` (a path a lookup or listing is about), of those whose target is at, above
    or below it (above or below: at most once a second, for a listing's many lookups) (a copy
    that landed between two looks showed its directory, and coreutils' `mv` moved the tree
    *into* it: trial AE). See :func:`_look`.
    A rename whose window ended (or whose copies all landed) ends its log. ``changed(path)``:
    called for both paths of a file rename a late copy finished (the mount's view of them is
    out of date); ``in_use(path, writing)`` (:data:`InUse`): whether this mount holds the file
    at ``path`` changed or open (a late copy does not finish a rename by deleting it, nor over
    a file open for writing, whose upload would replace the copy); ``put_back(key, etag,
    now_there)``: puts this mount's version ``etag`` of ``key`` back over ``now_there`` and
    returns None, or returns why it cannot (``Commit.put_back``): a file rename's copy that
    landed over a version this mount wrote there since is replaced by it (:func:`_look_file`).
    Returns how many copies were taken back (or replaced)."""
    taken = 0
    now = time.time()
    for late in list(logs.watched):
        if near is None:
            if now < late.next_at:
                continue
            late.step = min(late.step * 2, LATE_LAST_STEP)
            late.next_at = now + late.step
        elif not (_within(near, late.entry.target) or _within(late.entry.target, near)) \
                or (near != late.entry.target and now - late.looked_at < NEAR_INTERVAL):
            continue  # (the target itself, what `mv` stats, is looked at every time)
        late.looked_at = now
        taken += await _look(late, store, naming, locks, changed, in_use, put_back)
        if late in logs.watched and (not late.targets or time.time() >= late.until):
            logs.watched.remove(late)
            logs.end(late.entry)
    return taken


async def _look(late: LateCopies, store: ObjectStore, naming: Naming, locks: NameLocks,
                changed: Callable[[str], None], in_use: InUse, put_back: PutBack | None) -> int:
    """A HEAD of each of ``late``'s targets; those that landed are taken back when they are
    their original's copies (:func:`take_back`, which needs the same object: a directory or
    empty file made there since is not one), under the rename's tree locks (no rename of those
    paths runs meanwhile: a retried `mv` that moved the tree took its originals away, and its
    copies stay), one line for all; either way a key that landed is no longer looked for. The
    replaced empty directory's marker goes back only when a late copy of the marker itself was
    taken back (not when the user removed that directory since: trial AE). A file rename's
    copy: :func:`_look_file`. A store that fails leaves the look to the next time (INFO).
    Returns how many were taken back."""
    entry = late.entry
    if entry.file:
        return await _look_file(late, store, naming, locks, changed, in_use, put_back)
    back: list[str] = []
    stay: list[str] = []
    try:
        seen: dict[str, ObjectInfo | None] = {}

        async def head(t: str) -> None:
            seen[t] = await store.head(t)
        # at once, not one after another (trial AF: a lookup of the new name waited 16 HEADs)
        await run_all([functools.partial(head, t) for t in late.targets], SETTLE_PARALLEL)
        for t, was in list(late.over.items()):
            now = seen.get(t)
            if now is None:
                late.over[t] = None  # removed since: a late copy there is taken back, not replaced
            elif was is not None and same_etag(now.etag, was.etag) and same_object(now, was):
                seen[t] = None  # what was there at the start: nothing landed yet
        landed = sorted(t for t, there in seen.items() if there is not None)
        if not landed:
            return 0
        async with locks.hold(trees=[entry.source, entry.target]):
            by_target = originals_by_copy(entry, naming)
            for target in landed:
                there = await store.head(target)
                if there is None:
                    continue
                key, etag = by_target.get(target, (None, None))
                (stay if await take_back(store, target, there, key, etag, None) else back).append(target)
                late.targets.discard(target)
            marker = naming.dir_key(entry.target)
            if marker in back and late.over.get(marker, True) is not None:
                await put_back_replaced(store, entry, naming)
    except (StoreError, FsError) as e:
        log.info("looking for late copies of the rename of %r to %r failed (%s); looked for again later",
                 entry.source, entry.target, e)
    if back or stay:
        late.note_left()
    if back:
        log.warning("%d copy(ies) the undone rename of %r to %r had sent without an answer landed late (e.g. %r): "
                    "taken back", len(back), entry.source, entry.target, back[0])
    if stay:
        log.info("%d key(s) the undone rename of %r to %r had sent copies to hold something else now (e.g. %r: "
                 "moved or removed since, or made anew): left alone", len(stay), entry.source, entry.target, stay[0])
    return len(back)


async def take_back_at(logs: RenameLogs, store: ObjectStore, naming: Naming, key: str, there: ObjectInfo | None,
                       where: str = "where this mount writes", may_finish: bool = False,
                       uploading: bool = True) -> str | None:
    """When ``there`` (what is at ``key``; None: HEAD it) is the late copy of a failed file
    rename this mount watches (:func:`is_its_copy`), settle it before it is taken for another
    client's version: by an upload to ``key`` (a trial: a new file written where the late copy
    landed went to a conflict copy, then the watch took the late copy back: the name was
    empty), or by a directory rename that would move it to its new name, where no watch looks
    (a trial: the file stayed at both names). It is deleted (by its ETag; returns ``key``);
    or, ``may_finish`` (a directory rename) and landed over the object it was to replace
    (:func:`_finishes`; trial AI: taken back, that file was at neither name), the rename is
    finished (:func:`_settle_landed`; returns the original's key), the copy stays. None when
    ``there`` is no such copy, or it could not be settled. No rename locks: the caller holds
    the node lock of ``key``'s file, which any rename onto it waits for, or the tree lock
    above it; ``where``: for the log line; ``uploading``: the caller is an upload to ``key``,
    whose newer version replaces what the copy took the place of. Raises StoreError."""
    for late in logs.watched:
        entry = late.entry
        if not entry.file or key not in late.targets:  # (a file rename's one target)
            continue
        there = there or await store.head(key)
        if there is None:
            return None
        [(okey, _etag)] = entry.objects.items()
        original = await store.head(okey)
        if not is_its_copy(entry, there, original):
            continue
        outcome = await _settle_landed(late, store, key, there, original, may_finish, where,
                                       uploading=uploading)
        return None if outcome is None else okey if outcome == "finished" else key
    return None


def is_its_copy(entry: RenameLog, there: ObjectInfo, original: ObjectInfo | None) -> bool:
    """Whether ``there`` is file rename ``entry``'s copy: it holds the wrapped data key of the
    version copied (``entry.copy_key``: also when the original was rewritten or moved since;
    trial AK: rewritten right after the copy landed, it was not taken back); not known, the
    same object as the original (:func:`same_object`) while that is still the version logged.
    Not the ETag alone: every empty object's is the same. Never the original itself, moved
    there by this mount since (``RenameLogs.follow``; trial AK: taken for the copy, the file
    was deleted): the look goes on, for a late copy once it moves away again."""
    [(key, etag)] = entry.objects.items()
    if key == there.key:
        return False
    if entry.copy_key is not None:
        return there.metadata.get(env.H_KEY) == entry.copy_key
    return original is not None and same_etag(original.etag, etag) and same_object(there, original)


async def _settle_landed(late: LateCopies, store: ObjectStore, target: str, there: ObjectInfo,
                         original: ObjectInfo | None, may_finish: bool, where: str,
                         in_use: InUse = lambda path, writing: False, why: str = "",
                         uploading: bool = False) -> str | None:
    """File rename ``late``'s copy landed as ``there`` at ``target``: take it back (delete it
    by its ETag) while its original (``original``: what is at its key now) is there, in any
    version (gone, moved by another client say, the copy may be the file's only one: it stays,
    as :func:`take_back` keeps one); or, ``may_finish`` and :func:`_finishes` and this mount
    neither holds the new name open for writing nor changed (else it is taken back), finish the
    rename (delete the original, if it is still the version copied and the same object, and
    this mount holds it neither open nor changed: ``in_use(path, False)``, trial AL: deleted under an
    open writer, it came back with the writer's close; else the copy stays as the new name's
    file and the original where it is). One line; the target is no
    longer looked for (``why``: why this mount's later version there was not put back instead,
    for the ERROR line; ``uploading``: an upload of a newer version replaces it next, nothing
    of the file's is lost, WARNING). Returns "back", "finished", "kept", or None when a delete failed
    (changed since, or the store: logged; looked for again)."""
    entry = late.entry
    [(key, etag)] = entry.objects.items()
    later = entry.written_after
    outcome = "back"
    try:
        # (the new name open for writing or changed here: the user writes it, and their upload
        # would replace the copy, the original's only one once the finish deleted it; a break
        # trial. Open to read only, it finishes: taking it back left neither file at the new
        # name, trial BT15b M1)
        if may_finish and _finishes(entry) and not in_use(entry.target, True):
            if original is not None and same_etag(original.etag, etag) and same_object(there, original) \
                    and not in_use(entry.source, False):
                await delete_version(store, key, etag, head=original)
                outcome = "finished"
            else:
                outcome = "kept"
        elif original is None:
            outcome = "kept"
        else:
            await delete_version(store, target, there.etag, head=there)
    except FsError:
        return None
    late.targets.discard(target)
    store.landed_late(target, there.etag)
    late.note_left()
    what = f"the copy the failed rename {entry.named()} had sent without an answer"
    if outcome == "finished":
        log.warning("%s landed late %s %r, over what was there: the rename is finished (%r deleted)", what, where,
                    target, key)
    elif outcome == "kept":  # (what is there holds the version copied; nothing is deleted)
        log.info("%s is at %r, or what is there holds the version it copied, while its original changed, went or "
                 "is open here since: left as it is", what, target)
    elif later is not None and later != DELETED and uploading:
        log.warning("%s landed late %s %r, over the version %s this mount had written there since: taken back; "
                    "this mount's upload of a newer version of the file goes there now", what, where, target, later)
    elif later is not None and later != DELETED:
        log.error("%s landed late %s %r, over the version %s this mount had written there since: taken back; that "
                  "version is no longer in the bucket (OSS cannot make a copy conditional on what it replaces)%s",
                  what, where, target, later, why)
    else:
        log.warning("%s landed late %s %r: taken back", what, where, target)
    return outcome


def _finishes(entry: RenameLog) -> bool:
    """Whether file rename ``entry``'s copy, landed late, finishes the rename rather than being
    taken back: it was to replace an object there (``replacing``: off once a look found the
    name empty), and this mount did not write there since (``written_after``: its `rm`, an
    upload, a retried `mv`; trial AI, the mount's own later `rm b` was undone and a deleted)."""
    return entry.replacing and entry.written_after is None


def written_now(logs: RenameLogs, key: str, result: str, info: ObjectInfo | None = None) -> None:
    """This mount just wrote ``key`` (``result``: an ETag, or DELETED; ``info``: the object
    written, None for a delete) after a write there it gave up on
    (``ObjectStore.on_write_after_doubt``): a watched file rename whose new name it is notes it
    in its line 4 at once (the store forgets it with the process; trial AM: a `kill -9` before
    the next look, and the next mount finished a rename whose new name the user had rewritten
    or removed), with that version's size and user metadata, so that a later mount that never
    looks the file up can still put it back over the late copy (``Commit.put_back``; break
    trial BT14 3: an ERROR, the version lost). Every write counts: an upload, a rename onto
    the name, a chmod's metadata copy (break trial BT15: after a remount, a rename's version
    was lost and a chmod undone)."""
    written = (info.size, dict(info.metadata)) if info is not None and result != DELETED else None
    etag = etag_norm(result)
    for late in logs.watched:
        entry = late.entry
        if not (entry.file and key in late.targets):  # (its one target)
            continue
        version = written
        if version is not None and env.H_KEY in version[1]:
            late.versions[etag] = version
        elif version is not None:
            # a copy whose caller knew the source's metadata only in part (a directory rename of
            # a file it never opened): the same ETag is the same object, as known before (break
            # trial BT15b: a directory moved away and back lost the version kept)
            version = late.versions.get(etag)
        if (entry.written_after, entry.written_version) != (result, version):
            entry.written_after, entry.written_version = result, version
            late.foreign = None  # (what another client wrote before is not under this one)
            late.note_left()


def versions_to_keep(logs: RenameLogs, naming: Naming) -> list[tuple[str, str, int]]:
    """(key, ETag, size in bytes) of each version the rename logs an earlier run left may put
    back over a late copy (:func:`written_now`), whose cached file the block cache keeps also
    without a clean unmount's index (``BlockCache``'s ``keep``; break trial BT15: after a
    `kill -9`, the cache deleted it, and the version was lost to the landing). Only versions
    with integrity tags: nothing else vouches for such a file."""
    out = []
    for entry in logs.left:
        if entry.file and entry.written_after not in (None, DELETED) and entry.written_version is not None:
            size, meta = entry.written_version
            try:
                tagged = integrity.parse(meta) is not None
            except integrity.IntegrityError:
                tagged = False
            if tagged:
                assert entry.written_after is not None  # (checked above)
                out.append((naming.key(entry.target), entry.written_after, size))
    return out


def note_in_doubt(store: ObjectStore, entry: RenameLog, naming: Naming) -> None:
    """Tell ``store`` that the late copies of ``entry``, watched by this mount after an earlier
    run gave up on them, may still land until its window ends: as the run that sent them
    knew, so that this mount's writes to those keys are noted too (:func:`written_now`; break
    trial BT15: they were not, and a remount's write at a failed rename's new name was lost to
    the landing, the rename "finished")."""
    assert entry.undone_until is not None
    if entry.file:
        [(_key, etag)] = entry.objects.items()
        effects = {target: etag for target in entry.late}
    else:
        effects = {target: etag for target, (_key, etag) in originals_by_copy(entry, naming).items()
                   if target in entry.late}
    for target, etag in effects.items():
        store.given_up_earlier("CopyObject", target, etag, entry.undone_until)


async def _look_file(late: LateCopies, store: ObjectStore, naming: Naming, locks: NameLocks,
                     changed: Callable[[str], None], in_use: InUse,
                     put_back: PutBack | None = None) -> int:
    """:func:`_look` of a file rename's one copy: a HEAD of its target, then, if something is
    there, under the rename's locks, of both names. Only its copy (:func:`is_its_copy`) counts
    as landed: it is taken back, or, landed over the object it replaces (:func:`_finishes`:
    that object is gone then, and taking the copy back would leave neither), the rename is
    finished: the original deleted and ``changed`` called with both paths
    (:func:`_settle_landed`). Landed over a version this mount wrote there since, that version
    is put back over it (``put_back``, after the locks: it takes the file's upload lock, which
    is never taken under rename locks); where it cannot be, the copy is taken back and the
    version is said lost (one ERROR line with why). Anything else there (nothing, a file the
    user made or another client wrote) does not end the look: the copy may still land once
    that is gone (a trial: a file made and removed there meanwhile, and the late copy stayed).
    So the look ends when the copy lands or when the window ends. Returns 1 when the copy was
    taken back or replaced."""
    entry = late.entry
    [(key, _etag)] = entry.objects.items()
    target = naming.key(entry.target)
    later = entry.written_after
    try:
        if target not in late.targets:
            return 0
        now = await store.head(target)
        if now is None:
            if entry.replacing:  # what it was to replace is removed: landing, it is taken back (line
                # 4: so for a later mount too, trial AL)
                entry.replacing = False
                late.note_left()
            return 0
        ours = entry.written_after  # (now: a write of this mount's may have ended during the HEAD)
        if ours not in (None, DELETED) and not same_etag(now.etag, ours) \
                and (entry.copy_key is None or now.metadata.get(env.H_KEY) != entry.copy_key):
            late.foreign = (now.etag, time.time())  # another client's, over ours: said if the copy lands
        async with locks.hold(trees=[entry.source, entry.target]):
            if (landed := await _its_copy_at(entry, store, target, key)) is None:
                return 0
            there, original = landed
            # over this mount's later version (its original still there, else the copy stays:
            # _settle_landed): that version goes back over it, below
            over_later = put_back is not None and original is not None and later not in (None, DELETED)
            if not over_later:
                outcome = await _settle_landed(late, store, target, there, original, True, "at", in_use)
        if over_later:
            assert put_back is not None and later is not None  # (over_later)
            foreign = late.foreign  # (the put-back's own PUT is a write after the doubt: written_now)
            why = await put_back(target, later, there, entry.written_version)
            # settled meanwhile: by another look or the in-doubt check (whose put-back this one
            # waited for), or by an upload there that took it back
            if why == PUT_BACK_ELSEWHERE or target not in late.targets:
                return 0
            if why is None or why == REPLACED_SINCE:
                late.targets.discard(target)
                store.landed_late(target, there.etag)
                late.note_left()
                if why is None and foreign is not None:  # (break trial BT15: said as over ours only)
                    log.error("the copy the failed rename %s had sent without an answer landed late at %r, after "
                              "another client had written version %s there (seen at %s) over the version %s this "
                              "mount had written: theirs is lost (OSS cannot make a copy conditional on what it "
                              "replaces); this mount's version is put back over it (from this machine's cache)",
                              entry.named(), target, foreign[0], clock_text(foreign[1]), later)
                elif why is None:
                    log.warning("the copy the failed rename %s had sent without an answer landed late at %r, over "
                                "the version %s this mount had written there since: that version is put back over "
                                "it (from this machine's cache)", entry.named(), target, later)
                else:
                    log.info("the copy the failed rename %s had sent without an answer landed late at %r, over the "
                             "version %s this mount had written there since; %s", entry.named(), target, later, why)
                return 1
            async with locks.hold(trees=[entry.source, entry.target]):  # not put back: taken back, as before
                if (landed := await _its_copy_at(entry, store, target, key)) is None:
                    return 0
                there, original = landed
                outcome = await _settle_landed(late, store, target, there, original, True, "at", in_use,
                                               f"; not put back: {why}")
    except (StoreError, FsError) as e:
        log.info("looking for the late copy of the rename %s failed (%s); looked for again later", entry.named(), e)
        return 0
    if outcome == "finished":
        changed(entry.source)
        changed(entry.target)
    return 1 if outcome == "back" else 0


async def _its_copy_at(entry: RenameLog, store: ObjectStore, target: str,
                       key: str) -> tuple[ObjectInfo, ObjectInfo | None] | None:
    """(what is at ``target``, what is at the original's ``key``) when the former is file
    rename ``entry``'s copy (:func:`is_its_copy`), else None: two HEADs, under the rename's
    locks. Raises StoreError."""
    there, original = await store.head(target), await store.head(key)
    if there is None or not is_its_copy(entry, there, original):
        return None
    return there, original


def _within(path: str, tree: str) -> bool:
    """Whether ``path`` is ``tree`` or below it ("" is the root)."""
    return tree == "" or path == tree or path.startswith(tree + "/")


def last_written(path: str) -> float:
    """Wall-clock seconds of the last line written to the log at ``path`` (its mtime; now when
    it cannot be read: the longest watch)."""
    try:
        return os.stat(path).st_mtime
    except OSError:
        return time.time()


def same_object(a: ObjectInfo, b: ObjectInfo) -> bool:
    """Whether ``a`` is a copy of ``b``: the same wrapped data key (unique to one encrypted
    object; a CopyObject keeps the metadata); for objects with none (not encrypted), the same
    ETag (OSS's CopyObject keeps it) and the same metadata (a rename's copy keeps it whole).
    Not the ETag alone: every empty object's is the MD5 of nothing (a trial: an empty file was
    taken for another's copy; a directory made where an undone rename's marker copy may still
    land has the same empty body, not the same mtime)."""
    ka, kb = a.metadata.get(env.H_KEY), b.metadata.get(env.H_KEY)
    if ka is not None or kb is not None:
        return ka == kb
    return same_etag(a.etag, b.etag) and a.metadata == b.metadata
