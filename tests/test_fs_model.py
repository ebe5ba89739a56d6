"""Model-based test of the filesystem core (hypothesis stateful testing; the idea is
mountpoint-s3's ``reftests``): random sequences of namespace and content operations, crashes and
remounts drive :class:`ossfuse.fs.Filesystem` in-process (no kernel) and an in-memory reference
filesystem (:class:`Model`) side by side, and every answer, read and listing must agree.

The machine runs inside one trio run, as the daemon does: hypothesis runs in a worker thread and
each step calls into the event loop with ``trio.from_thread.run``.

* ``crash``: the Filesystem is dropped without drain or unmount (only its file descriptors close,
  as at a process's death) and a new one is built on the same cache dir and bucket, which
  recovers the journal. A file closed (or fsynced, or uploaded) since its last change must come
  back exactly; a file changed since may come back as it was at its last durable point or as it
  is now, never anything else, and a file that never was durable may be gone.
* ``remount``: every handle closed, drain, close, a new Filesystem: everything equals the model.
* The second machine runs over ``tests/fakes/fault_store.py`` and arms one transient store
  failure at a time: any operation may then fail with EIO, and the model accepts only the
  outcomes the operation promises (below, per operation), then continues from what it observed.

Run time is bounded by ``max_examples``/``stateful_step_count`` (settings below); the examples
are derandomized, so a run is reproducible. For a longer random search:
``OSSFUSE_MODEL_EXAMPLES=2000 pytest tests/test_fs_model.py -p no:cacheprovider`` (the seed is
then random; hypothesis prints the failing steps, and ``--hypothesis-seed=N`` replays a run).
"""
from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile
from dataclasses import dataclass, field

import pytest
import trio
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from fakes.core import core_config, from_loop
from fakes.fault_store import FaultStore
from ossfuse.config import Config
from ossfuse.fs import Filesystem, FsError
from ossfuse.fs.model import FileHandle, Node
from ossfuse.keyring import Keyring
from ossfuse.store.local import LocalStore

NAMES = ("a", "b", "c")  # few names, so operations meet each other's names
MODES = (0o600, 0o644, 0o700, 0o755)
EXAMPLES = int(os.environ.get("OSSFUSE_MODEL_EXAMPLES", "0"))
UID, GID = 1, 2

# --------------------------------------------------------------------------- the reference model


@dataclass(eq=False)
class MFile:
    """A file of the model: its content and permission bits now, and as a crash must keep them
    (``durable``: None while no close, fsync or upload made any version durable). ``durables``:
    every state ever made durable, one of which is the last uploaded version (each upload
    journals first, and a failed upload leaves the journaled one durable, not uploaded)."""

    data: bytearray = field(default_factory=bytearray)
    mode: int = 0o644
    durable: tuple[bytes, int] | None = None
    unlinked: bool = False
    durables: set[tuple[bytes, int]] = field(default_factory=set)
    changing: bool = False  # written or truncated through a handle since it was made durable

    @property
    def now(self) -> tuple[bytes, int]:
        return bytes(self.data), self.mode

    @property
    def clean(self) -> bool:
        return self.durable == self.now and not self.changing

    def make_durable(self) -> None:
        if not self.unlinked:
            self.durable = self.now
            self.durables.add(self.now)
            self.changing = False


@dataclass(eq=False)
class MDir:
    mode: int = 0o755


def join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


def parent_of(path: str) -> str:
    return path.rpartition("/")[0]


