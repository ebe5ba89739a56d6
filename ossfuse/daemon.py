"""Running a mount: wire store, keyring and filesystem; serve FUSE under trio; shut down cleanly.

Lifecycle: make the runtime dir → lock the cache dir → wait for store and KMS → adopt the
journal (uploads queued) → mount → answer ``stat`` → report ready (parent process, registry
file, sd_notify READY=1) → serve → on unmount, SIGTERM/SIGINT or a failed background task: stop
serving, unmount, finish every pending upload, exit. Every background task runs supervised
(:class:`ossfuse.aio.Supervisor`): one that fails is logged in one line, and the daemon unmounts,
drains and exits 1; none can leave the daemon hanging.

Exit status: 0 every closed file is in the bucket; 1 a background task failed (the log says
which; uploads were still drained), or the last changes of some files could not be saved in
the cache dir (a full disk at close: each named in an ERROR line and in the registry's
``unsaved``; they are lost); 75 (EX_TEMPFAIL) some files are still journaled and upload on the
next mount, or some unlinked objects could not be deleted (one ERROR line naming the first
few; registry ``undeleted``/``undeleted_keys``) and are deleted by the next mount.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import faulthandler
import functools
import logging
import math
import os
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

import pyfuse3
import trio

from .aio import Supervisor
from . import config as config_mod
from .config import Config
from .fs import Filesystem
from .fs.model import Node
from .fuse_ops import Operations, watch_session_end
from .envelope import EnvelopeError
from .keyring import CmkUnavailable, Keyring
from . import status as status_mod
from .status import RecentErrors, log_destination
from .store.base import ObjectStore, StoreError
from .store.local import BucketMissing, LocalStore
from .store.health import StoreHealth
from .store.indoubt import read_kept
from .rekey import unreadable_sample
from .registry import EXIT_PENDING  # noqa: F401 - EX_TEMPFAIL: unmounted, uploads remain journaled
from .registry import (DEAD_MOUNT_ERRNOS, UnsafeDirError, cache_dir_user, check_private_dir, daemon_alive, ensure_runtime_dir,
                       cache_dir_in_a_mount, flocked, mounted_device, process_start_ticks, prune_exited_records, read_registry, registry_path,
                       runtime_dir, runtime_dir_too_long, write_registry)

log = logging.getLogger(__name__)

EXIT_FAILED = 1  # a background task failed: logged, unmounted, uploads drained


class MountError(Exception):
    """The mount could not start (message is the one-line reason)."""


class CacheDirInUse(MountError):
    """Another daemon holds the cache dir: its log there is not this mount's to write to."""


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


# in the cache dir: the local bucket directory a mount of it served (see open_store)
_LOCAL_BUCKET_MARK = "local-bucket"


def _served(cfg: Config) -> list[str]:
    """The local bucket directories mounts with this cache dir have served (one per line)."""
    try:
        with open(os.path.join(cfg.cache.dir, _LOCAL_BUCKET_MARK), encoding="utf-8") as f:
            return f.read().splitlines()
    except (OSError, UnicodeDecodeError):
        return []


def _mark_served(cfg: Config, root: str) -> None:
    """Add ``root`` to the local buckets this cache dir has served (not fsynced: a lost mark
    only means the next mount would make the bucket directory again if it were missing)."""
    served = _served(cfg)
    if root in served:
        return
    path = os.path.join(cfg.cache.dir, _LOCAL_BUCKET_MARK)
    try:
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in served + [root]))
        os.replace(path + ".tmp", path)
    except OSError as e:
        log.warning("cache dir %s: cannot record the bucket it serves: %s", cfg.cache.dir, e)


def open_store(cfg: Config, credentials=None, *, mounting: bool = False, create_bucket: bool = True
               ) -> ObjectStore | None:
    """The store of ``cfg``. OSS credentials come from ``store.credentials_file``, else a
    systemd credential named ``oss`` (LoadCredential=oss:FILE), else OSS_ACCESS_KEY_ID /
    OSS_ACCESS_KEY_SECRET / OSS_SESSION_TOKEN (or the ALIBABA_CLOUD_* names), else
    ALIBABA_CLOUD_CREDENTIALS_URI, else the ECS RAM role when ``store.ram_role`` names one (or
    is "auto"); never from argv (``store.credentials.CredentialChain``).

    A local bucket directory is made only while no mount with this cache dir has served it;
    once one did (``mounting`` adds it to the cache dir's ``local-bucket`` mark), a missing one
    is refused, also by check and rekey: its disk is most likely not mounted, and a new empty
    bucket on the disk below would take the writes meant for it and be hidden once the disk
    is mounted again. ``create_bucket`` False (``check``: it changes nothing): a missing local
    bucket directory never served is not made, and None is returned (the first mount makes it)."""
    st = cfg.store
    try:
        if st.url.startswith("local://"):
            root = LocalStore.root_of(st.url)
            served = root in _served(cfg)
            try:
                store = LocalStore(root, max_copy_size=st.max_copy_size, create=not served and create_bucket)
            except BucketMissing as e:
                if not served and not create_bucket and not os.path.lexists(root):
                    return None
                if not os.path.islink(root):  # (a dangling symlink says so itself)
                    raise ValueError(f"{e}, but a mount with this cache dir used it before (is the disk that holds "
                                     f"it mounted? was it moved?); to start a new, empty bucket there, create it: "
                                     f"mkdir -m 700 {root}") from None
                raise
            if mounting:
                _mark_served(cfg, root)
            return store
        from .store.oss import OssStore
        chain = credentials or credentials_for(cfg)
        extra = {"max_copy_size": st.max_copy_size} if st.max_copy_size else {}
        return OssStore.from_url(st.url, endpoint=st.endpoint, region=st.region, signature=st.signature,
                                 credentials=chain, retries=st.retries, deadline=st.request_deadline, **extra)
    except ValueError as e:  # a malformed url, an unsafe local bucket dir
        raise MountError(f"{cfg.path}: store: {e}") from None


