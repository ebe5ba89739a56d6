"""The ``ossfuse`` command: mount, umount, status, rekey, check, keygen, quickstart; and the
mount(8) helper.

Exit status: 0 success; 1 a one-line error on stderr (bad config, missing key file, mount point
busy, …; ``umount``: the last changes of the files it names could not be saved and are lost);
75 unmounted but uploads are still journaled, or deletes of unlinked objects failed (the next
mount finishes them).
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import re
import select
import signal
import shlex
import shutil
import subprocess
import sys
import time

from .registry import (ENV_RUNTIME_DIR, EXIT_PENDING, cache_dir_in_a_mount, cache_dir_user, daemon_alive, daemon_gone, dying,
                       filesystem_of, holders, killed_in_a_request, one_line, printable, mounted_device, mounted_filesystem, mounted_type,
                       mount_points_of, mounts, path_in_mount, process_alive,
                       process_started, process_stopped, read_registry, real_mountpoint, record_of, registry_path, runtime_dir,
                       running_mounts,
                       typed_below_root, users_of, write_registry, check_private_dir, UnsafeDirError)

# The daemon (trio, pyfuse3, the crypto libraries: ~1 s of imports on a loaded machine), and
# logging, dataclasses and shutil (~20 ms together), are imported only by the commands that use
# them: `ossfuse umount` and `status` pay for Python and argparse alone
# (tests/test_cli.py::test_umount_imports_no_daemon_modules).

_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _journal_formatter():
    """A logging.Formatter with sd-daemon(3) priority prefixes, so journald keeps each
    line's level."""
    import logging

    priority = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}

    class JournalFormatter(logging.Formatter):
        def format(self, record: logging.LogRecord) -> str:
            return f"<{priority.get(record.levelno, 6)}>{record.name}: {record.getMessage()}"
    return JournalFormatter()


def _die(msg: str) -> int:
    print(printable(f"ossfuse: {msg}"), file=sys.stderr)
    return 1


# fstab/mount(8) options that mean nothing to a FUSE daemon: accepted and ignored.
_IGNORED_OPTIONS = ("_netdev", "nofail", "auto", "noauto", "user", "users", "defaults")
_IGNORED_PREFIXES = ("x-systemd.", "x-gvfs-", "comment=")


def split_mount_options(cfg, options: list[str]):
    """``-o`` options → (config with uid/gid/umask/attr_timeout/entry_timeout applied, FUSE
    options: libfuse 3 refuses those five, "fuse_session_new() failed"). Of ``ro`` and
    ``rw`` the last one given counts, as for mount(8). Raises ValueError naming a malformed
    option."""
    fuse: list[str] = []
    mount: dict[str, int | float | bool] = {}
    read_only = False
    for opt in options:
        name, _, value = opt.partition("=")
        if opt in _IGNORED_OPTIONS or opt.startswith(_IGNORED_PREFIXES):
            continue
        if opt in ("ro", "rw"):
            read_only = opt == "ro"
            continue
        if name in ("uid", "gid", "umask"):
            try:
                mount[name] = n = int(value, 8 if name == "umask" else 10)
            except ValueError:
                raise ValueError(f"-o {opt}: {name} needs {'an octal' if name == 'umask' else 'a'} number") from None
            from .config import id_error
            why = (id_error(n) if name != "umask" else None if 0 <= n <= 0o777 else "must be 0 to 777 (octal)")
            if why is not None:
                raise ValueError(f"-o {opt}: {name} {why}")
        elif name in ("attr_timeout", "entry_timeout"):  # libfuse 2's options (sshfs, s3fs take them)
            from .config import SECONDS_MAX
            try:
                mount[name] = float(value)
            except ValueError:
                raise ValueError(f"-o {opt}: {name} needs a number of seconds") from None
            if not 0 <= mount[name] <= SECONDS_MAX:  # (also nan)
                raise ValueError(f"-o {opt}: {name} must be 0 to {SECONDS_MAX} seconds")
        elif name == "subtype":
            raise ValueError(f"-o {opt}: ossfuse mounts have the type fuse.ossfuse (umount and status find "
                             f"them by it)")
        elif name == "allow_other":
            mount["allow_other"] = True  # default_permissions is always on, so modes are enforced
        else:
            fuse.append(opt)
    if read_only:
        fuse.append("ro")
    if mount:
        import dataclasses
        cfg = dataclasses.replace(cfg, mount=dataclasses.replace(cfg.mount, **mount))
    return cfg, fuse


class _ReadyPipe:
    """The daemonized child's side of ``ossfuse mount`` (a ``daemon.Readiness``): on the pipe,
    whichever comes first of "ready N" followed by N lines for the user (start-up's notices),
    or one line with the reason it failed. Counted, not ended by EOF: a fusermount3 that libfuse
    started may hold the pipe's write end as long as the mount lasts."""

    def __init__(self, fd: int):
        self.fd: int | None = fd

    def _send(self, *lines: str) -> None:
        if self.fd is not None:
            try:
                os.write(self.fd, "".join(" ".join(line.split()) + "\n" for line in lines).encode())
                os.close(self.fd)
            except OSError:
                pass  # the parent gave up waiting
            self.fd = None

    def ready(self, notices: list[str]) -> None:
        self._send(f"ready {len(notices)}", *notices)

    def failed(self, reason: str) -> None:
        self._send(reason)

    def waiting(self, why: str) -> None:
        """One "waiting ..." line for the user, the pipe left open (ready or failed follows)."""
        if self.fd is not None:
            with contextlib.suppress(OSError):  # (the parent gave up waiting)
                os.write(self.fd, ("waiting " + " ".join(why.split()) + "\n").encode())


def log_file_handler(path: str):
    """The daemon's log handler for file ``path`` (a ``logging.Handler``)."""
    import logging.handlers

    class LogFile(logging.handlers.WatchedFileHandler):
        """Reopened by itself when logrotate moves it (SIGHUP is not needed, and is
        ignored). A failed reopen is a logging error, not an exception out of the log
        call: Python's emit reopens outside its own error handling, so a cache dir
        deleted under a running mount made the next log line raise and the daemon die
        (a trial)."""

        failing = False  # since the last record written
        failed = False  # this record

        def emit(self, record):
            self.failed = False
            try:  # (FileHandler.emit's own reopen of a closed stream raises too)
                super().emit(record)
            except OSError:
                self.handleError(record)
            self.failing = self.failed

        def handleError(self, record):
            """One line on stderr per run of failures, not Python's traceback per record
            (a trial: the cache dir deleted under a mount printed one for every line)."""
            self.failed = True
            if not self.failing:
                self.failing = True
                err = sys.exc_info()[1]
                print(f"ossfuse: cannot write the log {self.baseFilename}: {err}; log lines are lost until "
                      "it can be written again", file=sys.stderr, flush=True)
    return LogFile(path)


def _setup_daemon_logging(args, cfg) -> None:
    import logging
    import logging.handlers
    level = getattr(logging, args.log_level.upper())
    handler: logging.Handler
    if os.environ.get("JOURNAL_STREAM"):  # under systemd: journald reads "<N>" as the priority
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_journal_formatter())
        logging.basicConfig(level=level, handlers=[handler])
    elif args.ready_fd is not None:  # daemon child: log to a file in the cache dir
        handler = log_file_handler(os.path.join(cfg.cache.dir, "ossfuse.log"))
        handler.setFormatter(logging.Formatter(_LOG_FORMAT))
        logging.basicConfig(level=level, handlers=[handler])
    else:
        logging.basicConfig(stream=sys.stderr, level=level, format=_LOG_FORMAT)