class Model:
    """The reference filesystem: path → MFile | MDir ("" is the root)."""

    def __init__(self) -> None:
        self.tree: dict[str, MFile | MDir] = {"": MDir(0o755)}

    def dirs(self) -> list[str]:
        return sorted(p for p, e in self.tree.items() if isinstance(e, MDir))

    def files(self) -> list[str]:
        return sorted(p for p, e in self.tree.items() if isinstance(e, MFile))

    def children(self, path: str) -> list[str]:
        return sorted(p.rpartition("/")[2] for p in self.tree if p and parent_of(p) == path)

    def under(self, path: str) -> list[str]:
        return [p for p in self.tree if p == path or p.startswith(path + "/")]

    def rename_errno(self, src: str, dst: str) -> int | None:
        """rename(2)'s error for src → dst in this model, None when it succeeds."""
        s, d = self.tree[src], self.tree.get(dst)
        if isinstance(s, MDir) and (dst + "/").startswith(src + "/") and dst != src:
            return errno.EINVAL
        if d is None or dst == src:
            return None
        if isinstance(s, MDir) and isinstance(d, MFile):
            return errno.ENOTDIR
        if isinstance(s, MFile) and isinstance(d, MDir):
            return errno.EISDIR
        if isinstance(d, MDir) and self.children(dst):
            return errno.ENOTEMPTY
        return None

    def rename(self, src: str, dst: str) -> None:
        if src == dst:
            return
        old = self.tree.pop(dst, None)
        if isinstance(old, MFile):
            old.unlinked = True
        for p in sorted(self.under(src)):
            self.tree[dst + p[len(src):]] = self.tree.pop(p)


def pick(items: list, i: int):
    return items[i % len(items)]


# --------------------------------------------------------------------------- the machine


def _config(root: str, cmk_path: str, *, upload_delay: float) -> Config:
    return core_config(root, cmk_path, upload_delay=upload_delay)


