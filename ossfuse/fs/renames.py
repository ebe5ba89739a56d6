"""Renames a crash cut off: the next mount undoes or finishes each one its log names.

A directory rename copies every object below the old name, then deletes the originals
(``Namespace._move_dir``: OSS has no rename). A crash in between left both trees, and nothing
said so (a trial: 96 of 300 objects copied; `mv` had failed with ECONNABORTED). Each rename
now keeps a log (``fs/renamelog.py``: its lines, 1 the objects, 2 each copy sent and landed,
3 every copy landed, 4 undone with copies that may land late).

A log without line 3 is **undone** (:func:`undo`): at once by the rename itself when a copy
fails, else by the next mount: each copy whose original is still there is deleted (a
logged copy by its ETag, also when another client rewrote the original since; one
sent but not logged only if the original is still the logged version and the same object:
the same wrapped data key, ``latecopies.same_object``), and a replaced empty directory's
marker is put back. A copy sent but not logged that is not there may still land: the log
then stays, and the running mount looks for it (``fs/latecopies.py``). A log with
line 3 is **finished** by the next mount: each original is
deleted only if its logged copy is still at the new name (else it stays), and the files the
journal recovered at the old name move to the new one (``move_recovered``). The next mount
does this before it serves (:func:`settle`). Either way no object is left at neither name.
When the store fails the next mount, a rename is settled anyway from what its log says
(``Namespace.settle_later``; a trial: the mount served both trees, and the user's next `mv`
made the duplicate permanent): finished with its originals as pending deletes when its
copies are logged as landed, or, cut off while copying, undone with its logged copies as
pending deletes (hidden at once, deleted once the store answers); its log stays for the
mount after if a copy was sent but not logged. One that replaced an empty directory (its
marker must be put back), or a file's whose copy is not logged, keeps its log and waits for
the mount after. A log that makes no sense is one ERROR line, and it is removed.

A **file** rename of a committed version (``Namespace._move_file``: one copy, then one
delete) has no line 3: the rename is done once its copy has landed. The next mount
**finishes** a file rename when its copy is at the new name (the logged ETag; an
unlogged one only if it is the original's copy, as above): the original is deleted if it is
still the version copied and the same object as the copy (an empty object's ETag is every
empty object's: a trial lost a file's unsaved changes to that), and the journal's version of
the file moves to the new name; a journaled version of the file the rename replaced goes,
as the rename dropped it (``drop_at_target``: only when the copy was not logged, since the
rename drops it in the same step that logs the copy). Else nothing had changed, and the log
goes; but a copy sent without an answer and not found may still land: it is looked for, as
when the running mount's copy gets no answer (``Namespace._move_file``), and taken back when
it lands, or, landing over the object it replaces, finishes the rename (``fs/latecopies.py``).
A trial: a crash between the copy and the delete left the file at both names.
"""
from __future__ import annotations

import errno
import functools
import logging
from typing import Protocol

from ..aio import run_all
from ..envelope import H_KEY
from ..integrity import is_tag_list
from ..store.base import NoSuchKey, ObjectInfo, ObjectStore, PreconditionFailed, StoreError, same_etag
from .copying import delete_version
from .errors import FsError
from .latecopies import (SETTLE_PARALLEL, clock_text, last_written, note_in_doubt, originals_by_copy,
                         put_back_replaced, same_object, take_back, watch, watch_or_end)
from .naming import Naming
from .renamelog import RenameLog, RenameLogs, moved_key

log = logging.getLogger(__name__)