def cmd_mount(args) -> int:
    from . import config as config_mod  # here, not at the top: `ossfuse umount` needs no crypto imports
    # the kernel mounts on a symlink's target, and the daemon must look for its mount there
    # (through a symlink it waited 90 s for a mount it could not see, then left it dead: a trial)
    args.mountpoint = os.path.realpath(args.mountpoint)
    try:
        cfg = config_mod.load(args.config)
    except config_mod.ConfigError as e:
        return _die(str(e))
    try:
        cfg, options = split_mount_options(cfg, [o for opt in args.o or [] for o in opt.split(",") if o])
    except ValueError as e:
        return _die(str(e))
    if not args.foreground:
        return _spawn_daemon(args, cfg)
    import logging
    from .daemon import CacheDirInUse, MountError, NoReadiness, run
    _setup_daemon_logging(args, cfg)
    log = logging.getLogger("ossfuse")
    readiness = _ReadyPipe(args.ready_fd) if args.ready_fd is not None else NoReadiness()
    try:
        status = run(cfg, args.mountpoint, options, readiness)
    except MountError as e:
        # with -f this is the one line on stderr (or in the journal); daemonized, the log file is
        # the cache dir's, which a CacheDirInUse belongs to another mount: `ossfuse mount` says it
        if not (isinstance(e, CacheDirInUse) and args.ready_fd is not None):
            log.error("%s", e)
        readiness.failed(str(e))
        return 1
    # Everything is in the bucket or the journal, the registry says how the daemon ended, and
    # the store and cache are closed: skip the interpreter's teardown (0.3-0.6 s of freeing
    # objects on a loaded machine, and `ossfuse umount` waits for this process to end).
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _ready_margin() -> float:
    """Seconds ``ossfuse mount`` waits past the config's startup_timeout for the daemon to say
    ready (key loading, journal adoption, the mount itself): 30, or $OSSFUSE_READY_MARGIN."""
    return float(os.environ.get("OSSFUSE_READY_MARGIN", "30"))


def _spawn_daemon(args, cfg) -> int:
    """Start the daemon in its own session and wait until it reports the mount usable, it
    fails, or ``startup_timeout`` + a margin passes (then it is killed, any mount it left is
    removed, and the reason printed)."""
    from .config import dir_inside_mountpoint
    inside = dir_inside_mountpoint(cfg, args.mountpoint) or cache_dir_in_a_mount(cfg.cache.dir)
    if inside:  # before the cache dir is made there
        return _die(inside)
    user = cache_dir_user(cfg.cache.dir)
    if user is not None:  # before the daemon writes anything into that mount's log
        return _die(f"cache dir {cfg.cache.dir} is in use by {user}")
    try:  # before a cache dir and a log are made for nothing (a trial)
        os.lstat(args.mountpoint)
    except FileNotFoundError as e:  # (a dead FUSE mount there answers ENOTCONN: the daemon cleans it)
        return _die(f"mount point {args.mountpoint}: {e.strerror}")
    except OSError:
        pass
    made = not os.path.lexists(cfg.cache.dir)
    try:
        os.makedirs(cfg.cache.dir, mode=0o700, exist_ok=True)
        # the daemon checks it too; here before its log is written there (a new user's trial:
        # a refused mount's log went through a symlink planted in a world-writable parent)
        check_private_dir(cfg.cache.dir, "cache dir")
    except OSError as e:
        return _die(f"cache dir {cfg.cache.dir}: {e.strerror}")
    except UnsafeDirError as e:
        if made:  # (left empty where it is unsafe: a refused mount leaves nothing)
            with contextlib.suppress(OSError):
                os.rmdir(cfg.cache.dir)
        return _die(str(e))
    r, w = os.pipe()
    # -P: the daemon (root, often) must import this installation's ossfuse, never an ossfuse/
    # in the caller's working directory, which `python -m` would put first on sys.path; and it
    # runs in / (it holds no directory of the caller's busy), so the mount point is absolute
    cmd = [sys.executable, "-P", "-m", "ossfuse", "mount", "-f", "--ready-fd", str(w), "-c", cfg.path,
           "--log-level", args.log_level, os.path.abspath(args.mountpoint)]
    for o in args.o or []:
        cmd += ["-o", o]
    log_path = os.path.join(cfg.cache.dir, "ossfuse.log")
    try:  # (never through a symlink: the daemon is often root)
        logf = os.fdopen(os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC,
                                 0o600), "ab")
    except OSError as e:  # a read-only or full cache disk: one line, not a traceback
        os.close(r)
        os.close(w)
        return _die(f"cache dir {cfg.cache.dir} (cache.dir in {cfg.path}) must be writable: its log file "
                    f"{log_path}: {e.strerror}")
    with logf:
        proc = subprocess.Popen(cmd, pass_fds=(w,), stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                start_new_session=True, cwd="/")
    os.close(w)
    margin = _ready_margin()
    limit = cfg.mount.startup_timeout + margin
    try:
        with os.fdopen(r, "rb", buffering=0) as pipe:  # (unbuffered: select sees every line)
            give_up = time.monotonic() + limit
            while True:
                readable, _, _ = select.select([pipe], [], [], max(0.0, give_up - time.monotonic()))
                message = pipe.readline().decode(errors="replace").strip() if readable else None
                if message is None or not message.startswith("waiting "):
                    break
                print(f"ossfuse: {message[len('waiting '):]}", file=sys.stderr)  # (the daemon retries)
            if message is not None and re.fullmatch(r"ready \d+", message):
                for _ in range(int(message.split()[1])):  # written at once, with the "ready" line
                    print(f"ossfuse: warning: {pipe.readline().decode(errors='replace').strip()}", file=sys.stderr)
                message = "ready"
    except KeyboardInterrupt:
        # Ctrl-C while the mount is being made: cancel it. The daemon runs in its own session
        # (Ctrl-C does not reach it) and would otherwise mount later, on its own (a trial).
        _stop_daemon(proc, os.path.abspath(args.mountpoint))
        print(f"ossfuse mount: interrupted; {args.mountpoint} is not mounted (its daemon is stopped)", file=sys.stderr)
        return 130
    if message == "ready":
        return 0
    if message is None:
        _stop_daemon(proc, os.path.abspath(args.mountpoint))
        return _die(f"the mount did not become ready within {limit:.0f}s (startup_timeout "
                    f"{cfg.mount.startup_timeout:.0f}s + {margin:.0f}s); stopped the daemon. "
                    f"See {log_path}")
    try:
        proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        _stop_daemon(proc, os.path.abspath(args.mountpoint))
    return _die(message or f"the daemon exited with status {proc.returncode}; see {log_path}")


def _stop_daemon(proc: subprocess.Popen, mountpoint: str) -> None:
    """End a daemon that never became ready: SIGTERM, SIGKILL after 10 s, and remove a mount
    it may have left (lazily: nobody answers it any more)."""
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if mounted_device(mountpoint) is not None:
        subprocess.run(["fusermount3", "-uz", mountpoint], capture_output=True)


def _mount_point_arg(path: str) -> str:
    """The absolute mount point a command was given: a symlink to it is followed, as umount(8)
    does, but only when ``path`` itself is no mount point (stat of a mount point asks its
    daemon, which may hang)."""
    mp = os.path.abspath(path)
    if mounted_type(mp) is None and os.path.islink(mp):
        return real_mountpoint(mp)  # (realpath would stat the mount point it names)
    return mp


def cmd_umount(args) -> int:
    """Unmount, then wait for the daemon to finish pending uploads (progress every few
    seconds). When another mount namespace still holds a copy of the mount, the daemon would
    serve that copy instead of finishing: say who holds it and stop the daemon, so the uploads
    finish and the copy ends (its users get ENOTCONN). Ctrl-C says in one line where things
    stand (exit 130)."""
    mp = _mount_point_arg(args.mountpoint)
    # [unmounted here, the daemon's pid]: set once the mount is gone here (what an interrupt
    # leaves behind) and once the daemon is known
    unmounted: list = [False, None]
    try:
        return _umount_and_wait(args, mp, unmounted)
    except KeyboardInterrupt:
        pid = unmounted[1]
        if unmounted[0] and pid is not None and process_stopped(pid):
            print(f"ossfuse: interrupted; {mp} is unmounted, and its daemon (pid {pid}) is stopped (SIGSTOP, Ctrl-Z "
                  f"or a debugger): `kill -CONT {pid}` lets it finish what is pending", file=sys.stderr)
        elif unmounted[0]:
            print(f"ossfuse: interrupted; {mp} is unmounted, and its daemon goes on finishing pending uploads "
                  f"in the background (see the log in its cache dir)", file=sys.stderr)
        else:
            print(f"ossfuse: interrupted; {mp} is still mounted", file=sys.stderr)
        return 130