class FsMachine(RuleBasedStateMachine):
    """The Filesystem against :class:`Model`; subclasses choose the store and upload policy."""

    cmk_path: str = ""
    keyring: Keyring
    base_dir: str = ""
    upload_delay = 3600.0  # uploads only by fsync, drain and remount: closes journal
    faults = False
    remote_like = False  # the store behaves as OSS: listings without metadata, not a local disk
    attr_timeout = 1.0

    def __init__(self) -> None:
        super().__init__()
        self.root = tempfile.mkdtemp(dir=self.base_dir)
        os.makedirs(os.path.join(self.root, "bucket"))
        self.cfg = core_config(self.root, self.cmk_path, upload_delay=self.upload_delay,
                               attr_timeout=self.attr_timeout, entry_timeout=self.attr_timeout)
        self.inner = LocalStore(os.path.join(self.root, "bucket"))
        self.store = FaultStore(self.inner)
        if self.remote_like:
            self.store.listing_has_metadata = False
            self.store.local_disk = False
        self.fs = self._new_fs()
        self.model = Model()
        self.handles: list[tuple[FileHandle, MFile]] = []

    def _new_fs(self) -> Filesystem:
        return trio.from_thread.run_sync(lambda: self._build_fs())

    def _build_fs(self) -> Filesystem:
        # one Keyring for the whole run: loading an RSA CMK checks the key (~0.3 s); what it
        # caches (unwrapped data keys) a new daemon would unwrap again with the same result
        return Filesystem(self.cfg, self.store, self.keyring, uid=UID, gid=GID)

    def teardown(self) -> None:
        try:
            for h, _ in self.handles:
                self.call(self.fs.release, h)
            self.fs.close()
            self.call(self.store.aclose)
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    # -- calling into the event loop --------------------------------------------------------
    call = staticmethod(from_loop)

    def node_at(self, path: str) -> Node:
        """The node at ``path``, looked up component by component. Raises FsError."""
        async def walk() -> Node:
            node = self.fs.get(1)
            for name in path.split("/") if path else ():
                node = await self.fs.lookup(node, name)
            return node
        return trio.from_thread.run(walk)

    def expect_errno(self, code: int | None, fn, *args, **kw):
        """Run ``fn`` (an fs coroutine function); it must fail with ``code`` (None: succeed).
        Returns its result, or raises _Failed when a fault made it fail with EIO."""
        injected = len(self.store.injected)
        try:
            result = self.call(fn, *args, **kw)
        except FsError as e:
            if e.errno == errno.EIO and len(self.store.injected) > injected:
                raise _Failed() from None
            assert e.errno == code, f"{fn.__name__}: errno {errno.errorcode.get(e.errno)}, expected " \
                                    f"{errno.errorcode.get(code) if code else 'success'}"
            return None
        assert code is None, f"{fn.__name__} succeeded, expected {errno.errorcode[code]}"
        return result

    # -- observing the filesystem -----------------------------------------------------------
    def observe(self, path: str):
        """What the filesystem has at ``path``: None, ("dir", mode) or ("file", data, mode)."""
        async def look():
            try:
                node = self.fs.get(1)
                for name in path.split("/") if path else ():
                    node = await self.fs.lookup(node, name)
            except FsError as e:
                assert e.errno in (errno.ENOENT, errno.ENOTDIR), e
                return None
            if node.is_dir:
                return ("dir", stat.S_IMODE(node.mode))
            h = await self.fs.open(node, os.O_RDONLY)
            try:
                data = await self.fs.read(h, 0, 1 << 20)
            finally:
                await self.fs.release(h)
            assert node.current_size == len(data), f"{path}: size {node.current_size}, read {len(data)} bytes"
            return ("file", data, stat.S_IMODE(node.mode))
        return trio.from_thread.run(look)

    def listdir(self, path: str) -> list[str]:
        async def ls():
            node = self.fs.get(1)
            for name in path.split("/") if path else ():
                node = await self.fs.lookup(node, name)
            h = self.fs.opendir(node)
            names, start = [], 0
            try:
                while True:
                    entries = await self.fs.readdir_entries(h, start)
                    if not entries:
                        return sorted(names)
                    names += [name for _, name, _ in entries]
                    start = entries[-1][0]
            finally:
                self.fs.releasedir(h.fh)
        return trio.from_thread.run(ls)

    def check_all(self, uncertain: dict[str, set] | None = None) -> None:
        """The whole tree equals the model (``uncertain``: path → accepted observations, the
        observed one is adopted)."""
        uncertain = uncertain or {}
        for path in sorted(set(self.model.tree) | set(uncertain)):
            if path not in self.model.tree and path not in uncertain:
                continue  # adopted away with its parent
            entry = self.model.tree.get(path)
            seen = self.observe(path)
            if path in uncertain:
                assert seen in uncertain[path], f"{path}: {_show(seen)} not one of {[_show(s) for s in uncertain[path]]}"
                self.adopt(path, seen)
            elif isinstance(entry, MDir):
                assert seen == ("dir", entry.mode), f"{path}: {_show(seen)}, model: dir {oct(entry.mode)}"
            else:
                assert seen == ("file", *entry.now), f"{path}: {_show(seen)}, model: {_show(('file', *entry.now))}"
        for path in self.model.dirs():
            assert self.listdir(path) == self.model.children(path), f"listing of {path!r}"

    def adopt(self, path: str, seen) -> None:
        """Make the model hold ``seen`` at ``path`` (a file's durable state is what was seen)."""
        if seen is None:
            for p in self.model.under(path):
                e = self.model.tree.pop(p)
                if isinstance(e, MFile):
                    e.unlinked = True
        elif seen[0] == "file":
            f = self.model.tree.get(path)
            if isinstance(f, MFile) and f.now == (seen[1], seen[2]):
                return  # as the model has it: what of it is durable did not change
            if not isinstance(f, MFile):
                f = self.model.tree[path] = MFile()
            f.data[:] = seen[1]
            f.mode = seen[2]
            f.durable = (seen[1], seen[2])  # another version at the name: one in the bucket
            f.durables.add(f.durable)
            f.changing = False

    # -- rules: namespace -------------------------------------------------------------------
    @rule(d=st.integers(0, 20), name=st.sampled_from(NAMES), mode=st.sampled_from(MODES))
    def create(self, d, name, mode):
        parent = pick(self.model.dirs(), d)
        path = join(parent, name)
        code = errno.EEXIST if path in self.model.tree else None
        try:
            res = self.expect_errno(code, self._create, parent, name, mode)
        except _Failed:
            self.check_all({path: {self._state(path)}})  # a failed create makes nothing
            return
        if res is not None:
            f = MFile(mode=mode)
            self.model.tree[path] = f
            self.handles.append((res[1], f))

    async def _create(self, parent: str, name: str, mode: int):
        node = self.fs.get(1)
        for n in parent.split("/") if parent else ():
            node = await self.fs.lookup(node, n)
        return await self.fs.create(node, name, mode, os.O_RDWR | os.O_CREAT | os.O_EXCL, UID, GID)  # a new file: EEXIST if taken

    @rule(d=st.integers(0, 20), name=st.sampled_from(NAMES + ("d", "e")), mode=st.sampled_from(MODES))
    def mkdir(self, d, name, mode):
        parent = pick(self.model.dirs(), d)
        path = join(parent, name)
        code = errno.EEXIST if path in self.model.tree else None
        try:
            res = self.expect_errno(code, self._in_dir(self.fs.mkdir), parent, name, mode, UID, GID)
        except _Failed:
            self.check_all({path: {self._state(path)}})
            return
        if res is not None:
            self.model.tree[path] = MDir(mode)

    def _in_dir(self, op):
        async def run(parent: str, *args):
            node = self.fs.get(1)
            for n in parent.split("/") if parent else ():
                node = await self.fs.lookup(node, n)
            return await op(node, *args)
        run.__name__ = op.__name__
        return run

    @precondition(lambda self: len(self.model.tree) > 1)
    @rule(i=st.integers(0, 50))
    def rmdir(self, i):
        path = pick(sorted(p for p in self.model.tree if p), i)
        entry = self.model.tree[path]
        code = errno.ENOTDIR if isinstance(entry, MFile) else errno.ENOTEMPTY if self.model.children(path) else None
        try:
            self.expect_errno(code, self._in_dir(self.fs.rmdir), parent_of(path), path.rpartition("/")[2])
        except _Failed:
            self.check_all({path: {self._state(path)}})  # a failed rmdir removes nothing
            return
        if code is None:
            del self.model.tree[path]

    @precondition(lambda self: len(self.model.tree) > 1)
    @rule(i=st.integers(0, 50))
    def unlink(self, i):
        path = pick(sorted(p for p in self.model.tree if p), i)
        entry = self.model.tree[path]
        code = errno.EISDIR if isinstance(entry, MDir) else None
        try:
            self.expect_errno(code, self._in_dir(self.fs.unlink), parent_of(path), path.rpartition("/")[2])
        except _Failed:
            self.check_all({path: {self._state(path)}})  # a failed unlink removes nothing
            return
        if code is None:
            del self.model.tree[path]
            entry.unlinked = True

    @precondition(lambda self: len(self.model.tree) > 1)
    @rule(i=st.integers(0, 50), d=st.integers(0, 20), name=st.sampled_from(NAMES + ("d",)))
    def rename(self, i, d, name):
        src = pick(sorted(p for p in self.model.tree if p), i)
        parent = pick(self.model.dirs(), d)
        dst = join(parent, name)
        code = self.model.rename_errno(src, dst)
        if self.store.rules and isinstance(self.model.tree[src], MDir) and code is None:
            return  # a directory rename interrupted half-way is not modelled (object by object)
        before = {p: self._state(p) for p in (src, dst)}
        dst_node = self.fs.by_path.get(dst)
        try:
            self.expect_errno(code, self._rename, src, dst)
        except _Failed:
            # Nothing moved, or everything did; or (copies first, then deletes) the object is at both
            # names: the new name then holds the file's last uploaded version (one of the states
            # it made durable), without changes still staged (docs/semantics.md).
            if dst.startswith(src + "/"):
                raise AssertionError("a rename into itself reached the store") from None
            entry = self.model.tree.get(src)
            uploaded = {("file", *d) for d in entry.durables} if isinstance(entry, MFile) else set()
            old = self.model.tree.get(dst)
            # the copy replaced dst's file (its node is unlinked: the content may look the same)
            if isinstance(old, MFile) and ((dst_node is not None and dst_node.unlinked)
                                           or self.observe(dst) != before[dst]):
                old.unlinked = True  # a new file is at that name
                self.model.tree[dst] = MFile()
            self.check_all({src: {before[src], None}, dst: {before[dst], before[src]} | uploaded})
            assert self.observe(src) is not None or self.model.tree.get(dst) is not None, \
                f"failed rename {src} -> {dst} lost both"
            return
        if code is None:
            self.model.rename(src, dst)

    async def _rename(self, src: str, dst: str) -> None:
        async def at(path):
            node = self.fs.get(1)
            for n in path.split("/") if path else ():
                node = await self.fs.lookup(node, n)
            return node
        sp, dp = await at(parent_of(src)), await at(parent_of(dst))
        await self.fs.rename(sp, src.rpartition("/")[2], dp, dst.rpartition("/")[2], 0)

    def faults_armed(self) -> bool:
        return any(r.active and (r.count is None or r.hits < r.count) for r in self.store.rules)

    def _state(self, path: str):
        """The model's entry at ``path`` as :meth:`observe` shows it."""
        e = self.model.tree.get(path)
        if e is None:
            return None
        return ("dir", e.mode) if isinstance(e, MDir) else ("file", *e.now)

    # -- rules: attributes and content ------------------------------------------------------
    @precondition(lambda self: len(self.model.tree) > 1)
    @rule(i=st.integers(0, 50), mode=st.sampled_from(MODES))
    def chmod(self, i, mode):
        path = pick(sorted(p for p in self.model.tree if p), i)
        entry = self.model.tree[path]
        try:
            self.expect_errno(None, self._setattr, path, mode=mode)
        except _Failed:
            self.check_all({path: {self._state(path)}})  # a failed chmod changes nothing
            return
        was_clean = isinstance(entry, MFile) and entry.clean
        entry.mode = mode
        if was_clean:  # a closed file's new attributes survive a crash (docs/semantics.md)
            entry.make_durable()

    async def _setattr(self, path: str, **changes):
        node = self.fs.get(1)
        for n in path.split("/"):
            node = await self.fs.lookup(node, n)
        return await self.fs.setattr(node, **changes)

    @precondition(lambda self: bool(self.model.files()))
    @rule(i=st.integers(0, 50), size=st.integers(0, 5000))
    def truncate_path(self, i, size):
        path = pick(self.model.files(), i)
        f = self.model.tree[path]
        try:
            self.expect_errno(None, self._setattr, path, size=size)
        except _Failed:
            self.check_all({path: {self._state(path)}})
            return
        _resize(f.data, size)
        if not any(hf is f and hh.writable for hh, hf in self.handles):
            f.make_durable()  # truncate(2) of a file no writable handle has open is journaled (Files.truncate_locked)
        else:
            f.changing = True  # joins the writer's changes

    @precondition(lambda self: bool(self.handles))
    # size >= 1: the kernel sends no empty writes (and StagedFile.write(off, b"") extends the file to off)
    @rule(i=st.integers(0, 20), offset=st.integers(0, 6000), size=st.integers(1, 3000),
          byte=st.integers(1, 255))
    def write(self, i, offset, size, byte):
        h, f = pick(self.handles, i)
        data = bytes([byte]) * size
        if not h.writable:  # (the kernel refuses it before; the core refuses it too)
            self.expect_errno(errno.EBADF, self.fs.write, h, offset, data)
            return
        try:
            n = self.expect_errno(None, self.fs.write, h, offset, data)
        except _Failed:
            # a failed write (fetching the old content to stage it) changes nothing
            assert self.call(self.fs.read, h, 0, 1 << 20) == bytes(f.data)
            return
        assert n == size
        if size:
            if len(f.data) < offset:
                _resize(f.data, offset)
            f.data[offset:offset + size] = data
            f.changing = True

    @precondition(lambda self: bool(self.handles))
    @rule(i=st.integers(0, 20), size=st.integers(0, 5000))
    def truncate_handle(self, i, size):
        h, f = pick(self.handles, i)
        if not h.writable:
            return  # ftruncate(2) needs a writable descriptor (the kernel refuses it: EINVAL)
        try:
            self.expect_errno(None, self.fs.setattr, h.node, size=size, fh=h)
        except _Failed:
            assert self.call(self.fs.read, h, 0, 1 << 20) == bytes(f.data)
            return
        _resize(f.data, size)
        f.changing = True

    @precondition(lambda self: bool(self.handles))
    @rule(i=st.integers(0, 20))
    def read_handle(self, i):
        h, f = pick(self.handles, i)
        try:
            data = self.expect_errno(None, self.fs.read, h, 0, 1 << 20)
        except _Failed:
            return
        assert data == bytes(f.data), f"read through a handle: {len(data)} bytes, model {len(f.data)}"

    @precondition(lambda self: bool(self.model.files()))
    @rule(i=st.integers(0, 50), write=st.booleans())
    def open(self, i, write):
        path = pick(self.model.files(), i)
        f = self.model.tree[path]
        try:
            node = self.node_at(path)
            h = self.expect_errno(None, self.fs.open, node, os.O_RDWR if write else os.O_RDONLY)
        except (_Failed, FsError) as e:
            if isinstance(e, FsError):
                assert e.errno == errno.EIO and self.faults, e
            return
        self.handles.append((h, f))

    @precondition(lambda self: bool(self.handles))
    @rule(i=st.integers(0, 20))
    def fsync(self, i):
        h, f = pick(self.handles, i)
        try:
            self.expect_errno(None, self.fs.fsync, h)
        except _Failed:
            f.make_durable()  # a failed fsync leaves the data staged and journaled
            return
        f.make_durable()
        if not f.unlinked and h.node.path is not None:
            path = h.node.path
            info = self.call(self.inner.head, "pre/" + path)
            assert info is not None and info.size == len(f.data), f"fsynced {path!r} is not in the bucket"

    @precondition(lambda self: bool(self.handles))
    @rule(i=st.integers(0, 20))
    def close(self, i):
        h, f = self.handles.pop(i % len(self.handles))
        self.call(self.fs.flush, h)  # journals (or uploads): with faults it falls back to the journal
        self.call(self.fs.release, h)
        if h.writable:  # a reader's close saves nothing (a writer still open owns the changes)
            f.make_durable()

    @rule()
    def background_uploads(self):
        """What the upload workers do at any moment: upload every staged file."""
        left = self.call(self.fs.drain)
        assert left == 0 or self.faults
        for f in self.model.tree.values():
            if isinstance(f, MFile):
                f.make_durable()  # each upload journals first: durable even when the PUT fails

    @rule(d=st.integers(0, 20))
    def listdir_rule(self, d):
        path = pick(self.model.dirs(), d)
        try:
            names = self.listdir(path)
        except FsError as e:
            assert e.errno == errno.EIO and self.faults, e
            return
        assert names == self.model.children(path), f"listing of {path!r}"

    @precondition(lambda self: len(self.model.tree) > 1)
    @rule(i=st.integers(0, 50))
    def stat_and_read(self, i):
        path = pick(sorted(p for p in self.model.tree if p), i)
        try:
            seen = self.observe(path)
        except FsError as e:
            assert e.errno == errno.EIO and self.faults, e
            return
        assert seen == self._state(path), f"{path}: {_show(seen)}, model {_show(self._state(path))}"

    # -- rules: crash and remount -----------------------------------------------------------
    @rule()
    def crash(self):
        """Drop the Filesystem as a killed daemon would, recover on the same cache dir."""
        self.store.clear()
        for node in list(self.fs.dirty):  # the kernel closes a dead process's descriptors
            if node.staged is not None:
                node.staged.close()
        for entry in list(self.fs.cache._entries.values()):
            entry.close()
        self.handles.clear()
        self.fs = self._new_fs()
        trio.from_thread.run_sync(self.fs.recover)
        assert self.call(self.fs.finish_unlinks) == 0  # as the daemon does before it serves
        uncertain = {}
        for path, e in list(self.model.tree.items()):
            if isinstance(e, MFile) and not e.clean:
                accepted = {("file", *e.now)}
                accepted.add(("file", *e.durable) if e.durable is not None else None)
                uncertain[path] = accepted
        self.check_all(uncertain)

    @rule()
    def remount(self):
        """Close every handle, drain, close; a new Filesystem shows exactly the model."""
        self.store.clear()
        for h, f in self.handles:
            self.call(self.fs.flush, h)
            self.call(self.fs.release, h)
            f.make_durable()
        self.handles.clear()
        assert self.call(self.fs.drain) == 0
        self.fs.close()
        self.fs = self._new_fs()
        assert trio.from_thread.run_sync(self.fs.recover) == 0
        assert self.call(self.fs.finish_unlinks) == 0
        self.check_all()

    @invariant()
    def handles_point_at_their_files(self):
        for h, f in self.handles:
            assert (h.node.unlinked if f.unlinked else not h.node.unlinked), "a handle's file was unlinked or not"

    @invariant()
    def no_conflict_without_another_client(self):
        assert self.fs.commit.conflicts.count == 0, f"a conflict copy, and no other client: {list(self.fs.commit.conflicts.recent)}"


