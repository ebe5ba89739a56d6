"""The in-process setup of core tests (t3 in s3ql's layering: the ``Filesystem`` API with no
kernel): a Config for a local bucket under a test's directory, and a Filesystem over
``FaultStore(LocalStore)`` (tests/fakes/fault_store.py), plus small helpers the core tests share.

Layout under ``root`` (a test's ``tmp_path`` or any directory): ``bucket/`` (the local store;
keys under the prefix ``pre/``), ``cache/`` (cache dir: staging, journal, pending deletes),
``ossfuse.toml`` (named by the Config, never written). The CMK is the session's RSA key
(conftest's ``cmk_path``); uid 1, gid 2 own what has no owner.

Example::

    from fakes.core import core_filesystem

    fs = core_filesystem(tmp_path, cmk_path)           # upload_delay 0, like a local bucket
    store = fs.store                                     # the FaultStore: arm faults on it
    fs2 = core_filesystem(tmp_path, cmk_path, store=store)  # a remount: same bucket and cache
"""
from __future__ import annotations

import errno
import os

import trio

from ossfuse.config import CacheConfig, CmkConfig, Config, EncryptionConfig, MountConfig, StoreConfig
from ossfuse.fs import Filesystem, FsError
from ossfuse.fs.model import Node
from ossfuse.keyring import Keyring
from ossfuse.store.base import ObjectStore
from ossfuse.store.local import LocalStore

from .fault_store import FaultStore

UID, GID = 1, 2
PREFIX = "pre/"


def core_config(root, cmk_path: str, *, cache: dict | None = None, **mount) -> Config:
    """The Config of a core test under ``root``: ``mount`` overrides MountConfig fields
    (``upload_delay`` defaults to 0: a closed file uploads at once, as on a local bucket),
    ``cache`` overrides CacheConfig fields (e.g. ``max_size`` in bytes)."""
    root = str(root)
    mount.setdefault("upload_delay", 0.0)
    return Config(path=os.path.join(root, "ossfuse.toml"),
                  store=StoreConfig(url=f"local://{os.path.join(root, 'bucket')}", prefix=PREFIX),
                  encryption=EncryptionConfig(encrypt_with="k", cmks=(CmkConfig("k", "rsa", cmk_path),)),
                  cache=CacheConfig(dir=os.path.join(root, "cache"), **(cache or {})),
                  mount=MountConfig(**mount))


def core_store(root) -> FaultStore:
    """A FaultStore over a LocalStore in ``root/bucket`` (made if missing), nothing armed."""
    os.makedirs(os.path.join(str(root), "bucket"), exist_ok=True)
    return FaultStore(LocalStore(os.path.join(str(root), "bucket")))


def core_filesystem(root, cmk_path: str, store: ObjectStore | None = None, *, keyring: Keyring | None = None,
                    cache: dict | None = None, **mount) -> Filesystem:
    """A Filesystem of a core test under ``root`` over ``store`` (default: a new
    :func:`core_store`); ``keyring``: reuse one (loading an RSA CMK takes ~0.3 s);
    ``cache``/``mount``: as :func:`core_config`."""
    cfg = core_config(root, cmk_path, cache=cache, **mount)
    if store is None:
        store = core_store(root)
    return Filesystem(cfg, store, keyring or Keyring(cfg.encryption), uid=UID, gid=GID)


async def committed_file(fs: Filesystem, name: str, data: bytes, parent: Node | None = None) -> Node:
    """A file ``name`` in ``parent`` (default: the root), written, closed and uploaded; its node."""
    node, h = await fs.create(parent or fs.get(1), name, 0o600, os.O_RDWR, UID, GID)
    await fs.write(h, 0, data)
    await fs.flush(h)
    await fs.release(h)
    assert await fs.drain() == 0
    return node


async def listed_names(fs: Filesystem, directory: Node | None = None) -> list[str]:
    """The names readdir gives for ``directory`` (default: the root), sorted."""
    h = fs.opendir(directory or fs.get(1))
    try:
        names, start = [], 0
        while True:
            entries = await fs.readdir_entries(h, start)
            if not entries:
                return sorted(names)
            names += [name for _, name, _ in entries]
            start = entries[-1][0]
    finally:
        fs.releasedir(h.fh)


async def exists(fs: Filesystem, name: str, parent: Node | None = None) -> bool:
    """Whether lookup finds ``name`` in ``parent`` (default: the root); only ENOENT is "no"."""
    try:
        await fs.lookup(parent or fs.get(1), name)
        return True
    except FsError as e:
        assert e.errno == errno.ENOENT, e
        return False


async def read_node(fs: Filesystem, node: Node, size: int = 1 << 30) -> bytes:
    """Up to ``size`` bytes of file ``node`` from offset 0, read through open/read/release."""
    h = await fs.open(node, os.O_RDONLY)
    try:
        return await fs.read(h, 0, size)
    finally:
        await fs.release(h)


async def read_file(fs: Filesystem, name: str) -> bytes:
    """The whole content of ``name`` in the root directory, read through open/read/release."""
    return await read_node(fs, await fs.lookup(fs.get(1), name))


def from_loop(afn, *args, **kw):
    """``await afn(*args, **kw)`` in the trio run of the calling worker thread (the model
    tests drive their state machines from one); its result."""
    async def run():
        return await afn(*args, **kw)
    return trio.from_thread.run(run)