async def settle(logs: RenameLogs, store: ObjectStore, naming: Naming, files: RecoveredFiles) -> list[str]:
    """Undo or finish each rename an earlier run left (module doc), before the mount serves;
    ``naming``: the mount's path → key mapping; ``files``: the journal's files and the pending
    deletes (``Namespace``). Returns one notice per rename settled (the caller logs them:
    WARNING). A rename the store fails to settle is settled anyway when its copies are
    logged (:meth:`RecoveredFiles.settle_later`), else keeps its log (tried again at the next
    mount), logged; a log that makes no sense is removed, logged."""
    notices = []
    for entry in list(logs.left):
        old, new = naming.dir_key(entry.source), naming.dir_key(entry.target)
        what = f"the rename of {entry.source!r} to {entry.target!r} that an earlier run left unfinished"
        notice: str | None
        try:
            if entry.undone_until is not None:  # undone already: only its late copies are looked for
                logs.left.remove(entry)
                if entry.late and watch(logs, entry, entry.undone_until):
                    note_in_doubt(store, entry, naming)
                    log.info("still looking for %d copy(ies) the undone rename of %r to %r sent without an answer, "
                             "until %s", len(entry.late), entry.source, entry.target, clock_text(entry.undone_until))
                else:
                    logs.end(entry)
                continue
            if entry.file:
                notice = await _settle_file(store, entry, naming.key(entry.source), naming.key(entry.target), files,
                                            what + " (a crash)")
                if entry.late:  # its copy was not found, and may still land: watched, as an undone rename's
                    logs.left.remove(entry)
                    if watch_or_end(logs, entry, store, last_written(entry.path)):
                        note_in_doubt(store, entry, naming)
                        notice = (f"{notice}; it may still land: looked for until {clock_text(logs.watched[-1].until)}, "
                                  + ("and if it lands over the object there, the rename is finished" if entry.replacing
                                     else "and taken back"))
                    assert notice is not None
                    notices.append(notice)
                    continue
            elif entry.deleting:
                kept = await _finish(store, entry, old, new, naming.prefix)
                files.move_recovered(entry)
                notice = (f"finished {what} (a crash)"
                          + (f"; {kept} object(s) stay at the old name (changed since, or their copy is gone)"
                             if kept else ""))
            else:
                kept = await undo(store, entry, naming)
                notice = (f"undid {what} (a crash, or the store failing; the `mv` had failed)"
                          + (f"; {kept} object(s) stay at the new name (changed there since, or their original "
                             "is gone)" if kept else ""))
                logs.left.remove(entry)
                if watch_or_end(logs, entry, store, last_written(entry.path)):
                    note_in_doubt(store, entry, naming)
                    notice += (f"; {len(entry.late)} copy(ies) it sent without an answer may still land (e.g. "
                               f"{sorted(entry.late)[0]!r}): looked for until {clock_text(logs.watched[-1].until)}, and "
                               "taken back")
                notices.append(notice)
                continue
        except (StoreError, FsError) as e:
            later = _settle_later(entry, naming)
            if later is None:
                log.error("%s cannot be settled now (%s); tried again at the next mount", what, e)
                continue
            finished, doomed, unsure = later
            try:
                files.settle_later(entry, doomed, finished)
            except (OSError, FsError) as err:
                log.error("%s cannot be settled now (%s, and the cache disk: %s); tried again at the next mount",
                          what, e, err)
                continue
            hidden = ("the original is" if entry.file else "the originals are") if finished else "its copies are"
            notice = (f"{'finished' if finished else 'undid'} {what} (a crash); the store failed ({e}): {hidden} "
                      "hidden and deleted once it answers")
            if unsure:  # sent, not logged: only the store can tell whether they landed
                notices.append(notice + f"; {len(unsure)} copy(ies) sent but not logged are looked for at the next "
                               f"mount (e.g. {sorted(unsure)[0]!r})")
                continue
        except Exception as e:  # a log no crash can write (edited, or a bug): it would stop every mount
            log.error("rename log %s makes no sense (%s: %s); removed, %s is left as it is", entry.path,
                      type(e).__name__, e, what)
            notice = None
        if notice is not None:
            notices.append(notice)
        logs.left.remove(entry)
        logs.end(entry)
    return notices