class _Failed(Exception):
    """An operation failed with EIO because of an injected store fault."""


def _resize(data: bytearray, size: int) -> None:
    if size < len(data):
        del data[size:]
    else:
        data.extend(bytes(size - len(data)))


def _show(state) -> str:
    if state is None or state[0] == "dir":
        return repr(state)
    _, data, mode = state
    return f"file {oct(mode)} {len(data)} bytes {sorted(set(data))[:4]}"


class FaultyFsMachine(FsMachine):
    """Over the fault store, uploading at close as on a local bucket with no delay, with one
    transient store failure armed at a time."""

    upload_delay = 0.0
    faults = True

    @rule(op=st.sampled_from(("head", "get_range", "get_range_with_info", "put_file", "put_bytes", "copy", "list",
                              "delete")))
    def arm_fault(self, op):
        self.store.clear()
        self.store.fail(op, error="temporary", count=1)


def _run(machine: type[FsMachine], tmp_path, cmk_path, examples: int, steps: int, shrink: bool = True) -> None:
    machine.cmk_path = cmk_path
    machine.keyring = Keyring(_config(str(tmp_path), cmk_path, upload_delay=0).encryption)
    # on tmpfs when there is one: the journal fsyncs every close, a disk makes that the run time
    shm = "/dev/shm"
    machine.base_dir = tempfile.mkdtemp(dir=shm) if os.access(shm, os.W_OK) else str(tmp_path)
    opts = settings(max_examples=EXAMPLES or examples, stateful_step_count=steps, deadline=None,
                    derandomize=not EXAMPLES, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
                    # OSSFUSE_MODEL_NOSHRINK=1: report the first failure as found (shrinking can take minutes)
                    phases=[Phase.explicit, Phase.generate] if os.environ.get("OSSFUSE_MODEL_NOSHRINK") or not shrink
                    else tuple(Phase))

    async def main():
        await trio.to_thread.run_sync(lambda: run_state_machine_as_test(machine, settings=opts))

    try:
        trio.run(main)
    finally:
        if machine.base_dir != str(tmp_path):
            shutil.rmtree(machine.base_dir, ignore_errors=True)


class RemoteLikeFsMachine(FsMachine):
    """Over a store that behaves as OSS (listings without metadata: attributes from HEADs, the
    attribute cache kept across crashes and remounts, slim versions; reads through the block
    cache), every attribute stale after 10 ms: lookups revalidate by listing pages."""

    remote_like = True
    attr_timeout = 0.01


# a simulated crash with a file open for writing: the next mount names the unsaved work file it deletes
_LOST_WORK = r"WARNING ossfuse\.writeback\.journal: unsaved changes of '.*' \(work file "


@pytest.mark.expect_log(_LOST_WORK)
def test_model_local_store(tmp_path, cmk_path):
    _run(FsMachine, tmp_path, cmk_path, examples=150, steps=40)


@pytest.mark.expect_log(r"injected fault", _LOST_WORK)
def test_model_with_store_faults(tmp_path, cmk_path):
    _run(FaultyFsMachine, tmp_path, cmk_path, examples=150, steps=40)


@pytest.mark.expect_log(_LOST_WORK)
def test_model_over_a_store_like_oss(tmp_path, cmk_path):
    _run(RemoteLikeFsMachine, tmp_path, cmk_path, examples=150, steps=40)