def lock_cache_dir(path: str) -> int:
    """Check the cache dir is safe (:func:`ossfuse.registry.check_private_dir`) and hold an exclusive lock
    on it for the daemon's life (two mounts sharing one would upload each other's journal).
    Returns the lock's fd; raises MountError."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except OSError as e:
        raise MountError(f"cache dir {path}: {e.strerror}") from None
    try:
        check_private_dir(path, "cache dir")
    except UnsafeDirError as e:
        raise MountError(str(e)) from None
    fd = flocked(os.path.join(path, "lock"))
    if fd is None:
        raise CacheDirInUse(f"cache dir {path} is in use by {cache_dir_user(path) or 'another ossfuse mount'}")
    return fd


_BUCKET_MARK = "bucket"  # the bucket (StoreConfig.identity) the cache dir's pending work is for
_IN_DOUBT_LOG = "indoubt.log"  # requests given up on that may still land (store/indoubt.py InDoubt.keep_in)
# the cache dir's parts that hold work to finish in its bucket: file name suffixes counted
_PENDING_WORK = (("staging", ".json", "journaled file(s)"), ("unlinked", ".json", "pending delete(s)"),
                 ("renames", "", "unfinished rename(s)"), ("multipart", "", "multipart upload(s) to abort"))


def check_cache_bucket(cfg: Config) -> None:
    """Refuse a cache dir (its lock held) whose pending work is for another bucket than
    ``cfg``'s (its ``bucket`` mark, written at each mount): journaled files, pending deletes,
    rename logs, multipart uploads and requests in doubt (``indoubt.log``: a mistyped bucket's
    failed mount dropped them, break trial BT16b F3) are replayed at mount against the store
    mounted, and a trial's pending deletes of one bucket deleted same-named empty files of
    another (the ETag check cannot tell: every empty object's is the same). Raises MountError
    naming both buckets and the way out; a cache dir with nothing pending simply changes bucket."""
    mark = os.path.join(cfg.cache.dir, _BUCKET_MARK)
    try:
        with open(mark, encoding="utf-8") as f:
            recorded = f.read().strip()
    except (OSError, UnicodeDecodeError):
        recorded = ""  # none yet (a new cache dir, or one of an earlier ossfuse)
    here = cfg.store.identity
    if recorded == here:
        return
    if recorded:
        pending = []
        for sub, suffix, what in _PENDING_WORK:
            try:
                n = sum(1 for name in os.listdir(os.path.join(cfg.cache.dir, sub))
                        if name.endswith(suffix) and not name.startswith(".") and name != "quarantine")
            except OSError:
                n = 0
            if n:
                pending.append(f"{n} {what}")
        try:  # (requests it gave up on, which may still land: watched by that bucket's next mount)
            if n := len(read_kept(os.path.join(cfg.cache.dir, _IN_DOUBT_LOG))):
                pending.append(f"{n} request(s) in doubt")
        except OSError:
            pass
        if pending:
            raise MountError(f"cache dir {cfg.cache.dir} holds work for the bucket {recorded} ({', '.join(pending)}), "
                             f"not this config's {here}: mount it with that bucket's config to finish the work, or "
                             f"give this config a cache dir of its own")
        with contextlib.suppress(FileNotFoundError):  # (the other bucket's: none still in doubt, above)
            os.unlink(os.path.join(cfg.cache.dir, _IN_DOUBT_LOG))
    try:
        with open(mark + ".tmp", "w", encoding="utf-8") as f:
            f.write(here + "\n")
        os.replace(mark + ".tmp", mark)
    except OSError as e:
        log.warning("cache dir %s: cannot record the bucket it serves: %s", cfg.cache.dir, e)


def lock_mountpoint(mountpoint: str) -> int:
    """Hold an exclusive lock on ``mountpoint`` (a ``.lock`` file beside its registry record)
    for the daemon's life: two `ossfuse mount` at once (an fstab line and a unit for the same
    path at boot) both passed the busy check and stacked two mounts there, the second's record
    hiding the first's (a trial). Returns the lock's fd; raises MountError."""
    fd = flocked(registry_path(mountpoint, ".lock"))
    if fd is None:
        raise MountError(f"mount point {mountpoint} is busy (another ossfuse is mounting there)")
    return fd


def check_mountpoint(mountpoint: str, nonempty: bool = False) -> str | None:
    """Refuse a missing, busy or (unless ``nonempty``) non-empty mount point; clean a stale
    one left by a killed daemon, and return a line saying so for the user (logged with
    start-up's other notices and printed by ``ossfuse mount``; a new-user trial: the only trace
    of the dead daemon was a line in the log); None when nothing was there. Raises
    MountError."""
    notice = None
    try:
        os.stat(mountpoint)
    except OSError as e:
        if e.errno in DEAD_MOUNT_ERRNOS:  # a dead FUSE mount
            notice = f"mount point {mountpoint} was the dead mount of an earlier daemon (killed or crashed): unmounted it first"
            subprocess.run(["fusermount3", "-uz", mountpoint], check=False, capture_output=True)
        else:
            raise MountError(f"mount point {mountpoint}: {e.strerror}") from None
    reg = read_registry(mountpoint)
    if os.path.ismount(mountpoint):
        device = mounted_device(mountpoint)  # None: not an ossfuse mount (a tmpfs, a bind of a dir…)
        if (reg and not reg.get("exited") and not daemon_alive(reg) and device is not None
                and reg.get("device") in (None, device)):
            # its daemon is dead (killed) but the kernel still answers stat from its caches
            notice = f"mount point {mountpoint} was the mount of a dead ossfuse daemon (pid {reg['pid']}): unmounted it first"
            subprocess.run(["fusermount3", "-uz", mountpoint], check=False, capture_output=True)
        else:
            raise MountError(f"mount point {mountpoint} is busy (something is already mounted there)")
    elif reg and not reg.get("exited") and daemon_alive(reg):
        # its record (and status socket) would be replaced while that daemon still serves
        raise MountError(f"the daemon of the earlier mount at {mountpoint} (pid {reg['pid']}) still runs: it "
                         f"serves a bind mount of it, or finishes its uploads; unmount that (ossfuse umount) "
                         f"or wait for it")
    if not os.path.isdir(mountpoint):
        raise MountError(f"mount point {mountpoint} is not a directory")
    if not nonempty:
        entries = os.listdir(mountpoint)
        if entries:
            raise MountError(f"mount point {mountpoint} is not empty ({len(entries)} {'entry' if len(entries) == 1 else 'entries'}, e.g. "
                             f"{sorted(entries)[0]!r}): the mount would hide them; use an empty directory, "
                             f"or mount over it anyway with -o nonempty")
    return notice


def fuse_options(cfg: Config, extra: list[str]) -> set[str]:
    opts = set(pyfuse3.default_options)  # default_permissions: the kernel checks modes
    # the source mount(8) shows and compares: the config path, as an fstab line names it, so a
    # second `mount -a` sees the entry mounted (a comma or backslash is escaped for libfuse)
    source = cfg.path.replace("\\", "\\\\").replace(",", "\\,")
    opts |= {"fsname=" + source, "subtype=ossfuse"}
    if cfg.mount.allow_other:
        opts.add("allow_other")
    for o in extra:
        if o:
            opts.add(o)
    return opts


def set_read_ahead(mountpoint: str, kib: int) -> None:
    """Let the kernel read ``kib`` KiB ahead of a sequential reader of this mount: write the
    mount's ``/sys/class/bdi/MAJOR:MINOR/read_ahead_kb`` (FUSE starts every mount at 128 KiB, and
    a FUSE read request is at most the read-ahead window, so a bigger window means fewer and
    larger read requests: max_pages is 256 pages, 1 MiB, with libfuse 3). Call it after the
    kernel's FUSE_INIT: its reply sets the window to min(default, max_readahead). Reads only
    /proc/self/mountinfo, never the mount point (this thread serves it). Needs root: otherwise,
    or with kib 0, the kernel's default stays and one INFO line says why."""
    if not kib:
        return
    dev = mounted_device(mountpoint)
    try:
        if dev is None:
            raise FileNotFoundError(errno.ENOENT, "not in /proc/self/mountinfo")
        with open(f"/sys/class/bdi/{dev}/read_ahead_kb", "w") as f:
            f.write(str(kib))
    except OSError as e:
        log.info("kernel read-ahead of %s left at its default: cannot set %d KiB (%s)", mountpoint, kib,
                 e.strerror or e)