def _why_no_mount_point(mp: str) -> str:
    """": no such directory" (or ": not a directory") when ``mp`` cannot be a mount point: a
    typo is told apart from a folder that is simply not mounted now; and the ossfuse mount
    ``mp`` is inside, if any (`cd mnt/sub && ossfuse umount .`)."""
    # first, without a stat: the daemon below a path inside its mount answers that stat, or hangs
    above = [p for _dev, p, fs in mounts() if fs == "fuse.ossfuse" and mp.startswith(p.rstrip("/") + "/")]
    if above:
        return f"; it is inside the ossfuse mount {max(above, key=len)}"
    if not os.path.lexists(mp):
        return ": no such directory"
    return "" if os.path.isdir(mp) else ": not a directory"


def _path_arg(text: str) -> str:
    """argparse type of a path argument: an empty one is refused (``ossfuse umount ""`` would
    otherwise act on the current directory)."""
    if not text:
        raise argparse.ArgumentTypeError("an empty path")
    return text


def _drain_progress(doc: dict) -> str | None:
    """The line `ossfuse umount` prints every 5 s while the daemon of status ``doc`` drains:
    what is left, and why it waits when the store is unreachable; None when nothing is left."""
    p = doc["pending_uploads"]
    if not p["count"]:
        return None
    health = doc.get("store_health") or {}
    why = "" if health.get("online", True) else (
        f"; the store is unreachable since {time.strftime('%H:%M:%S', time.localtime(health['offline_since']))}"
        f" ({health.get('reason')}): they go up once it answers")
    return f"ossfuse: waiting for {p['count']} pending upload(s), {p['bytes']} bytes{why}"


def _umount_and_wait(args, mp: str, unmounted: list) -> int:
    """The body of :func:`cmd_umount`; sets ``unmounted[0]`` once ``mp`` is unmounted here and
    ``unmounted[1]`` to the pid of the daemon it waits for."""
    started = process_started() or time.time()
    # our own working directory must not keep the mount busy (`ossfuse umount .` from inside
    # it), nor be named among its users: fusermount3 inherits it
    os.chdir("/")
    device = mounted_device(mp)
    filesystem = mounted_filesystem(mp)  # (after the unmount its device number may be another's)
    reg = record_of(mp, device)
    home = reg["mountpoint"] if reg else mp  # the mount point the daemon was started with
    unmounted_here = False
    if device is None:
        # fusermount3 -u, run as root, unmounts whatever is there: never another filesystem
        fstype = mounted_type(mp)
        if fstype is not None:
            return _die(f"{mp} is not an ossfuse mount (it is {fstype}): not unmounting it")
        if not os.path.ismount(mp):
            reg = read_registry(mp)  # afresh: its daemon may have ended since the first look
            if reg is not None and reg.get("exited") and reg.get("exited_at", 0) >= started:
                # another unmount came first (a second `ossfuse umount` at once) and the
                # daemon finished after this one started: its outcome is this one's
                return _exit_outcome(mp, reg)
            # (daemon_alive: a pid another process reuses is never signalled)
            if reg is None or reg.get("exited") or not daemon_alive(reg):
                return _die(f"{mp} is not mounted" + _why_no_mount_point(mp))
            # unmounted here, but bind-mounted: not ours to stop
            if stays := mount_points_of(filesystem_of(reg)):
                return _die(f"{mp} is not mounted; the same filesystem stays mounted at {_some_paths(stays)} (a "
                            f"bind mount): unmount that")
            # unmounted here behind our back (umount(8), fusermount3 -u) while another mount
            # namespace holds a copy, or lazily (umount -l) while files are still open: the
            # daemon would serve them forever
            # another unmount that came first (a second `ossfuse umount`) leaves it draining
            # within moments: a copy elsewhere keeps it serving
            for _ in range(10):
                doc = _status_or_none(registry_path(mp, ".sock"))
                if doc is None or doc.get("state") == "draining":
                    break
                time.sleep(0.1)
            if doc is not None and doc.get("state") != "draining":  # None: it is exiting
                print(f"ossfuse: {mp} is not mounted here, but its daemon (pid {reg['pid']}) still serves it (a "
                      f"copy in another mount namespace, or files still open after a lazy unmount); stopping the "
                      f"daemon so pending uploads finish", file=sys.stderr)
                os.kill(reg["pid"], signal.SIGTERM)
            unmounted_here = True  # either way: wait for the daemon to finish, below
    dead = daemon_gone(mp, reg)
    if device is not None and dead is None and reg is not None and not reg.get("exited") and not daemon_alive(reg):
        # mounted here and answering, yet its record names a dead daemon: a stale record (a crashed
        # earlier mount here; the live daemon's record is in another runtime dir)
        reg = None
    if dead is not None:
        # nobody serves it: nothing can be pending in a daemon, and nothing can be open in it
        # that a lazy unmount would strand (every access already fails with ENOTCONN)
        r = subprocess.run(["fusermount3", "-u", mp], capture_output=True, text=True)
        if r.returncode != 0:
            r = subprocess.run(["fusermount3", "-uz", mp], capture_output=True, text=True)
        if r.returncode != 0:
            return _die(f"{mp}: its daemon is gone, and unmounting failed: {r.stderr.strip()}")
        if reg is not None and reg.get("pid") == dead:  # its record ends too: a later mount may get the
            write_registry(registry_path(reg["mountpoint"]),  # same device number, and must not find it
                           dict(reg, exited=True, exited_at=time.time(), status=1, failure="the daemon died"))
        return _die(f"{mp}: the daemon{f' (pid {dead})' if dead else ''} had died; unmounted its dead mount; "
                    f"files not yet uploaded stay journaled in its cache dir and upload on the next mount")
    if not unmounted_here:
        if (failure := _unmount(mp, device)) is not None:
            if (reg is not None and not reg.get("exited") and process_stopped(reg["pid"])
                    and "though no process" in failure):  # (a named holder is what to close instead)
                # what keeps it busy is most likely a process waiting for the stopped daemon
                failure += (f"; its daemon (pid {reg['pid']}) is stopped (SIGSTOP, Ctrl-Z or a debugger), so what "
                            f"waits on the mount cannot finish: `kill -CONT {reg['pid']}`, then unmount again")
            return _die(failure)
        # a copy the unmount did not take with it (a bind mount; a peer of a shared mount goes
        # too) keeps the daemon serving: only this path is unmounted, as umount(8) does
        if stays := mount_points_of(filesystem):
            print(f"ossfuse: unmounted {mp}; the same filesystem stays mounted at {_some_paths(stays)} (a bind "
                  f"mount): its daemon serves it there, and pending uploads are finished once that is unmounted "
                  f"(ossfuse umount)", file=sys.stderr)
            return 0
    unmounted[0] = True
    if reg is None:  # a daemon that runs, with no record here: nothing to wait on
        return _die(f"unmounted {mp}, but its daemon has no record in {runtime_dir()} (mounted with another "
                    f"OSSFUSE_RUNTIME_DIR, or by another user?), so its pending uploads were not waited for: "
                    f"it finishes them in the background (see the log in its cache dir)")
    if reg.get("exited"):
        return 0
    pid = unmounted[1] = reg["pid"]
    sock = registry_path(home, ".sock")
    deadline = time.monotonic() + args.timeout
    unmounted_at = time.monotonic()
    said_at = 0.0
    stopped = unmounted_here
    pidfd = _pidfd_or_none(pid)
    # With nothing to upload the daemon exits within tens of ms: wait for that before asking it
    # anything (a status query of a daemon that is closing waits for its exit anyway).
    _wait_for_exit(pidfd, 0.3)
    while process_alive(pid):  # the daemon finishes pending uploads after the unmount, then exits
        now = time.monotonic()
        if now > deadline:
            if process_stopped(pid):  # not uploading: it does nothing until continued
                return _die(f"unmounted, but the daemon (pid {pid}) is stopped (SIGSTOP, Ctrl-Z or a debugger) "
                            f"before it finished: `kill -CONT {pid}` lets it upload what is pending, if anything, "
                            f"and exit (see its log)")
            return _die(f"unmounted, but the daemon (pid {pid}) is still uploading after "
                        f"{args.timeout:.0f}s; it goes on in the background: `ossfuse status {mp}` shows its "
                        f"progress and `ossfuse umount {mp}` waits for it again")
        doc = _status_or_none(sock)
        if (doc is not None and doc.get("state") == "serving" and not stopped and device
                and now - unmounted_at > 1 and filesystem and (held := holders(filesystem))):
            who = ", ".join(f"pid {p} ({c})" for p, c in held[:5])
            print(f"ossfuse: {mp} is unmounted here, but still mounted in another mount namespace "
                  f"(held by {who}); stopping the daemon so pending uploads finish", file=sys.stderr)
            os.kill(pid, signal.SIGTERM)
            stopped = True
        elif doc is not None and doc.get("state") == "draining" and now - said_at >= 5:
            line = _drain_progress(doc)
            if line:
                print(line, file=sys.stderr)
            said_at = now
        elif doc is None and now - said_at >= 5 and process_stopped(pid):
            print(f"ossfuse: the daemon (pid {pid}) is stopped (SIGSTOP, Ctrl-Z or a debugger) and cannot finish "
                  f"(its pending uploads, if any) until `kill -CONT {pid}`", file=sys.stderr)
            said_at = now
        _wait_for_exit(pidfd, 0.1)
    if pidfd is not None:
        os.close(pidfd)
    reg = read_registry(home) or {}
    if not reg.get("exited"):
        return _die(f"the daemon (pid {pid}) ended without finishing (crashed or killed); files not yet "
                    f"uploaded stay journaled in its cache dir and upload on the next mount")
    return _exit_outcome(mp, reg)