class RecoveredFiles(Protocol):
    """What :func:`settle` needs of the namespace (``Namespace`` is one)."""

    def move_recovered(self, rlog: RenameLog) -> int:
        """Move the journal's files at or below ``rlog.source`` to ``rlog.target``; how many."""

    def settle_later(self, rlog: RenameLog, doomed: dict[str, str], finished: bool) -> None:
        """Settle ``rlog`` (``finished``, else undone) with ``doomed`` (key → ETag) as
        pending deletes."""


def _settle_later(entry: RenameLog, naming: Naming) -> tuple[bool, dict[str, str], set[str]] | None:
    """How a rename the store fails to settle can be settled without it: (True, originals,
    {}) to finish it (its copies logged as landed: a file's one copy; a directory's after
    line 3, the originals whose copy is logged), (False, logged copies, copies sent but not
    logged) to undo it (a directory's cut off while copying that replaced no empty
    directory); None when it cannot."""
    if entry.file:
        old, new = naming.key(entry.source), naming.key(entry.target)
        return (True, {old: entry.objects[old]}, set()) if new in entry.copied and old in entry.objects else None
    old, new = naming.dir_key(entry.source), naming.dir_key(entry.target)
    if entry.deleting:
        return True, {k: e for k, e in entry.objects.items() if moved_key(k, old, new, naming.prefix) in entry.copied}, set()
    if entry.replaced is None:
        return False, dict(entry.copied), entry.started - set(entry.copied)
    return None


async def _settle_file(store: ObjectStore, entry: RenameLog, old: str, new: str, files: RecoveredFiles,
                       what: str) -> str | None:
    """Finish file rename ``entry`` (``old`` key to ``new``) if its copy landed, else leave
    it as it was (module doc); returns the notice, None when there was nothing to do (the
    copy was never sent; or the rename was done, its original gone and nothing journaled to
    move); ``what``: the rename, for the notice. Raises StoreError, FsError; KeyError for a log
    whose object is not ``old``."""
    etag = entry.objects[old]
    if new not in entry.started:
        return None  # cut off before its copy was sent: nothing changed
    there, original = await store.head(new), await store.head(old)
    logged = entry.copied.get(new)
    left = f"left {what} as it was: its copy is not at the new name (never landed, or changed since)"
    if there is None and logged is None:
        entry.late = {new}  # sent without an answer: it may still land (the caller watches it)
        if original is not None and same_etag(original.etag, etag):  # (what tells its copy)
            entry.copy_key = original.metadata.get(H_KEY)
    if there is None or (logged is not None and not same_etag(there.etag, logged)):
        return left
    kept = False
    if original is None:  # deleted by the crashed run (or another client) after the copy landed
        if logged is None:
            return left  # cannot tell whether what is at the new name is its copy
    elif same_etag(original.etag, etag):
        if not same_object(there, original):
            # what is at the new name is not its copy (an empty object's ETag is every one's);
            # unlogged, the copy may still land over it (the caller watches it)
            if logged is None:
                entry.late, entry.replacing, entry.copy_key = {new}, True, original.metadata.get(H_KEY)
            return left
        try:
            await delete_version(store, old, etag, head=original)
        except FsError as e:
            if e.errno != errno.ESTALE:
                raise
            kept = True  # a newer version at the old name since the HEAD: kept (logged)
    elif logged is None:
        return left  # the original changed and the copy is not logged: cannot tell it is the copy
    else:
        kept = True  # the copy landed, then another client wrote the old name: theirs stays
    entry.drop_at_target = logged is None
    entry.deleting = True
    moved = files.move_recovered(entry)
    if original is None and not moved:
        return None  # the rename was done; only its log's end was not noted
    return f"finished {what}" + ("; a newer version stays at the old name" if kept else "")