def _note_unmounted(mountpoint: str) -> None:
    """Say in this daemon's record that its mount at ``mountpoint`` is gone: its device number
    is free for the next mount, and a bind mount's ``record_of`` must not find this record by
    it (``registry.record_of``). A record that cannot be rewritten is left (DEBUG)."""
    record = read_registry(mountpoint)
    if record is not None and record.get("pid") == os.getpid():
        try:
            write_registry(registry_path(mountpoint), dict(record, unmounted=True))
        except (OSError, UnsafeDirError) as e:
            log.debug("cannot note the unmount of %s in its record: %s", mountpoint, e)


# mallopt(3) parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def tune_malloc() -> bool:
    """Keep the 1 MiB buffers of FUSE writes and reads in glibc's heap: every request allocates
    and frees a few (libfuse's copy of a write's data, its ciphertext), and with glibc's default
    thresholds each free trimmed the heap and each next allocation faulted fresh zeroed pages
    back in: a third of the daemon's CPU during `dd` of 256 MiB into a mount (perf:
    clear_page_erms, brk; 0.65 s → 0.42 s, system time 0.33 → 0.10 s; bench/RESULTS.md,
    nineteenth session). Above 4 MiB allocations are mapped as before, and at most 8 MiB of
    free heap is kept per arena. Returns False where there is no glibc mallopt (nothing
    changed)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, 4 << 20) and mallopt(_M_TRIM_THRESHOLD, 8 << 20))


def raise_fd_limit() -> tuple[int, int]:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit, as servers do (Go's runtime
    does it for every program): every file open for writing holds a work file descriptor,
    and the usual soft limit of 1024 made the 1000th open writer fail with EMFILE (a trial:
    writes and closes failed by the thousand). Returns (soft, hard) after."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (OSError, ValueError) as e:  # a hard limit above what the kernel allows (nr_open)
            log.debug("cannot raise the open-file limit from %d to %d: %s", soft, hard, e)
    return soft, hard


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


class Readiness(Protocol):
    """How the daemon tells whoever started it that the mount is usable, or why it is not:
    ``ready()`` once it answers, ``failed(reason)`` when it ends before that. Implemented by
    the CLI's ready pipe of a daemonizing ``ossfuse mount`` (a protocol: the CLI need not
    import this module to define it) and by NoReadiness."""

    def ready(self, notices: list[str]) -> None: ...

    def failed(self, reason: str) -> None: ...

    def waiting(self, why: str) -> None: ...


class NoReadiness:
    """Readiness for a mount in the foreground: nobody waits, nothing to tell (the notices
    are in the log, which is the terminal's or the journal's)."""

    def ready(self, notices: list[str]) -> None:
        pass

    def failed(self, reason: str) -> None:
        pass

    def waiting(self, why: str) -> None:
        pass


def run(cfg: Config, mountpoint: str, options: list[str], readiness: Readiness) -> int:
    """Mount and serve until unmounted; returns the exit status: 0, EXIT_PENDING (uploads left
    in the journal, or deletes left for the next mount) or EXIT_FAILED (a background task
    failed: logged, unmounted, drained).
    Raises MountError before mounting (bad CMK, busy or non-empty mount point, unsafe cache or
    runtime dir, store unreachable for ``mount.startup_timeout`` seconds)."""
    mountpoint = os.path.abspath(mountpoint)
    nonempty = "nonempty" in options  # ours to check: libfuse 3 has no such option
    options = [o for o in options if o != "nonempty"]
    too_long = runtime_dir_too_long()
    if too_long and not os.path.isdir(runtime_dir()):  # refused before it is made
        raise MountError(too_long)
    try:
        ensure_runtime_dir()
    except UnsafeDirError as e:
        raise MountError(str(e)) from None
    if too_long:  # (an existing one: its safety is said first)
        raise MountError(too_long)
    inside = config_mod.dir_inside_mountpoint(cfg, mountpoint)
    if inside:
        raise MountError(inside)
    inside = cache_dir_in_a_mount(cfg.cache.dir)
    if inside:
        raise MountError(inside)
    stale = check_mountpoint(mountpoint, nonempty)  # (its reasons first: a daemon still serving a bind mount, ...)
    mountpoint_lock = lock_mountpoint(mountpoint)  # another mount checked at the same time: busy
    try:
        lock_fd = lock_cache_dir(cfg.cache.dir)
    except BaseException:
        os.close(mountpoint_lock)
        raise
    try:
        check_cache_bucket(cfg)
    except BaseException:
        os.close(lock_fd)
        os.close(mountpoint_lock)
        raise
    errors = RecentErrors()
    logging.getLogger().addHandler(errors)
    logging.getLogger("pyfuse3").addFilter(_undelivered_reply_is_info)
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 PID`: every stack to the log's stderr
    if not tune_malloc():
        log.debug("no glibc mallopt: malloc keeps its default thresholds")
    raise_fd_limit()
    try:
        credentials = credentials_for(cfg)
        try:
            keyring = Keyring(cfg.encryption, credentials)
            # data keys of files read or written here before: no RSA work to open them again
            keyring.attach_key_cache(os.path.join(cfg.cache.dir, "datakeys.sqlite"))
        except (OSError, ValueError) as e:
            raise MountError(f"{cfg.path}: cannot load CMK: {e}") from None
        for cmk in dict.fromkeys([keyring.default] + [c for _, c in keyring.rules]):
            reason = keyring.unreadable_reason(cmk)  # it would write files this config cannot read
            if reason:
                raise MountError(f"{cfg.path}: new files would be unreadable: {reason}")
        store = open_store(cfg, credentials, mounting=True)
        assert store is not None  # (made when missing: create_bucket)
        fs = Filesystem(cfg, store, keyring, uid=os.getuid(), gid=os.getgid())
        return trio.run(_serve, cfg, fs, mountpoint, options, readiness, errors, [stale] if stale else [])
    finally:
        logging.getLogger().removeHandler(errors)
        os.close(lock_fd)
        os.close(mountpoint_lock)


async def _kms_answers(services: list, deadline: float) -> tuple[dict[str, str | None], list[str]]:
    """Ask each KMS CMK of ``services`` for a data key, all at once and never past
    ``deadline`` (trio time): one after another, each hung KMS took its own ~20 s of retries,
    and three failed the mount (a trial). Returns ({CMK id: None when it made a key, else why
    not; missing: no answer by the deadline}, [why a KMS refused a CMK: permanent])."""
    answers: dict[str, str | None] = {}
    refused: list[str] = []

    async def ask(cmk) -> None:
        try:  # (a KMS that never answers is abandoned at the deadline: its thread ends on its own)
            await trio.to_thread.run_sync(cmk.new_data_key, abandon_on_cancel=True)
            answers[cmk.id] = None
        except CmkUnavailable as e:
            answers[cmk.id] = f"CMK {cmk.id!r}: {e}"
        except EnvelopeError as e:
            refused.append(f"CMK {cmk.id!r} is refused by KMS: {e}")
        except StoreError as e:  # its credentials (a file of mode 0644, not TOML: a trial's traceback)
            if not e.temporary:
                refused.append(f"CMK {cmk.id!r}: {e}")
            answers[cmk.id] = f"CMK {cmk.id!r}: {e}"

    with trio.move_on_at(deadline):
        async with trio.open_nursery() as nursery:
            for cmk in services:
                nursery.start_soon(ask, cmk)
    return answers, refused


def lost_work_notice(lost: list[str | None], path_of) -> str:
    """The start-up notice naming the files whose unsaved changes of an earlier run were
    deleted (``lost``: their keys, None when not recorded; ``path_of(key)``: the path in the
    folder, None outside the prefix): by path, as the user knows them (a trial read
    'team/keep.txt', a key with its prefix, for keep.txt), at most three, and where the log is."""
    shown = ["a file whose name was not recorded" if key is None else repr(path_of(key) or key) for key in lost[:3]]
    named = ", ".join(shown) + (f" and {len(lost) - 3} more" if len(lost) > 3 else "")
    return (f"the unsaved changes of {len(lost)} file(s) left by an earlier run (open when it crashed or was "
            f"killed, or not savable at their close) are deleted: {named}; each file keeps its last saved version, "
            f"or is empty or absent if it had none (the log names each: {log_destination()})")


MOUNT_SAMPLE = 3  # encrypted objects whose data key a mount tries to unwrap at start
MOUNT_SAMPLE_HEADS = 20  # objects it HEADs at most to find them (plaintext ones are skipped)


async def _unreadable_objects(cfg: Config, fs: Filesystem) -> list[str]:
    """A notice when the first encrypted objects under the prefix (at most MOUNT_SAMPLE, found
    in at most MOUNT_SAMPLE_HEADS HEADs, one at a time) do not open with this config's CMKs: a
    wrong ``private_key`` mounted with no word, and its new files went into the prefix under a
    key the other clients cannot read (a trial). The mount goes on (objects of other CMKs may
    be expected: a bucket several teams write); a store failure here says nothing (the
    mount's requests report it)."""
    try:
        sampled, unreadable = await unreadable_sample(cfg, fs.keyring, fs.store, MOUNT_SAMPLE, MOUNT_SAMPLE_HEADS)
    except StoreError as e:
        log.info("sampling the bucket's envelopes at mount: %s", e)
        return []
    if not unreadable:
        return []
    key, why = unreadable[0]
    where = "under the prefix" if cfg.store.prefix else "in the bucket"
    return [f"{len(unreadable)} of the first {sampled} encrypted objects {where} cannot be read with this "
            f"config's CMKs (e.g. {key!r}: {why}): reading them fails (EIO, or EACCES when no CMK matches their "
            f"matdesc; a wrong private_key, or a CMK missing from {cfg.path}?); new files are encrypted with CMK "
            f"{fs.keyring.default.id!r}. `ossfuse check -c {cfg.path}` samples more"]


_SAY_SILENT_AFTER = 3.0  # seconds without an answer from the store before `ossfuse mount` says it waits


async def _wait_for_services(cfg: Config, store: ObjectStore, keyring: Keyring,
                             readiness: Readiness | None = None) -> list[str]:
    """Retry, with backoff, until the store lists the prefix and every KMS CMK makes a data
    key, or ``startup_timeout`` passes (a server mounting at boot may start before the network);
    then raise MountError naming what is unreachable — unless only KMS CMKs are: the mount
    then goes on (what other CMKs encrypt stays readable and writable, as when KMS goes away
    later; an operator trial found RSA files unreachable for a KMS outage), and the returned
    notices (one per CMK) say what fails with EIO until KMS answers. A KMS that answers but
    refuses the CMK (unknown key, bad credentials) fails at once. The first retry is told to
    ``readiness`` (the terminal of `ossfuse mount` showed nothing for a minute: a new user)."""
    started = trio.current_time()
    deadline = started + cfg.mount.startup_timeout
    delay = 0.5
    said_waiting = False
    services = [c for c in keyring.cmks.values() if hasattr(c, "new_data_key")]
    while True:
        problems = []
        try:
            quiet_for = _SAY_SILENT_AFTER if readiness is not None and not said_waiting else math.inf
            with trio.move_on_after(quiet_for) as silent:
                await store.list(cfg.store.prefix, max_keys=1)
            if silent.cancelled_caught and readiness is not None:  # (read-only: sent again harmlessly)
                # a store that takes connections and never answers is waited for as long as its
                # timeouts say: `ossfuse mount` was silent for 45 s (new-user trial NU6)
                readiness.waiting(f"store {cfg.store.url}: no answer yet after {quiet_for:g}s; waiting for up to "
                                  f"{cfg.mount.startup_timeout:g}s (startup_timeout)")
                said_waiting = True
                await store.list(cfg.store.prefix, max_keys=1)
        except StoreError as e:
            if not e.temporary:  # wrong credentials, no such bucket: waiting cannot fix it
                raise MountError(f"store {cfg.store.url}: {e}") from None
            problems.append(f"store {cfg.store.url}: {e}")
        answers, refused = await _kms_answers(services, deadline)
        if refused:
            raise MountError(refused[0])
        for cmk in services:
            if cmk.id not in answers:
                problems.append(f"CMK {cmk.id!r}: KMS did not answer")
            elif (why := answers[cmk.id]) is not None:
                problems.append(why)
        if not problems:
            return []
        if trio.current_time() + delay > deadline:  # (the next try would end past it: the time tried is said)
            if not problems[0].startswith(f"store {cfg.store.url}: "):  # the store answers: KMS alone is down
                return [f"{p}: unreachable for {trio.current_time() - started:.0f}s (startup_timeout); mounted "
                        f"anyway: files under that CMK fail with EIO (reads of its objects, and new files it "
                        f"would encrypt) until it answers, the rest works" for p in problems]
            # (the time tried can pass startup_timeout by the last try's own wait for an answer)
            tried = trio.current_time() - started
            late = "; the last try's wait for an answer ran past it" if tried > cfg.mount.startup_timeout + 0.5 else ""
            raise MountError(f"not reachable after {tried:.0f}s of tries (startup_timeout "
                             f"{cfg.mount.startup_timeout:g}s{late}): " + "; ".join(problems))
        log.warning("not reachable yet (%s); retrying in %.1fs", "; ".join(problems), delay)
        notify_systemd(f"STATUS=waiting: {'; '.join(problems)}")
        if readiness is not None and not said_waiting:  # (the user of `ossfuse mount` waits: say why, once)
            readiness.waiting(f"not reachable yet ({'; '.join(problems)}); retrying for up to "
                              f"{cfg.mount.startup_timeout:g}s (startup_timeout)")
            said_waiting = True
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


class _Lifecycle:
    """The state the serving tasks share: where the daemon is in its life, whether the FUSE
    session is open, and the first failure of a background task.

    States: ``serving`` (pyfuse3.main runs) → ``draining`` (unmounted, pending uploads finish)
    → exit. ``stop()`` ends serving; it may be called from any task, any number of times, and
    never touches a closed session (pyfuse3.terminate() after close() dereferences NULL)."""

    def __init__(self, mountpoint: str):
        self.mountpoint = mountpoint
        self.state = "serving"
        self.session_open = False
        self.failure: str | None = None
        self.status_up = trio.Event()  # the status socket listens (part of being ready)

    def stop(self) -> None:
        if self.session_open and self.state == "serving":
            pyfuse3.terminate()

    def task_failed(self, name: str, exc: BaseException) -> None:
        """A supervised background task died (already logged): unmount and exit non-zero."""
        if self.failure is None:
            self.failure = f"{name} failed: {type(exc).__name__}: {exc}"
        self.stop()

    def close_session(self) -> None:
        """Close the FUSE session, unmounting only if it is still mounted here (after
        fusermount -u, unmounting again only makes libfuse log "Invalid argument")."""
        if self.session_open:
            self.session_open = False
            pyfuse3.close(unmount=mounted_device(self.mountpoint) is not None)


async def _serve(cfg: Config, fs: Filesystem, mountpoint: str, options: list[str], readiness: Readiness,
                 errors: RecentErrors, found: list[str]) -> int:
    """Serve the mount until unmounted (``run``'s body, in trio); ``found``: lines for the user
    that the checks before it found (a stale mount cleared), printed with start-up's others."""
    # Never touch the mount point from this thread once mounted: the kernel would wait for
    # this very thread to answer. Paths derived from it are computed now.
    registry, status_socket = registry_path(mountpoint), registry_path(mountpoint, ".sock")
    # what start-up found that the user should know: logged, and printed by `ossfuse mount`
    # (a file missing from the folder with only a line in a log file was a trial's finding)
    notices: list[str] = await _wait_for_services(cfg, fs.store, fs.keyring, readiness)
    kms_away = bool(notices)  # (then objects of its CMKs do not open: already said, and no key is wrong)
    notices = found + notices
    health = StoreHealth(cfg.store.offline_timeout)  # from now on the mount may work offline
    fs.track_store_health(health)
    in_doubt = getattr(fs.store, "in_doubt", None)  # (OSS: writes given up on, store/indoubt.py)
    if in_doubt is not None:  # (before the journal's recovery notes its own doubts)
        try:
            if taken := in_doubt.keep_in(os.path.join(cfg.cache.dir, _IN_DOUBT_LOG)):
                log.info("%d request(s) an earlier run gave up on may still land; watched for until their window "
                         "ends", taken)
        except OSError as e:  # (what the file held is watched all the same, and stays in it)
            log.warning("cache dir %s: cannot rewrite %s (%s): the requests in doubt it holds are watched, but "
                        "those this run gives up on are not noted there (a crash would forget them)", cfg.cache.dir,
                        _IN_DOUBT_LOG, e)
    earlier_quarantined = fs.staging.quarantined()
    recovered = fs.recover()
    quarantined = fs.staging.quarantined()
    if lost := fs.staging.lost_work:  # each named in its own WARNING line (journal._warn_lost_work)
        notices.append(lost_work_notice(lost, fs.naming.path_of))
    if quarantined:  # each entry this start-up quarantined logged its own ERROR already
        one = quarantined == 1
        # damaged, or of another bucket or prefix (a cache dir mounted with another): never uploaded;
        # the bucket keeps what it has at such a name (an older version, or nothing)
        notices.append(f"{quarantined} journal entr{'y' if one else 'ies'} this mount cannot upload "
                       f"({quarantined - earlier_quarantined} new; damaged, or of another bucket or prefix: the log names "
                       f"{'it' if one else 'each'} and why) {'is' if one else 'are'} kept in "
                       f"{fs.staging.quarantine_dir}, never uploaded: the bucket keeps what it has at "
                       f"{'that name' if one else 'those names'} (an older version, or nothing); recover by hand "
                       "or delete (docs/design.md, \"Write-back and the journal\")")
    notices += await fs.settle_renames()  # renames a crash cut off: undone or finished
    await fs.abort_orphaned_uploads()  # a crash's unfinished multipart uploads: OSS bills their parts
    if await fs.finish_unlinks():
        notices.append("some objects whose delete an earlier run left (files unlinked while open, a rename's "
                       "originals) could not be deleted yet; hidden, and tried again every retry_interval and at "
                       "the next mount")
    if recovered:
        notices.append(f"found {recovered} journaled file(s) from an earlier run; queued for upload")
    if not kms_away:
        notices += await _unreadable_objects(cfg, fs)
    for line in notices:
        log.warning("%s", line)
    if fs.staging.space_warning:  # (logged by check_space) the operator sees it at mount, not only in the log
        notices.append(fs.staging.space_warning)
    life = _Lifecycle(mountpoint)
    ops = Operations(fs)
    try:
        pyfuse3.init(ops, mountpoint, fuse_options(cfg, options))
    except RuntimeError as e:
        # libfuse wrote the cause to stderr (the log): the usual ones, said here too
        if not os.access("/dev/fuse", os.R_OK | os.W_OK):
            extra = " (this user cannot open /dev/fuse: run as root, or get read-write access to /dev/fuse)"
        else:
            extra = f" (check the -o options: {', '.join(options)})" if options else ""
        raise MountError(f"cannot mount at {mountpoint}: {e}{extra}") from None
    life.session_open = True
    status = 0
    unsaved: list[str] = []  # paths whose last changes could not be saved (lost at exit)
    journaled = 0  # files whose upload failed: journaled, uploaded at the next mount
    journaled_paths: list[str] = []  # the first of them (mount-relative), for umount's line
    upload_error: str | None = None  # "path: reason" of the first of them with a failure recorded
    undeleted: list[str] = []  # object keys unlinked here whose DELETE failed: done at the next mount
    not_durable: str | None = None  # why the unmount's durability barrier failed
    try:
        async with trio.open_nursery() as nursery:
            # Every background task is supervised: one that fails is logged, then the mount
            # unmounts, drains and exits non-zero (nothing can die silently or hang start-up).
            tasks = Supervisor(nursery, life.task_failed)
            fs._nursery = tasks
            fs.cache.start(tasks)
            for i in range(cfg.mount.upload_workers):
                tasks.start_soon(fs.upload_worker, name=f"upload worker {i + 1}")
            tasks.start_soon(_on_signals, life, fs, name="signal handler")
            tasks.start_soon(watch_session_end, ops, name="FUSE session end watch")
            tasks.start_soon(_announce, cfg, mountpoint, registry, readiness, life, notices, name="readiness check")
            tasks.start_soon(status_mod.serve, status_socket, fs, errors, time.time(), life,
                             name=f"status socket {status_socket}")
            health.confirm = probe = functools.partial(fs.store.list, cfg.store.prefix, max_keys=1)
            tasks.start_soon(health.watch, probe,
                             name="store reachability probe")
            if isinstance(fs.store, LocalStore):
                tasks.start_soon(_remove_orphans, fs.store, name="local bucket cleanup")
            if in_doubt is not None:
                tasks.start_soon(in_doubt.watch, fs.store.head, _delete_version_of(fs.store), fs.put_back,
                                 name="late-request check")
            if not fs.store.local_disk:
                tasks.start_soon(fs.watch_late_copies, name="late rename copies")
            await pyfuse3.main(min_tasks=4, max_tasks=64)
            # The kernel side is gone (fusermount -u), a signal asked us to stop, or a task failed.
            life.state = "draining"
            _note_unmounted(mountpoint)
            notify_systemd("STOPPING=1")
            life.close_session()
            # no kernel to tell any more: a conflict copy the drain makes must not notify it
            # (pyfuse3 logged an ERROR and a traceback per conflict found at unmount: a trial)
            fs.on_entry_moved(lambda parent_ino, name: None)
            if life.failure:
                readiness.failed(life.failure)
            else:  # (nothing once ready was said)
                readiness.failed(f"the mount at {mountpoint} ended before it answered; its log says why"
                                 + (f" (check the -o options: {', '.join(options)})" if options else ""))
            log.info("unmounted %s; finishing pending uploads", mountpoint)
            tasks.start_soon(_report_drain, fs, name="drain progress")
            writers = _open_writers(fs)
            health.probe_next()  # offline: the drain's first request asks the store again at once
            pending = await fs.drain()
            _warn_open_writers(fs, writers)
            # never claim journaled what is not: changes whose seal failed are named (ERROR each)
            still, unsaved = fs.pending_report()
            if still:  # umount names them (registry "journaled_paths", "upload_error")
                journaled_paths = [path for path, _why in still[:10]]
                upload_error = next((f"{path}: {why}" for path, why in still if why), None)
            if still or (pending and not unsaved):
                journaled = len(still) or pending
                log.error("%d file(s) could not be uploaded; they stay journaled in %s and upload "
                          "on the next mount", journaled, fs.staging.dir)
                status = EXIT_PENDING
            undeleted = fs.pending_deletes()
            if undeleted:  # recorded in the cache dir: the next mount deletes them before serving
                log.error("%d unlinked object(s) could not be deleted from the bucket (%s); other clients "
                          "may still see them until the next mount deletes them", len(undeleted), _some(undeleted))
                status = EXIT_PENDING
            if unsaved:
                status = EXIT_FAILED
            if not fs.store_durable:  # its ERROR line is logged: a finished unmount promises durability
                status, not_durable = EXIT_FAILED, ("the store's durability barrier failed: the last changes "
                                                    "may not survive a power loss")
            if not pending:
                log.info("all uploads are in the bucket")
            if in_doubt is not None:
                # landed already: undo or say so now
                await in_doubt.check_due(fs.store.head, _delete_version_of(fs.store), fs.put_back)
                if stale := in_doubt.stale_left():  # (break trial BT16c: exit 0, and the removed file was back)
                    log.error("%d late upload(s) of files removed or moved here could not be deleted again (%s); the "
                              "next mount of this cache dir tries again", len(stale), _some(stale))
                    undeleted = undeleted + stale
                    if status != EXIT_FAILED:
                        status = EXIT_PENDING
                if late := in_doubt.pending():  # nobody watches them after the exit
                    earlier = sum(in_doubt.earlier_only(k) for k in late)
                    log.warning("%d key(s) got a later write of this mount after a request to them was given up "
                                "without an answer (%s%s): for up to %d minutes that request may still land over "
                                "it, and only the next mount of this cache dir watches for that: look at them then",
                                len(late), _some(late),
                                "" if not earlier else "; by an earlier run of this mount" if earlier == len(late)
                                else f"; {earlier} of them by an earlier run of this mount", round(in_doubt.window / 60))
            nursery.cancel_scope.cancel()
    finally:
        life.close_session()
        closing = time.monotonic()
        fs.close()
        await fs.store.aclose()
        log.debug("cache and store closed in %.2f s", time.monotonic() - closing)
        if life.failure:
            log.error("exiting after a failure: %s", life.failure)
            status = EXIT_FAILED
        write_registry(registry, {"pid": os.getpid(), "mountpoint": mountpoint, "config": cfg.path,
                                  "exited": True, "exited_at": time.time(), "status": status, "failure": life.failure or not_durable,
                                  "unsaved": unsaved, "journaled": journaled, "journaled_paths": journaled_paths,
                                  "upload_error": upload_error, "log": log_destination(),
                                  "undeleted": len(undeleted), "undeleted_keys": undeleted[:10]})
    return status


def _delete_version_of(store: ObjectStore) -> Callable[[str, str], Awaitable[None]]:
    """``delete(key, etag)``: that version of ``key`` deleted from ``store`` (InDoubt.check_due)."""
    async def delete(key: str, etag: str) -> None:
        await store.delete(key, version=etag)
    return delete


def _some(keys: list[str], shown: int = 3) -> str:
    """The first ``shown`` of ``keys`` for one log line: ``'a', 'b', 'c' and 7 more``."""
    more = f" and {len(keys) - shown} more" if len(keys) > shown else ""
    return ", ".join(repr(k) for k in keys[:shown]) + more


def _pending(fs: Filesystem) -> tuple[int, int]:
    """(files, bytes) closed or open but not yet in the bucket."""
    nodes = [n for n in fs.dirty if n.staged is not None and not n.unlinked]
    return len(nodes), sum(n.staged.size for n in nodes if n.staged is not None)


def _open_writers(fs: Filesystem) -> list[tuple[Node, str, int]]:
    """(node, object key, bytes) of each file a process still holds open for writing with
    changes since its last close or fsync (an open, unsealed staged version), at the moment the
    mount stops serving: no close completed them, so what the drain stores is the data written
    so far. A version sealed by a close and waiting for its upload is complete: not listed."""
    return [(n, fs.key(n.path), n.staged.size) for n in fs.dirty
            if n.staged is not None and not n.staged.sealed and not n.unlinked
            and any(h.writable for h in n.handles)]


def _warn_open_writers(fs: Filesystem, writers: list[tuple[Node, str, int]]) -> None:
    """One WARNING per file that was open for writing at shutdown (docs/semantics.md,
    "Lifecycle"): its data written so far is kept (uploaded by the drain, or journaled for the
    next mount when that failed), but no close completed it."""
    for node, key, size in writers:
        if node in fs.dirty and node.staged is not None and not node.unlinked:
            log.warning("%r was open for writing at shutdown: the %d bytes written so far stay journaled "
                        "(upload failed) and upload at the next mount; its writer never closed it", key, size)
        else:
            log.warning("%r was open for writing at shutdown: stored the %d bytes written so far; its writer "
                        "never closed it", key, size)


def _undelivered_reply_is_info(record: logging.LogRecord) -> bool:
    """A logging filter for pyfuse3: its ERROR "fuse_reply_* failed with No such file or
    directory" means the kernel no longer waited for that reply (the request was interrupted:
    a reader killed while its read waited for the store, a trial; or the mount was gone): not
    an error of the mount, so one INFO line."""
    if record.levelno >= logging.ERROR and "fuse_reply_* failed with No such file or directory" in record.getMessage():
        record.levelno, record.levelname = logging.INFO, "INFO"
    return True


async def _report_drain(fs: Filesystem, every: float = 5.0) -> None:
    """While uploads drain after the unmount, say every ``every`` seconds how much is left (in
    the log, the journal and systemd's STATUS=)."""
    while True:
        await trio.sleep(every)
        files, size = _pending(fs)
        if files:
            log.info("still uploading %d file(s), %d bytes", files, size)
            notify_systemd(f"STATUS=unmounted; uploading {files} file(s), {size} bytes")


async def _on_signals(life: _Lifecycle, fs: Filesystem) -> None:
    """SIGTERM/SIGINT: unmount, then finish pending uploads. Once unmounted, more of them are
    logged and ignored (the uploads go on; kill -9 leaves them journaled for the next mount).
    SIGHUP never stops the mount (logrotate's convention: the log file reopens by itself)."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            name = signal.Signals(signum).name
            if signum == signal.SIGHUP:
                log.info("signal SIGHUP: nothing to do (the log file reopens when rotated)")
            elif life.state == "serving":
                log.info("signal %s: unmounting, then finishing pending uploads", name)
                life.stop()
            else:
                files, size = _pending(fs)
                log.info("signal %s: already unmounted; still finishing %d upload(s), %d bytes "
                         "(kill -9 leaves them journaled for the next mount)", name, files, size)


async def _announce(cfg: Config, mountpoint: str, registry: str, readiness: Readiness, life: _Lifecycle,
                    notices: list[str]) -> None:
    """Report ready, with start-up's ``notices`` (lines for the user), only once the status
    socket listens and the mount answers: stat in a thread is served by our own loop.
    The thread is abandoned on cancellation, so a stat the kernel can no longer answer never
    holds up shutdown."""
    await life.status_up.wait()  # a start-up task that fails first keeps us from saying ready
    try:
        await trio.to_thread.run_sync(os.stat, mountpoint, abandon_on_cancel=True)
    except OSError:
        if life.state != "serving":
            return  # the mount stopped before it answered: the stop's cause is logged already
        raise
    if life.state != "serving" or mounted_device(mountpoint) is None:
        # the session ended at once (libfuse refused an option at FUSE_INIT, e.g. max_read):
        # the stat answered from the bare directory; the end of run() tells the starter
        return
    set_read_ahead(mountpoint, cfg.mount.read_ahead_kib)  # after FUSE_INIT, which resets it
    # the device: `ossfuse umount` of a bind mount of it finds this record by it
    write_registry(registry, {"pid": os.getpid(), "mountpoint": mountpoint, "config": cfg.path,
                              "cache_dir": cfg.cache.dir, "started": time.time(), "exited": False,
                              "device": mounted_device(mountpoint), "pid_start": process_start_ticks()})
    prune_exited_records()  # records of mounts that ended long ago: nobody reads them any more
    log.info("mounted %s at %s", cfg.store.url + "/" + cfg.store.prefix, mountpoint)
    notify_systemd(f"READY=1\nSTATUS=mounted at {mountpoint}")
    readiness.ready(notices)