def _exit_outcome(mp: str, reg: dict) -> int:
    """What ``ossfuse umount`` says and returns for the exit record ``reg`` of the daemon of
    ``mp``: 0, 1 (changes lost, the daemon failed) or EXIT_PENDING (uploads or deletes left
    for the next mount), with one line on stderr unless 0."""
    undeleted = reg.get("undeleted") or 0
    log = reg.get("log") or "the log in the cache dir"  # (a record of an older daemon: no "log")
    left = []  # what the next mount finishes
    journaled = reg.get("journaled", 0 if undeleted else 1)  # (a registry without the field: uploads)
    if journaled and (reg.get("status") == EXIT_PENDING or reg.get("unsaved")):
        paths = [mp.rstrip("/") + "/" + p for p in reg.get("journaled_paths") or []]
        named = (": " + ", ".join(paths[:3]) + (f" and {journaled - 3} more" if journaled > 3 else "")
                 if paths else "")
        why = f" (e.g. {mp.rstrip('/')}/{reg['upload_error']})" if reg.get("upload_error") else ""
        left.append(f"the upload of {journaled} file(s) failed{why}; they stay journaled and upload on the "
                    f"next mount{named}")
    if undeleted:
        keys = reg.get("undeleted_keys") or []
        shown = ", ".join(repr(k) for k in keys[:3]) + (f" and {undeleted - 3} more" if undeleted > 3 else "")
        left.append(f"{undeleted} unlinked object(s) could not be deleted from the bucket ({shown}); other "
                    f"clients may still see them until the next mount deletes them")
    if reg.get("unsaved"):
        lost = reg["unsaved"]
        shown = ", ".join(mp.rstrip("/") + "/" + p for p in lost[:10]) + (f" and {len(lost) - 10} more" if len(lost) > 10 else "")
        # what the next mount still uploads is said too (a trial: an earlier saved version of the
        # lost file stayed journaled, and the operator took it for being in the bucket)
        # (not "full?": a trial's cache dir lost its staging directory, and ENOENT was the why)
        print(one_line(f"ossfuse: unmounted; the last changes of {len(lost)} file(s) could not be saved in the "
                        f"cache dir and are lost: {shown}{''.join('; ' + part for part in left)} (the log says "
                        f"why: {log})"), file=sys.stderr)
        return 1
    if reg.get("status") == EXIT_PENDING:
        print(one_line(f"ossfuse: unmounted; {'; '.join(left)} (see the log: {log})"), file=sys.stderr)
        return EXIT_PENDING
    if reg.get("status"):
        journaled = reg.get("journaled") or 0
        also = (f"; {journaled} file(s) could not be uploaded: they stay journaled in its cache dir and upload on the "
                f"next mount" if journaled else "")
        return _die(f"unmounted, but the daemon failed: {reg.get('failure') or 'see its log'}{also}")
    return 0


