"""Running a mount: wire store, keyring and filesystem; serve FUSE under trio; shut down cleanly.

Lifecycle: lock the cache dir → adopt the journal (uploads queued) → mount → answer ``stat``
→ report ready (parent process, registry file) → serve → on unmount or SIGTERM/SIGINT: stop
serving, unmount, finish every pending upload, exit. Exit status 0 means every closed file is in
the bucket; 75 (EX_TEMPFAIL) means some are still journaled and upload on the next mount.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import signal
import subprocess
import time

import pyfuse3
import trio

from .config import Config
from .core import Filesystem
from .fuse_ops import Operations
from .envelope import EnvelopeError
from .keyring import CmkUnavailable, Keyring
from . import status as status_mod
from .status import RecentErrors
from .store.base import ObjectStore, StoreError
from .store.local import LocalStore

log = logging.getLogger(__name__)

EXIT_PENDING = 75  # EX_TEMPFAIL: unmounted, but uploads remain in the journal


class MountError(Exception):
    """The mount could not start (message is the one-line reason)."""


def runtime_dir() -> str:
    """Where mounts register themselves: /run/ossfuse as root, else $XDG_RUNTIME_DIR/ossfuse."""
    base = "/run" if os.geteuid() == 0 else os.environ.get("XDG_RUNTIME_DIR", "/tmp")
    return os.path.join(base, "ossfuse")


def registry_path(mountpoint: str, suffix: str = ".json") -> str:
    """Per-mount file in the runtime dir: ``.json`` (pid, config, exit status) or ``.sock``
    (the status socket)."""
    real = os.path.realpath(mountpoint)
    return os.path.join(runtime_dir(), hashlib.sha256(real.encode()).hexdigest()[:32] + suffix)


def write_registry(path: str, record: dict) -> None:
    """Write the registry record at ``path`` (from registry_path(), computed before mounting:
    resolving the mount point from the daemon's own thread once it is mounted would deadlock)."""
    os.makedirs(runtime_dir(), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(record, f)
    os.replace(path + ".tmp", path)


def read_registry(mountpoint: str) -> dict | None:
    try:
        with open(registry_path(mountpoint)) as f:
            return json.load(f)
    except (FileNotFoundError, ValueError):
        return None


def credentials_for(cfg: Config):
    """The mount's credentials provider (OSS and KMS CMKs without their own): the chain of
    open_store's docstring; resolved on first use, so a local store without KMS needs none."""
    from .store.credentials import CredentialChain
    st = cfg.store
    cred_file = st.credentials_file
    systemd_cred = os.path.join(os.environ.get("CREDENTIALS_DIRECTORY", "/nonexistent"), "oss")
    if cred_file is None and os.path.isfile(systemd_cred):
        cred_file = systemd_cred
    return CredentialChain(cred_file, ram_role=st.ram_role is not None,
                           role=None if st.ram_role in (None, "auto") else st.ram_role, imds_url=st.metadata_url)


def open_store(cfg: Config, credentials=None) -> ObjectStore:
    """The store of ``cfg``. OSS credentials come from ``store.credentials_file``, else a
    systemd credential named ``oss`` (LoadCredential=oss:FILE), else OSS_ACCESS_KEY_ID /
    OSS_ACCESS_KEY_SECRET / OSS_SESSION_TOKEN, else the ECS RAM role when ``store.ram_role``
    names one (or is "auto"); never from argv."""
    st = cfg.store
    if st.url.startswith("local://"):
        return LocalStore.from_url(st.url, max_copy_size=st.max_copy_size)
    from .store.oss import OssStore
    chain = credentials or credentials_for(cfg)
    try:
        extra = {"max_copy_size": st.max_copy_size} if st.max_copy_size else {}
        return OssStore.from_url(st.url, endpoint=st.endpoint, region=st.region, signature=st.signature,
                                 credentials=chain, retries=st.retries, **extra)
    except ValueError as e:
        raise MountError(f"{cfg.path}: store: {e}") from None


def lock_cache_dir(path: str) -> int:
    """Hold an exclusive lock on the cache dir for the daemon's life (two mounts sharing one
    would upload each other's journal)."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    fd = os.open(os.path.join(path, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise MountError(f"cache dir {path} is in use by another ossfuse mount") from None
    return fd


def check_mountpoint(mountpoint: str) -> None:
    """Refuse a missing or busy mount point; clean a stale one left by a killed daemon."""
    try:
        os.stat(mountpoint)
    except OSError as e:
        if e.errno == errno.ENOTCONN:  # "Transport endpoint is not connected": a dead FUSE mount
            log.warning("mount point %s is a stale FUSE mount; unmounting it", mountpoint)
            subprocess.run(["fusermount3", "-uz", mountpoint], check=False, capture_output=True)
        else:
            raise MountError(f"mount point {mountpoint}: {e.strerror}") from None
    if os.path.ismount(mountpoint):
        reg = read_registry(mountpoint)
        if reg and not reg.get("exited") and not process_alive(reg["pid"]):
            # its daemon is dead (killed) but the kernel still answers stat from its caches
            log.warning("mount point %s is the mount of a dead ossfuse daemon (pid %d); unmounting it",
                        mountpoint, reg["pid"])
            subprocess.run(["fusermount3", "-uz", mountpoint], check=False, capture_output=True)
        else:
            raise MountError(f"mount point {mountpoint} is busy (something is already mounted there)")
    if not os.path.isdir(mountpoint):
        raise MountError(f"mount point {mountpoint} is not a directory")


def process_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, exited but not reaped, does not count)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is not alive: it exited and waits to be reaped by its parent
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def fuse_options(cfg: Config, extra: list[str]) -> set[str]:
    opts = set(pyfuse3.default_options)  # default_permissions: the kernel checks modes
    opts |= {"fsname=ossfuse:" + os.path.basename(cfg.path).rsplit(".", 1)[0], "subtype=ossfuse"}
    if cfg.mount.allow_other:
        opts.add("allow_other")
    for o in extra:
        if o:
            opts.add(o)
    return opts


def notify_systemd(message: str) -> None:
    """sd_notify(3) without libsystemd: one datagram to $NOTIFY_SOCKET, if set."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    import socket
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        try:
            s.connect(addr)
            s.sendall(message.encode())
        except OSError as e:
            log.warning("sd_notify %r failed: %s", message, e)


def run(cfg: Config, mountpoint: str, options: list[str], on_ready) -> int:
    """Mount and serve until unmounted; returns the exit status (0, or EXIT_PENDING).
    ``on_ready()`` is called once the mount answers ``stat``. Raises MountError before mounting
    (bad CMK, busy mount point, store unreachable for ``mount.startup_timeout`` seconds)."""
    mountpoint = os.path.abspath(mountpoint)
    check_mountpoint(mountpoint)
    lock_fd = lock_cache_dir(cfg.cache.dir)
    errors = RecentErrors()
    logging.getLogger().addHandler(errors)
    try:
        credentials = credentials_for(cfg)
        try:
            keyring = Keyring(cfg.encryption, credentials)
        except (OSError, ValueError) as e:
            raise MountError(f"{cfg.path}: cannot load CMK: {e}") from None
        store = open_store(cfg, credentials)
        fs = Filesystem(cfg, store, keyring, uid=os.getuid(), gid=os.getgid())
        return trio.run(_serve, cfg, fs, mountpoint, options, on_ready, errors)
    finally:
        logging.getLogger().removeHandler(errors)
        os.close(lock_fd)


async def _wait_for_services(cfg: Config, store: ObjectStore, keyring: Keyring) -> None:
    """Retry, with backoff, until the store lists the prefix and every KMS CMK makes a data
    key, or ``startup_timeout`` passes (a server mounting at boot may start before the network);
    then raise MountError naming what is unreachable. A KMS that answers but refuses the CMK
    (unknown key, bad credentials) fails at once."""
    deadline = trio.current_time() + cfg.mount.startup_timeout
    delay = 0.5
    services = [c for c in keyring.cmks.values() if hasattr(c, "new_data_key")]
    while True:
        problems = []
        try:
            await store.list(cfg.store.prefix, max_keys=1)
        except StoreError as e:
            problems.append(f"store {cfg.store.url}: {e}")
        for cmk in services:
            try:
                await trio.to_thread.run_sync(cmk.new_data_key)
            except CmkUnavailable as e:
                problems.append(f"CMK {cmk.id!r}: {e}")
            except EnvelopeError as e:
                raise MountError(f"CMK {cmk.id!r} is refused by KMS: {e}") from None
        if not problems:
            return
        if trio.current_time() + delay > deadline:
            raise MountError(f"not reachable after {cfg.mount.startup_timeout:.0f}s: " + "; ".join(problems))
        log.warning("not reachable yet (%s); retrying in %.1fs", "; ".join(problems), delay)
        notify_systemd(f"STATUS=waiting: {'; '.join(problems)}")
        await trio.sleep(delay)
        delay = min(delay * 2, 15.0)


async def _remove_orphans(store: LocalStore) -> None:
    """Clear what crashes left in a local-directory bucket (in the background)."""
    try:
        n = await trio.to_thread.run_sync(store.remove_orphans)
    except Exception as e:  # noqa: BLE001 - housekeeping must never stop the mount
        log.warning("cleaning up the local bucket %s failed: %s", store.root, e)
        return
    if n:
        log.info("removed %d unreferenced blob(s) from the local bucket %s", n, store.root)


async def _serve(cfg: Config, fs: Filesystem, mountpoint: str, options: list[str], on_ready,
                 errors: RecentErrors) -> int:
    # Never touch the mount point from this thread once mounted: the kernel would wait for
    # this very thread to answer. Paths derived from it are computed now.
    registry, status_socket = registry_path(mountpoint), registry_path(mountpoint, ".sock")
    await _wait_for_services(cfg, fs.store, fs.keyring)
    recovered = fs.recover()
    if recovered:
        log.warning("found %d journaled file(s) from an earlier run; uploading them", recovered)
    ops = Operations(fs)
    try:
        pyfuse3.init(ops, mountpoint, fuse_options(cfg, options))
    except RuntimeError as e:
        extra = f" (check the -o options: {', '.join(options)})" if options else ""
        raise MountError(f"cannot mount at {mountpoint}: {e}{extra}") from None
    mounted = True
    status = 0
    try:
        async with trio.open_nursery() as nursery:
            fs._nursery = nursery
            fs.cache.start(nursery)
            for _ in range(cfg.mount.upload_workers):
                nursery.start_soon(fs.upload_worker)
            nursery.start_soon(_on_signals)
            nursery.start_soon(_announce, cfg, mountpoint, registry, on_ready)
            nursery.start_soon(status_mod.serve, status_socket, fs, errors, time.time())
            if isinstance(fs.store, LocalStore):
                nursery.start_soon(_remove_orphans, fs.store)
            await pyfuse3.main(min_tasks=4, max_tasks=64)
            # The kernel side is gone (fusermount -u) or a signal asked us to stop.
            notify_systemd("STOPPING=1")
            pyfuse3.close(unmount=True)
            mounted = False
            log.info("unmounted %s; finishing pending uploads", mountpoint)
            pending = await fs.drain()
            if not pending:
                log.info("all uploads are in the bucket")
            if pending:
                log.error("%d file(s) could not be uploaded; they stay journaled in %s and upload "
                          "on the next mount", pending, fs.staging.dir)
                status = EXIT_PENDING
            nursery.cancel_scope.cancel()
    finally:
        if mounted:
            pyfuse3.close(unmount=True)
        fs.close()
        await fs.store.aclose()
        write_registry(registry, {"pid": os.getpid(), "mountpoint": mountpoint, "config": cfg.path,
                                  "exited": True, "status": status})
    return status


async def _on_signals() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("signal %s: unmounting after pending uploads", signal.Signals(signum).name)
            pyfuse3.terminate()


async def _announce(cfg: Config, mountpoint: str, registry: str, on_ready) -> None:
    """Report ready only once the mount answers: stat in a thread is served by our own loop."""
    await trio.to_thread.run_sync(os.stat, mountpoint)
    write_registry(registry, {"pid": os.getpid(), "mountpoint": mountpoint, "config": cfg.path,
                                "cache_dir": cfg.cache.dir, "started": time.time(), "exited": False})
    log.info("mounted %s at %s", cfg.store.url + "/" + cfg.store.prefix, mountpoint)
    notify_systemd(f"READY=1\nSTATUS=mounted at {mountpoint}")
    on_ready()