async def same_list(store: ObjectStore, there: ObjectInfo, key: str, etag: str) -> bool:
    """Whether the tag list ``there``, found at the key a rename would move the list at ``key``
    (version ``etag``) to, holds the same bytes: the same ETag, else the same body (a local
    bucket gives each copy its own ETag; lists are small, and this is only asked when a rename
    meets a list that is at its new key already). False also when either changed or went since
    (the caller then keeps the original). Raises StoreError."""
    if same_etag(there.etag, etag):
        return True
    try:
        ours = await store.get_range(key, 0, there.size + 1, if_match=etag)
        theirs = await store.get_range(there.key, 0, there.size + 1, if_match=there.etag)
    except (NoSuchKey, PreconditionFailed):
        return False
    return ours == theirs


async def _finish(store: ObjectStore, entry: RenameLog, old: str, new: str, root: str) -> int:
    """Delete each original whose logged copy is still at the new name (and is its copy:
    :func:`same_object`), and each tag list whose copy was not made because that list was at
    its new key already (named by content, as the rename itself does: trial AB); ``root``:
    the mount's prefix (:func:`moved_key`). Returns how many stay."""
    kept = 0

    async def one(key: str, etag: str) -> None:
        nonlocal kept
        target = moved_key(key, old, new, root)
        copy = entry.copied.get(target)
        listed = await store.head(target) if copy is None and is_tag_list(key[len(old):]) else None
        if listed is not None and not await same_list(store, listed, key, etag):
            kept += 1  # other bytes there: one of the two is damaged, so both stay (the rename's WARNING)
            log.warning("the tag list %r stays where it is: %r holds other bytes: one of the two is damaged "
                        "(`ossfuse check --verify` names the files that fail)", key, target)
            return
        if listed is not None:
            try:
                await delete_version(store, key, etag)
            except FsError as e:
                if e.errno != errno.ESTALE:
                    raise
                kept += 1
            return
        there = await store.head(target) if copy is not None else None
        original = await store.head(key)
        if original is None:
            return
        if there is None or not same_etag(there.etag, copy) or (same_etag(original.etag, etag)
                                                                and not same_object(there, original)):
            kept += 1
            return
        try:
            await delete_version(store, key, etag, head=original)
        except FsError as e:
            if e.errno != errno.ESTALE:
                raise
            kept += 1  # a newer version at the old name: kept (logged)

    await run_all([functools.partial(one, k, e) for k, e in entry.objects.items()], SETTLE_PARALLEL)
    return kept


async def undo(store: ObjectStore, entry: RenameLog, naming: Naming) -> int:
    """Undo the copies of rename ``entry`` by the mount of ``naming`` (module doc); returns
    how many copies stay (changed at the new name since, or their original is gone). Raises
    StoreError, FsError."""
    by_target = originals_by_copy(entry, naming)
    kept = 0

    async def one(target: str) -> None:
        nonlocal kept
        copy_etag = entry.copied.get(target)
        there = await store.head(target)
        if there is None:  # never landed, or gone since; or, sent and not logged, it may land late
            if copy_etag is None:  # (a request is carried out up to indoubt.WINDOW after it was sent)
                entry.late.add(target)
            return
        key, etag = by_target.get(target, (None, None))
        stays = await take_back(store, target, there, key, etag, copy_etag)
        kept += stays
        if stays and copy_etag is None and target == naming.dir_key(entry.target):
            # the marker's copy replaces what is there (the other copies are create-only): it
            # may still land over the replaced directory's marker (trial AF: it did, for good)
            entry.late.add(target)
            entry.late_over[target] = there

    entry.late, entry.late_over = set(), {}
    await run_all([functools.partial(one, t) for t in sorted(entry.started)], SETTLE_PARALLEL)
    await put_back_replaced(store, entry, naming)
    marker = naming.dir_key(entry.target)
    if marker in entry.late and marker not in entry.late_over and (now := await store.head(marker)) is not None:
        entry.late_over[marker] = now  # (the marker put back just now)
    return kept