def _some_paths(paths: list[str]) -> str:
    return ", ".join(paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")


# A lookup or stat below the mount point by any process (a file manager, a shell prompt, the
# other of two `ossfuse umount` at once) holds the mount for one FUSE round trip; the kernel's
# umount fails with EBUSY meanwhile. Nobody visibly using the mount: try again for this long.
_TRANSIENT_BUSY_S = 3.0


def _unmount(mp: str, device: str | None) -> str | None:
    """``fusermount3 -u`` of ``mp`` (a mount of ``device``); None once it is unmounted here, by
    this call or by another unmount that came first (a second ``ossfuse umount``: the caller
    then waits for the uploads as that one does), else the reason it is not, in one line:
    naming up to five processes that hold a file, directory, program or mapping there, or the
    mounts below it. EBUSY with neither is retried for ``_TRANSIENT_BUSY_S`` seconds; while
    processes that were killed are still in a request (and hold nothing else there), it is
    retried until they end, for up to ``_KILLED_HOLDER_S`` seconds (one line on stderr names
    each)."""
    give_up = time.monotonic() + _TRANSIENT_BUSY_S
    killed_give_up = time.monotonic() + _KILLED_HOLDER_S
    said: set[int] = set()
    while True:
        r = subprocess.run(["fusermount3", "-u", mp], capture_output=True, text=True)
        if r.returncode == 0 or mounted_device(mp) != device:
            return None
        msg = (r.stderr.strip() or f"fusermount3 -u {mp} failed").replace("fusermount3: ", "")
        if "busy" not in msg:
            return msg
        below = [m for _dev, m, _fs in mounts() if m.startswith(mp.rstrip("/") + "/")]
        if below:
            return msg + f" (mounted below it: {_some_paths(below)}; unmount that first)"
        held = [(p, c, what) for p, c, what in users_of(mp) if p != os.getpid()]
        users = [(p, c) for p, c, _what in held]
        # Processes killed in a request (a direct-I/O read, an open or a lookup the kernel
        # cannot abandon) hold the mount, with or without a file open there (a killed
        # thread's process shows none), until the request returns: at most the store's
        # offline timeout, 5 s by default, for one that waits for the store.
        # Which mount such a request is in shows only for a process that holds a file there;
        # with no holder at all, any killed one may be it (said so).
        # A killed process that left its request is exiting: its SIGKILL is no longer pending
        # but it holds its files a moment longer (CI: "busy" right after "waiting for pid").
        if users:
            ending = users if all(dying(p) for p, _c in users) else []
        else:
            ending = killed_in_a_request()
        if ending and time.monotonic() < killed_give_up:
            for p, c in ending:
                if p not in said:
                    said.add(p)
                    print(f"ossfuse: waiting for pid {p} ({c}), killed, to end: it waits for a request"
                          f"{' in the mount' if users else ' (perhaps in this mount)'}", file=sys.stderr)
            time.sleep(0.1)
            give_up = time.monotonic() + _TRANSIENT_BUSY_S  # its last requests end after it
            continue
        if users:
            ppid = os.getppid()  # a shell left in the mount is the usual holder: say it is this one
            # an ossfuse daemon whose bucket or cache dir is inside this mount is named by its mount
            # (a new-user trial saw only "pid N (python3)")
            daemons = {r["pid"]: r["mountpoint"] for r in running_mounts()}
            who = "; ".join(f"pid {p} ({c}" + (_ran_from(p, c, mp) if p == ppid else "")
                            + (f", the ossfuse daemon of {daemons[p]}" if p in daemons else "") + f") holds its {what}"
                            for p, c, what in held[:5])
            return msg + f" (in use: {who}{f'; and {len(held) - 5} more' if len(held) > 5 else ''})"
        if time.monotonic() >= give_up:
            # a copy of it at another path (a peer of a shared subtree) held there keeps it busy too
            elsewhere = [f"pid {p} ({c}) at {path}" for path in mount_points_of(mounted_filesystem(mp)) if path != mp
                         for p, c, _what in users_of(path) if p != os.getpid()]
            if elsewhere:
                return msg + f" (in use at another path of the same mount: {', '.join(elsewhere[:5])})"
            seen = "" if os.geteuid() == 0 else " this user can see"
            return (msg + f" for {_TRANSIENT_BUSY_S:.0f} s, though no process{seen} has a file, directory, program "
                    f"or mapping there: something keeps looking up names in it (a file manager, find), a process "
                    f"waits in an open or lookup there that the store is slow to answer (it holds no file until "
                    f"then), or a process of another PID namespace uses it")
        time.sleep(0.05)


# How long a busy unmount waits for processes that were killed in a request to end.
_KILLED_HOLDER_S = 30.0


_SHELLS = frozenset({"sh", "bash", "dash", "zsh", "ksh", "mksh", "fish", "tcsh", "csh", "busybox"})


def _ran_from(pid: int, comm: str, mp: str) -> str:
    """What a busy unmount says of the process ``pid`` it ran from: the usual holder, a shell
    left in the mount ``mp`` (`cd` out of it) or holding a file there (`exec 7<file`: close
    it), else a script or program whose directory is in it."""
    if comm not in _SHELLS:
        return ", the program this ran from"
    try:
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        cwd = mp
    if cwd == mp or cwd.startswith(mp.rstrip("/") + "/"):
        return ", the shell this ran from: cd out of the mount first"
    return ", the shell this ran from: it holds a file there; close it (exec N<&-)"


def _pidfd_or_none(pid: int) -> int | None:
    """A pidfd of ``pid`` (readable once it exits: Linux ≥ 5.3), None where there is none."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):  # an old kernel, or the process is gone already
        return None


def _wait_for_exit(pidfd: int | None, timeout: float) -> None:
    """Return when the process of ``pidfd`` exits or after ``timeout`` seconds (a plain sleep
    without a pidfd). The caller checks which."""
    if pidfd is None:
        time.sleep(timeout)
    else:
        select.select([pidfd], [], [], timeout)


def _status_or_none(sock: str) -> dict | None:
    from . import status
    try:
        return status.query(sock, timeout=2.0)
    except (OSError, ValueError):
        return None


def cmd_status(args) -> int:
    from . import status
    mp = _mount_point_arg(args.mountpoint)
    device = mounted_device(mp)
    reg = record_of(mp, device)
    if device is None and reg is not None and not reg.get("exited") and (stays := mount_points_of(filesystem_of(reg))):
        # unmounted here, its daemon serving a bind mount of it elsewhere: not this path's (a
        # new-user trial: "serving", while what was written there went to the local disk)
        return _status_down(args, mp, f"{mp} is not mounted; the same filesystem stays mounted at "
                                      f"{_some_paths(stays)} (a bind mount): ask `ossfuse status` there")
    # a stopped daemon is told apart at once (/proc), not after the socket's 10 s timeout
    stopped = reg is not None and not reg.get("exited") and daemon_alive(reg) and process_stopped(reg["pid"])
    doc = None
    if not stopped:
        try:
            doc = status.query(registry_path(reg["mountpoint"] if reg else mp, ".sock"))
        except OSError:
            pass
    if doc is None:
        return _status_down(args, mp, _status_down_reason(mp, reg, stopped))
    doc["mountpoint"] = mp
    doc["up"] = True
    if args.prometheus:
        sys.stdout.write(status.prometheus(doc))
    else:
        print(json.dumps(doc, indent=2) if args.json else printable(status.render(doc)))
    return 0


def _status_down(args, mp: str, reason: str) -> int:
    """``ossfuse status`` of ``mp``, which no daemon answers for (``reason``: one line): the
    reason on stderr, and exit 1; with --json also a document saying so on stdout; with
    --prometheus ``ossfuse_up 0`` (exit 0: the textfile must say so, not keep the last
    answer's 1)."""
    from . import status
    if args.prometheus:
        sys.stdout.write(status.prometheus_down(mp))
        _die(f"no ossfuse daemon answers for {mp}: reported ossfuse_up 0")
        return 0
    if args.json:  # a script reads stdout: it gets a document saying so, not nothing
        print(json.dumps({"mountpoint": mp, "up": False, "error": reason}, indent=2))
    return _die(reason)


def _status_down_reason(mp: str, reg: dict | None, stopped: bool) -> str:
    """Why no daemon answered ``ossfuse status`` for ``mp`` (one line, with what to do)."""
    if stopped:
        assert reg is not None
        return (f"the ossfuse daemon of {mp} (pid {reg['pid']}) is stopped (SIGSTOP, Ctrl-Z or a "
                f"debugger): `kill -CONT {reg['pid']}` lets it answer again")
    if daemon_gone(mp, reg) is not None:
        return (f"{mp}: the daemon is gone (transport endpoint not connected); run `ossfuse umount {mp}` "
                f"(or fusermount3 -u {mp})")
    fstype = mounted_type(mp)  # from mountinfo: a stat would wait on a stuck daemon
    if fstype is None:
        return f"{mp} is not a mount point" + _why_no_mount_point(mp)
    if fstype != "fuse.ossfuse":
        return f"{mp} is not an ossfuse mount (it is {fstype})"
    if reg is not None and not reg.get("exited") and daemon_alive(reg):
        return (f"the ossfuse daemon of {mp} (pid {reg['pid']}) runs but does not answer (stuck, or stopped "
                f"meanwhile); its log: {os.path.join(reg.get('cache_dir', '<cache dir>'), 'ossfuse.log')}")
    return (f"no ossfuse daemon answers for {mp} (its status socket is not in {runtime_dir()}: mounted by another "
            f"user, or with another OSSFUSE_RUNTIME_DIR?)")


def mount_helper(argv: list[str] | None = None) -> int:
    """``mount.fuse.ossfuse CONFIG MOUNTPOINT [-o opts] [-n] [-s] [-v]``, as mount(8) and
    fstab call it for type ``fuse.ossfuse``: the config file stands where a device would.

    Run by a systemd ``.mount`` unit (fstab at boot, ``systemctl start srv-team.mount``), the
    daemon is started as a transient service (:func:`systemd_run_command`) instead of a child of
    mount(8): a mount unit's stop returns once the kernel mount is gone and leaves stray
    processes to die with the system, so the uploads still pending at unmount would run
    outside any unit, unwaited-for at shutdown and logging nowhere systemd sees. The service
    is stopped after them (After=network-online.target), waits for them (TimeoutStopSec) and
    logs to the journal."""
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="mount.fuse.ossfuse", description="mount(8) helper for type "
                                "fuse.ossfuse: mount the bucket prefix of CONFIG at MOUNTPOINT.")
    p.add_argument("config", help="ossfuse TOML config file (stands where mount(8) has a device)")
    p.add_argument("mountpoint", type=_path_arg, help="an empty directory")
    p.add_argument("-o", action="append", help="mount options, comma-separated (see ossfuse mount)")
    for flag, what in (("-n", "no mtab"), ("-s", "sloppy"), ("-v", "verbose"), ("-f", "fake")):
        p.add_argument(flag, action="store_true", help=f"mount(8)'s {what} flag; ignored")
    p.add_argument("-t", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    options = [x for o in args.o or [] for x in ("-o", o)]
    unit = systemd_mount_unit()
    if unit is not None and shutil.which("systemd-run"):
        cmd = systemd_run_command(os.path.abspath(args.config), os.path.realpath(args.mountpoint), options)
        return subprocess.run(cmd).returncode
    return main(["mount", "-c", args.config, args.mountpoint] + options)


def systemd_mount_unit(cgroup_file: str = "/proc/self/cgroup") -> str | None:
    """The systemd ``.mount`` unit this process runs in (mount(8) started by systemd), or None."""
    if not os.environ.get("INVOCATION_ID") or not os.path.isdir("/run/systemd/system"):
        return None
    try:
        with open(cgroup_file) as f:
            last = f.read().strip().splitlines()[-1].rsplit("/", 1)[-1]
    except (OSError, IndexError):
        return None
    return last if last.endswith(".mount") else None


# Environment a .mount unit may pass to the daemon (values go over D-Bus, not on a command line).
_PASSED_ENV = ("OSS_ACCESS_KEY_ID", "OSS_ACCESS_KEY_SECRET", "OSS_SESSION_TOKEN", "CREDENTIALS_DIRECTORY",
               "OSSFUSE_RUNTIME_DIR")


def systemd_run_command(config: str, mountpoint: str, options: list[str]) -> list[str]:
    """``systemd-run`` starting the daemon for ``mountpoint`` as the transient service
    ``ossfuse-mount-<escaped path>.service`` (Type=notify: it returns once the mount answers,
    or fails with the daemon's reason in the journal)."""
    escaped = subprocess.run(["systemd-escape", "--path", mountpoint], capture_output=True, text=True,
                             check=True).stdout.strip()
    cmd = ["systemd-run", f"--unit=ossfuse-mount-{escaped}", f"--description=ossfuse mount at {mountpoint}",
           "--service-type=notify", "--collect", "--quiet",
           "--property=After=network-online.target", "--property=Wants=network-online.target",
           "--property=KillMode=mixed", "--property=TimeoutStartSec=5min", "--property=TimeoutStopSec=15min",
           "--property=SuccessExitStatus=75", "--property=RuntimeDirectory=ossfuse",
           "--property=RuntimeDirectoryPreserve=yes", "--property=RuntimeDirectoryMode=0700"]
    cmd += [f"--setenv={name}" for name in _PASSED_ENV if name in os.environ]
    return cmd + ["--", sys.executable, "-P", "-m", "ossfuse", "mount", "-f", "-c", config, mountpoint, *options]


def _tool_setup(args, create_bucket: bool = True):
    """Config, keyring and store for the commands that work on the store directly (store None:
    a local bucket not made yet, with ``create_bucket`` False: daemon.open_store)."""
    import logging
    from .daemon import credentials_for, open_store
    from .keyring import Keyring
    from . import config as config_mod
    cfg = config_mod.load(args.config)
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="ossfuse: %(message)s")
    credentials = credentials_for(cfg)
    return cfg, Keyring(cfg.encryption, credentials), open_store(cfg, credentials, create_bucket=create_bucket)


def cmd_rekey(args) -> int:
    from . import config as config_mod
    import trio
    from . import rekey
    from .daemon import MountError
    try:
        cfg, keyring, store = _tool_setup(args)
    except (config_mod.ConfigError, MountError, OSError, ValueError, TypeError) as e:
        return _die(str(e))
    for name in (args.from_id, args.to_id):
        if name is not None and name not in keyring.cmks:
            return _die(f"{cfg.path}: no CMK with id {name!r}")
    if reason := rekey.refusal(keyring, args.to_id):  # objects this config could not read: stop first
        return _die(f"{cfg.path}: {reason}")
    try:
        path = path_in_mount(args.path, args.config, "rekey")
    except ValueError as e:
        return _die(str(e))
    rel = rekey.path_below_root(path)
    if rel is None:
        return _die(f"rekey {args.path}: PATH is above the mount's root ({_PATH_FORMS})")
    for line in rekey.mount_warnings(cfg, keyring, args.to_id, dry_run=args.dry_run):
        print(f"ossfuse: warning: {line}", file=sys.stderr)

    async def run():
        if rel:  # a typo in PATH must not look like a rekey with nothing to do
            async for _ in rekey.objects_at(cfg, store, rel):
                break
            else:
                return None
        objects = total = None
        if not args.dry_run:  # size the progress with a first, cheap listing pass
            objects, total = await rekey.count_objects(cfg, store, rel)
        progress = rekey.PassProgress(objects, total, dry_run=args.dry_run)
        try:
            return await rekey.rekey(cfg, store, keyring, path=path, from_id=args.from_id, to_id=args.to_id,
                                     dry_run=args.dry_run, progress=progress.update)
        finally:
            progress.close()

    from .store.base import StoreError
    try:
        summary = trio.run(run)
    except StoreError as e:  # the store fails as a whole (listing): one line
        return _die(f"rekey: {e}")
    if summary is None:
        return _die(f"rekey {args.path}: {_nothing_there(args.path)}")
    print(summary.render(args.dry_run))
    return 1 if summary.failed or summary.damaged else 0


# what `check --verify PATH` and `rekey PATH` accept, said when a PATH names nothing
_PATH_FORMS = ("PATH is a path in the mount, as in /mnt/ossfuse/photos or photos typed in /mnt/ossfuse, or one "
               "below the mount's root, as in photos")


def _nothing_there(typed: str) -> str:
    """The end of the line for a PATH under which the bucket holds no object: the forms a PATH
    takes only when it was read as a path below the mount's root (a typo there is likely);
    one the kernel resolved in the mount is missing there, or not in the bucket (yet)."""
    if typed_below_root(typed):
        return f"no object there ({_PATH_FORMS})"
    return "no such file or directory" if not os.path.lexists(typed) else "the bucket holds no object there"


def cmd_check(args) -> int:
    from .rekey import path_below_root
    verify = args.verify
    if verify is not None:
        try:
            verify = path_in_mount(verify, args.config, "check --verify")
        except ValueError as e:
            return _die(str(e))
        if path_below_root(verify) is None:
            return _die(f"check --verify {args.verify}: PATH is above the mount's root ({_PATH_FORMS})")
    import logging
    from . import config as config_mod
    import trio
    from . import rekey
    from .daemon import MountError
    try:
        cfg, keyring, store = _tool_setup(args, create_bucket=False)  # (a check makes nothing)
    except (config_mod.ConfigError, MountError, OSError, ValueError, TypeError) as e:
        return _die(str(e))
    if store is None and verify is not None:
        return _die(f"check --verify: {cfg.store.url}: no bucket there yet (the first mount makes it)")
    # Every failure is one of the lines printed below: the store's and CMKs' own log records
    # of it would only say it again (issue 16), so none are emitted while the checks run.
    logging.disable(logging.CRITICAL)
    try:
        results = rekey.check(cfg, keyring, store)
        # objects this config cannot read do not keep the others from being verified (each
        # one it cannot read is a FAIL line of its own there); a CMK or store failure does
        blocking = [line for ok, line in results if not ok and rekey.UNREADABLE_SAMPLE not in line]
        summary = trio.run(_verify_with_progress, cfg, store, keyring, verify) \
            if verify is not None and not blocking else None
    finally:
        logging.disable(logging.NOTSET)
    for ok, line in results:
        print(("ok    " if ok else "FAIL  ") + line)
    if args.verify is not None and blocking:
        print("--verify was not run: fix the failures above first")
    if summary is not None:
        found = (summary.verified or summary.untagged or summary.plaintext or summary.dir_markers or summary.failed
                 or summary.unchecked)
        if path_below_root(verify) and not found:  # a typo: no summary of nothing verified first
            return _die(f"check --verify {args.verify}: {_nothing_there(args.verify)}")
        print(summary.render())
        if summary.failed or summary.unchecked:
            return 1
    return 0 if all(ok for ok, _ in results) else 1


async def _verify_with_progress(cfg, store, keyring, path: str):
    """``rekey.verify`` of ``path`` with a progress bar on a terminal, else a line every 5 s on
    stderr (a trial: a 96 s run against a stalled store said nothing until it ended); the
    totals from a first listing pass, as rekey's."""
    from . import rekey
    objects, total = await rekey.count_objects(cfg, store, rekey.path_below_root(path) or "")
    if not objects:  # (nothing there: the caller says so, with no progress line before it)
        return await rekey.verify(cfg, store, keyring, path=path)
    progress = rekey.PassProgress(objects, total, label="check --verify")
    try:
        return await rekey.verify(cfg, store, keyring, path=path, progress=progress.update)
    finally:
        progress.close()


def cmd_keygen(args) -> int:
    if not 2048 <= args.bits <= 16384:  # (65536 bits ran for minutes without a word)
        return _die(f"--bits {args.bits}: an RSA CMK has 2048 to 16384 bits (3072, the default, is the usual)")
    if not args.path or args.path.endswith("/") or os.path.isdir(args.path):
        return _die(f"{args.path!r}: give the private key's file name (PATH.pub is written beside it)")
    if args.path.endswith(".pub"):
        return _die(f"{args.path}: that names a public key; give the private key's file name "
                    f"(PATH.pub is written beside it)")
    try:
        parent = os.path.dirname(os.path.abspath(args.path))
        if not os.path.isdir(parent):
            os.makedirs(parent, mode=0o700)  # e.g. /etc/ossfuse on a new server
        from .keyring import generate_rsa_cmk
        generate_rsa_cmk(args.path, args.bits)
    except FileExistsError as e:
        if e.filename != args.path and not str(e.filename).endswith(".pub"):
            return _die(f"{e.filename}: not a directory")  # a file where the key's directory belongs
        # the key asked for, when it is there (its .pub is made first: a new-user trial was
        # told of the .pub only)
        return _die(f"{args.path if os.path.lexists(args.path) else e.filename}: already exists; not overwriting a CMK")
    except OSError as e:
        return _die(f"{e.filename or args.path}: {e.strerror}")
    print(f"wrote CMK {args.path} (private, mode 0600) and {args.path}.pub")
    return 0


QUICKSTART_CONFIG = """\
# ossfuse mount of the embedded local-directory bucket (written by `ossfuse quickstart`).
[store]
url = "local://{bucket}"
prefix = ""

[encryption]
encrypt_with = "default"

[[encryption.cmk]]
id = "default"
type = "rsa"
private_key = "{key}"

[cache]
dir = "{cache}"
"""


def _encrypted_object_in(bucket: str, limit: int = 100) -> str | None:
    """The key of an encrypted object among the first ``limit`` of local bucket dir
    ``bucket`` (HEAD of each: the envelope is in its metadata), else None."""
    import trio
    from .envelope import is_encrypted
    from .store.local import LocalStore

    async def find() -> str | None:
        store = LocalStore(bucket)
        try:
            page = await store.list("", delimiter=None, max_keys=limit)
            for o in page.objects:
                info = await store.head(o.key)
                if info is not None and is_encrypted(info.metadata):
                    return o.key
            return None
        finally:
            await store.aclose()

    return trio.run(find)


def _journaled_in(cache_dir: str) -> int:
    """How many journal records (closed files not uploaded yet) the cache dir holds."""
    try:
        return sum(1 for n in os.listdir(os.path.join(cache_dir, "staging")) if n.endswith(".json"))
    except OSError:
        return 0


def cmd_quickstart(args) -> int:
    """Create (once) a CMK, a config and a local bucket, then mount it."""
    root = os.geteuid() == 0
    # absolute: the config's paths are relative to the config file, not to where this ran
    etc = os.path.abspath(args.etc or ("/etc/ossfuse" if root else os.path.expanduser("~/.config/ossfuse")))
    var = os.path.abspath(args.var or ("/var/lib/ossfuse" if root else os.path.expanduser("~/.local/share/ossfuse")))
    cache = os.path.abspath(args.cache or ("/var/cache/ossfuse/default" if root
                                           else os.path.expanduser("~/.cache/ossfuse/default")))
    mp = _mount_point_arg(args.mountpoint or ("/mnt/ossfuse" if root else os.path.expanduser("~/ossfuse")))
    for what, path in (("--etc", etc), ("--var", var), ("--cache", cache), ("mount point", mp)):
        if os.path.exists(path) and not os.path.isdir(path) and mounted_type(path) is None:
            return _die(f"{what} {path} is not a directory")
    try:
        return _quickstart(args, etc, var, cache, mp)
    except OSError as e:  # a directory or key that cannot be made: one line, not a traceback
        return _die(f"{e.filename}: {e.strerror}" if e.filename else str(e))


def _quickstart(args, etc: str, var: str, cache: str, mp: str) -> int:
    """:func:`cmd_quickstart` with its paths made absolute and checked. Raises OSError."""
    bucket = os.path.join(var, "bucket")
    key = os.path.join(etc, "default.pem")
    conf = os.path.join(etc, "default.toml")
    if os.path.exists(conf):  # made by an earlier quickstart: it says where the bucket and cache are
        from . import config as config_mod
        try:
            cfg = config_mod.load(conf, missing_keys=True)  # a missing CMK is dealt with below
        except config_mod.ConfigError as e:
            return _die(str(e))
        cmk = next(c for c in cfg.encryption.cmks if c.id == cfg.encryption.encrypt_with)
        if cmk.private_key is not None:
            key = cmk.private_key  # the CMK new files are written with
        url = cfg.store.url
        used = url[len("local://"):] if url.startswith("local://") else url
        differs = [f"{opt} ({given})" for opt, given, same in (
            ("--var", args.var, os.path.abspath(bucket) == used),
            ("--cache", args.cache, os.path.abspath(cache) == cfg.cache.dir)) if given and not same]
        if differs:
            return _die(f"{conf} exists and uses the bucket {used} and the cache dir {cfg.cache.dir}, not "
                        f"{' and '.join(differs)} (--var and --cache count only when quickstart creates the "
                        f"config): pass another --etc, or edit {conf}")
        bucket, cache = used, cfg.cache.dir
        print(f"using the existing config {conf} (made by an earlier quickstart)")
    if args.new_key and os.path.exists(key):  # (a trial: the flag was ignored without a word)
        print(f"ossfuse: warning: --new-key makes a CMK only when {key} is missing; it exists and stays the CMK of "
              f"new files (another CMK: `ossfuse keygen`, an [[encryption.cmk]] entry in {conf}, and `ossfuse rekey` "
              f"for the files there)", file=sys.stderr)
    if not os.path.exists(key):  # refused before anything is made, or (--new-key) warned of
        if os.path.isdir(bucket) and (found := _encrypted_object_in(bucket)):
            if not args.new_key:
                return _die(f"{bucket} already holds encrypted objects (e.g. {found!r}) and {key} does not exist: "
                            f"a new CMK could not read them; pass --etc with the directory of their key, or "
                            f"--new-key to make a new one anyway")
            # (a new-user trial: --new-key said nothing of them; they then gave EIO)
            print(f"ossfuse: warning: the encrypted objects {bucket} holds (e.g. {found!r}) stay readable only with "
                  f"the missing CMK: through the folder they give EIO (`ossfuse check -c {conf} --verify` lists "
                  f"each)", file=sys.stderr)
        journaled = _journaled_in(cache)
        if journaled and not args.new_key:
            return _die(f"the cache dir {cache} holds {journaled} journaled file(s) not uploaded yet and {key} does "
                        f"not exist: they are encrypted under it; pass --etc with the directory of their key, or "
                        f"--new-key to make a new one anyway (they would then be uploaded unreadable)")
        if journaled:
            print(f"ossfuse: warning: the {journaled} journaled file(s) in the cache dir {cache} are encrypted under "
                  f"the missing CMK: they upload unreadable", file=sys.stderr)
    os.makedirs(etc, mode=0o700, exist_ok=True)
    if "://" not in bucket and not os.path.exists(conf):
        # made with its config; an existing config's bucket is the mount's to make or, once
        # served and now missing (its disk not mounted), to refuse
        os.makedirs(bucket, mode=0o700, exist_ok=True)
    made_mp = False
    if mounted_type(mp) is None:  # (a mount there, even one whose daemon died, is dealt with below)
        made_mp = not os.path.lexists(mp)
        os.makedirs(mp, exist_ok=True)
    if not os.path.exists(key):
        if os.path.exists(key + ".pub"):  # the public half of the missing CMK: useless, kept aside
            os.replace(key + ".pub", key + ".pub.old")
            print(f"moved {key}.pub, the public key of the missing CMK, to {key}.pub.old")
        from .keyring import generate_rsa_cmk
        generate_rsa_cmk(key)
        print(f"created CMK {key} (keep a copy: without it the files cannot be decrypted)")
    if not os.path.exists(conf):
        with open(conf, "w") as f:
            f.write(QUICKSTART_CONFIG.format(bucket=bucket, key=key, cache=cache))
        print(f"created config {conf}")
    fstype = mounted_type(mp)  # from mountinfo: a stat of a mount whose daemon died fails, one stuck hangs
    if fstype is not None and fstype != "fuse.ossfuse":
        return _die(f"{mp}: something else ({fstype}) is mounted there; pass another mount point")
    if fstype is not None and daemon_gone(mp) is None:
        print(f"already mounted: {mp}")
    else:  # not mounted, or the mount of a daemon that died (the mount replaces it)
        ns = argparse.Namespace(config=conf, mountpoint=mp, foreground=False, o=None, log_level="info",
                                ready_fd=None)
        status = cmd_mount(ns)
        if status:
            if made_mp:  # refused: the mount point it made goes again (a new-user trial: left behind)
                try:
                    os.rmdir(mp)
                except OSError:
                    pass
            return status
    layout = (" (the local store's own layout: an index and encrypted blobs, not a file per object; "
              "read it through the folder)" if "://" not in bucket else "")
    me = _command_for_hints()
    print(f"folder: {mp}\nbucket directory: {bucket}{layout}\nconfig: {conf}\n"
          f"unmount with: {me} umount {shlex.quote(mp)}\n"
          f"mount again with: {me} mount -c {shlex.quote(conf)} {shlex.quote(mp)}")
    return 0


def _command_for_hints() -> str:
    """How a printed hint names this program: ``ossfuse`` when the PATH's is this program (or
    this one is no ``ossfuse`` command: ``python -m ossfuse``), else this program's own path (a
    trial: installed with OSSFUSE_NO_LINK=1, the hint named a command the shell could not find;
    two new-user trials: it named the PATH's, another install); prefixed with
    ``OSSFUSE_RUNTIME_DIR=…`` when that is set, since umount and status find the daemon there
    (a new-user trial: the hint failed without it)."""
    env = os.environ.get(ENV_RUNTIME_DIR)
    prefix = f"{ENV_RUNTIME_DIR}={shlex.quote(env)} " if env else ""
    me = os.path.abspath(sys.argv[0])
    command = os.path.basename(me) == "ossfuse" and os.access(me, os.X_OK)
    on_path = shutil.which("ossfuse")
    if on_path and (not command or os.path.realpath(on_path) == os.path.realpath(me)):
        return prefix + "ossfuse"
    if command:
        return prefix + shlex.quote(me)
    return f"{prefix}{shlex.quote(sys.executable)} -m ossfuse"


class _VersionAction(argparse.Action):
    """``--version``, read from the package metadata only when asked (~0.1 s per command)."""

    def __call__(self, parser, namespace, values, option_string=None):
        from importlib.metadata import version
        parser.exit(message=f"ossfuse {version('ossfuse')}\n")


def _mount_args(m: argparse.ArgumentParser) -> None:
    m.add_argument("-c", "--config", required=True, help="TOML config file")
    m.add_argument("mountpoint", type=_path_arg, help="an empty directory to mount at")
    m.add_argument("-f", "--foreground", action="store_true", help="do not daemonize; log to stderr")
    m.add_argument("-o", action="append", metavar="OPT[,OPT...]", help="mount options: allow_other, ro, uid=, gid=, umask=, attr_timeout=, entry_timeout=, nonempty "
                   "(mount over a non-empty directory), other FUSE options")
    m.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    m.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    m.set_defaults(fn=cmd_mount)


def _seconds(text: str) -> float:
    """An argparse type: a number of seconds, at least 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value >= 0:  # (also NaN)
        raise argparse.ArgumentTypeError(f"must be 0 or more seconds: {text!r}")
    return value


def _umount_args(u: argparse.ArgumentParser) -> None:
    u.add_argument("mountpoint", type=_path_arg, help="where the bucket is mounted")
    u.add_argument("--timeout", type=_seconds, default=3600.0, help="seconds to wait for uploads (default 3600)")
    u.set_defaults(fn=cmd_umount)


def _status_args(st: argparse.ArgumentParser) -> None:
    st.add_argument("mountpoint", type=_path_arg, help="where the bucket is mounted")
    fmt = st.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="machine-readable output")
    fmt.add_argument("--prometheus", action="store_true",
                     help="Prometheus text exposition format (e.g. for node_exporter's textfile collector)")
    st.set_defaults(fn=cmd_status)


def _rekey_args(r: argparse.ArgumentParser) -> None:
    r.add_argument("-c", "--config", required=True, help="TOML config file of the mount (store and CMKs)")
    r.add_argument("--from", dest="from_id", metavar="ID", help="only objects wrapped by this CMK")
    r.add_argument("--to", dest="to_id", metavar="ID", help="target CMK (default: what the rules pick)")
    r.add_argument("--dry-run", action="store_true", help="say what would change, change nothing")
    r.add_argument("path", nargs="?", default="", help="a file, or a directory whose objects are all rekeyed: a path in a mount of this config, "
                        "or below the mount's root (default: all)")
    r.set_defaults(fn=cmd_rekey)


def _check_args(ch: argparse.ArgumentParser) -> None:
    ch.add_argument("-c", "--config", required=True, help="TOML config file to check")
    ch.add_argument("--verify", nargs="?", const="", metavar="PATH",
                    help="also read every object under PATH (a file or directory: a path in a mount of this "
                         "config, or below the mount's root; default: all) and check its integrity tags; each one "
                         "that fails is a FAIL line")
    ch.set_defaults(fn=cmd_check)


def _keygen_args(k: argparse.ArgumentParser) -> None:
    k.add_argument("path", help="where to write the private key (PKCS#8 PEM, 0600); the public key goes to PATH.pub")
    k.add_argument("--bits", type=int, default=3072, help="RSA modulus size in bits (default 3072, at least 2048)")
    k.set_defaults(fn=cmd_keygen)


def _quickstart_args(q: argparse.ArgumentParser) -> None:
    q.add_argument("mountpoint", nargs="?", type=_path_arg, help="where to mount (default /mnt/ossfuse as root, ~/ossfuse otherwise)")
    q.add_argument("--etc", metavar="DIR", help="where the CMK and config go (default /etc/ossfuse as root, "
                   "~/.config/ossfuse otherwise)")
    q.add_argument("--var", metavar="DIR", help="where the local bucket goes, as DIR/bucket (default "
                   "/var/lib/ossfuse as root, ~/.local/share/ossfuse otherwise); only when the config is created")
    q.add_argument("--cache", metavar="DIR", help="the cache dir (default /var/cache/ossfuse/default as root, "
                   "~/.cache/ossfuse/default otherwise); only when the config is created")
    q.add_argument("--new-key", action="store_true", help="make a new CMK even though the bucket directory "
                   "already holds encrypted objects (which that key cannot read)")
    q.set_defaults(fn=cmd_quickstart)


# (command, help, adds its arguments): main builds only the arguments of the command it runs
_COMMANDS = (
    ("mount", "mount a bucket prefix", _mount_args),
    ("umount", "unmount, then wait until every pending upload is in the bucket", _umount_args),
    ("status", "pending uploads, cache use, recent errors, CMKs of a mount", _status_args),
    ("rekey", "re-wrap objects' data keys to another CMK (content untouched)", _rekey_args),
    ("check", "prove every CMK wraps and unwraps, and the store answers", _check_args),
    ("keygen", "write a new RSA CMK (PATH and PATH.pub)", _keygen_args),
    ("quickstart", "create a CMK, a config and a local bucket, and mount it", _quickstart_args),
)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="ossfuse", description="Mount an OSS bucket prefix with "
                                "client-side encryption compatible with the OSS SDKs.")
    p.add_argument("--version", action=_VersionAction, nargs=0, help="show the version and exit")
    sub = p.add_subparsers(dest="command", required=True)
    # Only the command given gets its arguments: argparse's add_argument builds a help
    # formatter each time, and all of them took ~18 ms, most of `ossfuse umount`'s own time.
    # The first word that is not an option is the command (the top level has no option
    # that takes a value).
    wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, help_text, add_arguments in _COMMANDS:
        parser = sub.add_parser(name, help=help_text, add_help=name == wanted)
        if name == wanted:
            add_arguments(parser)

    args = p.parse_args(argv)
    if os.environ.get(ENV_RUNTIME_DIR):  # the daemon runs from "/": a relative one would be another dir
        os.environ[ENV_RUNTIME_DIR] = os.path.abspath(os.environ[ENV_RUNTIME_DIR])
    try:
        status = args.fn(args)
        # stdout is block-buffered when it is a file: its last write happens here, not at exit,
        # where a full disk was "Exception ignored" and exit 120 (a new-user trial on a machine
        # without PYTHONUNBUFFERED)
        sys.stdout.flush()
        return status
    except BrokenPipeError:  # e.g. `ossfuse status MNT | head -1`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) or e.filename is not None:
            raise  # (a failed write to stdout names no file)
        # `ossfuse status --prometheus MNT > file` on a full disk (the cron recipe): one line
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        print(f"ossfuse {args.command}: cannot write its output: {e.strerror}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback (umount says more itself)
        print(f"ossfuse {args.command}: interrupted", file=sys.stderr)
        return 130
