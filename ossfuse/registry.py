"""Where running mounts are found, what holds a mount, and which mount a path is in.

The runtime directory holds, per mount point (named by a hash of its real path), a registry
record ``<hash>.json`` (pid, config, exit status once the daemon ends), the status socket
``<hash>.sock`` and the mount point's lock ``<hash>.lock`` (flocked by its daemon for its life,
:func:`flocked`); an exited daemon's record is removed an hour after its exit by the next
daemon that mounts (:func:`prune_exited_records`), with its lock unless a process holds it.
It is ``$OSSFUSE_RUNTIME_DIR`` when set;
else ``/run/ossfuse`` as root; else ``$XDG_RUNTIME_DIR/ossfuse``; else ``/tmp/ossfuse-<uid>``
(the tmux/ssh-agent habit: per user, never one shared world-writable directory). After a reboot ``/run`` is empty, so
:func:`ensure_runtime_dir` makes it (mode 0700) before anything binds or writes there, and
refuses one that another user owns or others may write (they could plant records, sockets or
symlinks). Under systemd, the unit declares it (``RuntimeDirectory=ossfuse``).

Mount state is read from ``/proc/self/mountinfo``, never by ``stat`` of the mount point: a
daemon that stats its own mount point waits for itself.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import signal
import stat
import time

ENV_RUNTIME_DIR = "OSSFUSE_RUNTIME_DIR"
#: The daemon's exit status (also in its record) when it unmounted but uploads remain in the
#: journal (EX_TEMPFAIL); ``ossfuse umount`` exits with it too.
EXIT_PENDING = 75
_SUN_PATH_MAX = 107  # Linux sockaddr_un.sun_path (108 bytes) less the terminating NUL


class UnsafeDirError(Exception):
    """A directory the daemon keeps state in cannot be made or is unsafe (message names the
    path, the reason and the fix)."""


def check_private_dir(path: str, what: str, ancestors: bool = True) -> None:
    """Refuse a directory that is a symlink or not a directory, belongs to another user, or
    that group or others may write: they could plant records, sockets or symlinks there that
    the daemon (often root) would use or write through; and one inside a directory anyone may
    write without the sticky bit (/tmp's): anyone could rename it away and put their own in
    its place (a trial: a cache dir under a 0777 parent was accepted; ``ancestors`` False: not
    checked, for a running daemon's own writes, which the mount's start checked). Raises
    UnsafeDirError."""
    try:
        st = os.lstat(path)
    except OSError as e:
        raise UnsafeDirError(f"{what} {path}: {e.strerror}") from None
    parent = os.path.dirname(os.path.realpath(path))
    while ancestors:
        try:
            pst = os.stat(parent)
        except OSError:
            break
        if pst.st_mode & 0o002 and not pst.st_mode & stat.S_ISVTX:
            raise UnsafeDirError(f"{what} {path} is inside {parent}, which anyone may write (mode "
                                 f"{stat.S_IMODE(pst.st_mode):04o}, no sticky bit): another user could put "
                                 f"their own directory in its place; run: chmod o-w {parent}")
        if parent == os.path.dirname(parent):
            break
        parent = os.path.dirname(parent)
    if stat.S_ISLNK(st.st_mode):  # (a trial: "is not a directory" puzzled a user who symlinked it to another disk)
        raise UnsafeDirError(f"{what} {path} is a symlink, which is refused (it could be pointed elsewhere): give "
                             f"the directory's own path ({os.path.realpath(path)})")
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeDirError(f"{what} {path} is not a directory")
    if st.st_uid != os.geteuid():
        raise UnsafeDirError(f"{what} {path} belongs to uid {st.st_uid}, not to this user (uid "
                             f"{os.geteuid()}); use a directory of your own")
    if st.st_mode & 0o022:
        # a shared directory (sticky: /tmp, /var/tmp) must stay shared: a private one inside it
        fix = (f"use a directory of its own inside it (e.g. {os.path.join(path, 'ossfuse')})"
               if st.st_mode & stat.S_ISVTX else f"run: chmod 700 {path}")
        raise UnsafeDirError(f"{what} {path} is writable by other users (mode {stat.S_IMODE(st.st_mode):04o}); {fix}")


def runtime_dir() -> str:
    """The runtime directory's path (see the module doc); not created here."""
    if os.environ.get(ENV_RUNTIME_DIR):
        return os.environ[ENV_RUNTIME_DIR]
    if os.geteuid() == 0:
        return "/run/ossfuse"
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    return os.path.join(xdg, "ossfuse") if xdg else f"/tmp/ossfuse-{os.geteuid()}"


def ensure_runtime_dir(ancestors: bool = True) -> str:
    """Make the runtime directory (0700, parents as needed) if missing and check it is safe
    (:func:`check_private_dir`, its ``ancestors`` too unless False). Returns its path; raises
    UnsafeDirError."""
    path = runtime_dir()
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except OSError as e:
        raise UnsafeDirError(f"runtime directory {path}: {e.strerror}") from None
    check_private_dir(path, "runtime directory", ancestors)
    return path


def runtime_dir_too_long() -> str | None:
    """Why the runtime directory cannot hold a mount's status socket (one line with the fix),
    or None: its path is too long for the socket's (AF_UNIX: at most 107 bytes, ``sun_path``
    of Linux's ``sockaddr_un`` less its NUL)."""
    path = runtime_dir()
    longest = len(os.fsencode(path)) + 1 + 32 + len(".sock")  # registry_path's socket names
    if longest <= _SUN_PATH_MAX:
        return None
    return (f"runtime directory {path}: too long for the status socket in it ({longest} bytes; a unix "
            f"socket's path has at most {_SUN_PATH_MAX}): give {ENV_RUNTIME_DIR} a path of at most "
            f"{_SUN_PATH_MAX - 38} bytes")


# C0 and C1 control characters but newline and tab, as \xNN: object names come from any
# client of the bucket, and a name holding ESC sequences reached the operator's terminal
# through `ossfuse umount` and `status` (a trial: "\033[2J" cleared it)
_CONTROLS = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7f, *range(0x80, 0xa0)) if c not in (0x09, 0x0a)}


def printable(text: str) -> str:
    """``text`` for a terminal: control characters other than newline and tab as ``\\xNN``."""
    return text.translate(_CONTROLS)


_ONE_LINE = {**_CONTROLS, 0x09: "\\t", 0x0a: "\\n"}


def one_line(text: str) -> str:
    """``text`` as one line of a command's output: :func:`printable`, and newline and tab as
    ``\\n`` and ``\\t`` (an object name holding a newline forged an output line of
    ``check --verify`` and ``status``: a trial)."""
    return text.translate(_ONE_LINE)


def _comm(pid: int | str) -> str:
    """Process ``pid``'s command name (/proc/PID/comm) for one line of output: any program may
    name itself with a newline or an escape sequence (a trial split `umount`'s refusal so).
    Raises OSError (gone, or not ours to read)."""
    with open(f"/proc/{pid}/comm") as f:
        return one_line(f.read().removesuffix("\n"))


def registry_path(mountpoint: str, suffix: str = ".json") -> str:
    """Per-mount file in the runtime dir: ``.json`` (the registry record) or ``.sock`` (the
    status socket). Resolves ``mountpoint``: call it before mounting, never from the daemon
    once mounted."""
    real = real_mountpoint(mountpoint)
    return os.path.join(runtime_dir(), hashlib.sha256(os.fsencode(real)).hexdigest()[:32] + suffix)


def real_mountpoint(path: str) -> str:
    """``os.path.realpath(path)``, without a stat of a mount point on the way (a mount point is
    no symlink): that stat asks the mount's daemon, and one that is stopped or stuck never
    answers, so ``status`` and ``umount`` hung on it. The parent directories are resolved as
    realpath does; a symlink at the end is followed by reading it (a chain of at most 40)."""
    p = os.path.abspath(path)
    for _ in range(40):
        parent, name = os.path.split(p)
        if not name:
            break
        joined = os.path.join(os.path.realpath(parent), name)
        if mounted_type(joined) is not None:
            return joined
        if not os.path.islink(joined):  # (lstat: a path that is no mount point, never followed)
            return os.path.realpath(joined)
        p = os.path.normpath(os.path.join(os.path.dirname(joined), os.readlink(joined)))
    return os.path.realpath(p)


def write_registry(path: str, record: dict) -> None:
    """Atomically write the registry record at ``path`` (from registry_path()). The runtime
    dir's parents are not checked here: the mount's start did, and a parent made
    world-writable while mounted must not kill the daemon at its exit record (a trial)."""
    ensure_runtime_dir(ancestors=False)
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(record, f)
    os.replace(tmp, path)


def read_registry(mountpoint: str) -> dict | None:
    """The registry record of ``mountpoint``, or None if there is none (or it is unreadable)."""
    try:
        with open(registry_path(mountpoint)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _process_state(pid: int) -> str | None:
    """The state letter of ``pid`` in /proc (R, S, D, T, t, Z, ...); None when unreadable."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0]
    except (OSError, IndexError):
        return None


def process_stopped(pid: int) -> bool:
    """Whether ``pid`` is stopped (state T: SIGSTOP, Ctrl-Z, or t: a debugger): it does nothing
    until ``kill -CONT``. False when it runs, is gone, or cannot be read."""
    return _process_state(pid) in ("T", "t")


def process_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, exited but not reaped, does not count)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, owned by someone else
    state = _process_state(pid)
    return state is not None and state != "Z"


def process_start_ticks(pid: int | str = "self") -> int | None:
    """When process ``pid`` started, in clock ticks since boot (/proc/PID/stat field 22): with
    the pid, a name of the process no later process shares. None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def process_started(pid: int | str = "self") -> float | None:
    """When process ``pid`` started (its fork), in ``time.time()`` seconds, to 1/CLK_TCK s;
    None when it is gone (or /proc cannot say)."""
    ticks = process_start_ticks(pid)
    try:
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return None if ticks is None else time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))


def daemon_alive(record: dict) -> bool:
    """Whether the daemon of the (not exited) registry ``record`` runs: its pid is alive and,
    where the record has it, started at the daemon's ``pid_start`` (clock ticks since boot,
    immune to a wall-clock step), so it is not a later process that reuses the pid of a
    daemon that crashed (its record stays, unexited)."""
    pid = record.get("pid")
    if not pid or not process_alive(pid):
        return False
    if record.get("pid_start") is not None:
        return process_start_ticks(pid) == record["pid_start"]
    try:  # a record written before pid_start: at least an ossfuse process
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"ossfuse" in f.read()
    except OSError:
        return False


def record_of(mountpoint: str, device: str | None) -> dict | None:
    """The registry record of the daemon serving ``mountpoint`` (mounted from ``device``): its
    own if it is of that device; else, for a bind mount of a mount made at another path (or a
    path whose own record is of an earlier or a covered mount), the record of that device's
    mount, found by the device (a running daemon's first; else an unexited one's, whose daemon
    died, if its mount point still holds that device; never a daemon's that is unmounted and
    draining: its record says ``unmounted``). A record of another config than the one
    mounted at ``mountpoint`` is never this mount's: a daemon stopped (SIGSTOP) after its
    mount was taken away cannot say ``unmounted``, and its device number is reused."""
    record = read_registry(mountpoint)
    mounted = mounted_filesystem(mountpoint)
    source = mounted[1] if mounted is not None and mounted[0] == device else None

    def ours(r: dict) -> bool:  # (None: a record written before devices, or before configs)
        return (not r.get("exited") and r.get("device") in (None, device)
                and (source is None or r.get("config") in (None, source)))
    own = record is not None and ours(record)
    if device is None or (record is not None and own and daemon_alive(record)):
        return record
    # the path's own record is dead or of another mount: a live daemon of this device (the
    # number is reused once a mount is gone) comes first, then the dead record that names it
    # (not a draining daemon's: unmounted, its number is free for the next mount, which may be
    # this one; a trial's umount of a bind mount waited for another test's draining daemon and
    # said its outcome, exit 0, though this one's daemon had died)
    same = [r for r in _records() if ours(r) and not r.get("unmounted") and r.get("device") == device]
    live = next((r for r in same if daemon_alive(r)), None)
    if live is not None or own:
        return live or record
    # A dead daemon's record found by the device alone is this mount's only if its own mount
    # point still holds this device (a bind mount of it): device numbers are reused, and a
    # crashed mount cleared by hand (fusermount3 -u) leaves an unexited record naming one.
    return next((r for r in same if mounted_device(r.get("mountpoint", "")) == device), None)


def _unescape(field: bytes) -> str:
    """A mountinfo path as os.fsdecode gives it: mountinfo escapes space, tab, newline and
    backslash as octal (\\040 …) and leaves every other byte as the path has it, which need
    not be UTF-8 (any mount's name, not only ours, is in the file)."""
    return os.fsdecode(re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), field))


def _mountinfo(mountinfo: str = "/proc/self/mountinfo") -> list[tuple[str, str, str, str, str]]:
    """(device "major:minor", mount point, root, fstype, source) of each line of a mountinfo
    file; root: the directory of the filesystem mounted there ("/" for a whole one, "/sub" for
    a bind mount of its ``sub``); source: what was mounted (an ossfuse mount's config path)."""
    out = []
    with open(mountinfo, "rb") as f:
        for line in f:
            fields = line.split()
            sep = fields.index(b"-")
            source = _unescape(fields[sep + 2]) if len(fields) > sep + 2 else ""
            out.append((fields[2].decode(), _unescape(fields[4]), _unescape(fields[3]), os.fsdecode(fields[sep + 1]),
                        source))
    return out


def mounts(mountinfo: str = "/proc/self/mountinfo") -> list[tuple[str, str, str]]:
    """(device "major:minor", mount point, fstype) of each line of a mountinfo file."""
    return [(dev, mp, fstype) for dev, mp, _root, fstype, _source in _mountinfo(mountinfo)]


def mounted_filesystem(mountpoint: str, mountinfo: str = "/proc/self/mountinfo") -> tuple[str, str] | None:
    """(device, source) of the ossfuse mount at ``mountpoint`` (the topmost), or None: what
    tells its other mount points (bind mounts) from another filesystem's once it is unmounted
    (device numbers are reused at once: a mount made meanwhile got the same one)."""
    found = None
    for dev, mp, _root, fs, source in _mountinfo(mountinfo):
        if mp == mountpoint:
            found = (dev, source) if fs == "fuse.ossfuse" else None
    return found


def filesystem_of(record: dict) -> tuple[str, str] | None:
    """The filesystem (device, source: :func:`mounted_filesystem`) a daemon's registry record
    says it mounted; None for a record written before devices or configs were noted."""
    return (record["device"], record["config"]) if record.get("device") and record.get("config") else None


def mount_points_of(filesystem: tuple[str, str] | None, mountinfo: str = "/proc/self/mountinfo") -> list[str]:
    """The mount points in this mount namespace of the ossfuse ``filesystem`` (device, source:
    :func:`mounted_filesystem`), each once."""
    return list(dict.fromkeys(mp for dev, mp, _root, fs, source in _mountinfo(mountinfo)
                              if filesystem is not None and fs == "fuse.ossfuse" and (dev, source) == filesystem))


def ossfuse_mount_holding(path: str) -> str | None:
    """The ossfuse mount point at or above ``path`` in this mount namespace (the innermost),
    or None. Compares absolute paths, no stat (a path in a FUSE mount asks its daemon)."""
    path = os.path.abspath(path) + "/"
    holding = [m for _dev, m, fs in mounts() if fs == "fuse.ossfuse" and path.startswith(m.rstrip("/") + "/")]
    return max(holding, key=len) if holding else None


def cache_dir_in_a_mount(cache_dir: str) -> str | None:
    """Why ``cache_dir`` cannot be a cache dir because it is inside an ossfuse mount (its lock,
    journal and log would become objects of that mount's bucket: an operator trial), or None."""
    holder = ossfuse_mount_holding(cache_dir)
    if holder is None:
        return None
    return f"cache dir {cache_dir} is inside the ossfuse mount at {holder}: give it a directory on a local disk"


def mounted_device(mountpoint: str, fstype: str = "fuse.ossfuse") -> str | None:
    """The device ("major:minor") of the ``fstype`` mount at ``mountpoint`` in this process's
    mount namespace (the topmost one), or None when nothing of that type is mounted there."""
    found = None
    for dev, mp, fs in mounts():
        if mp == mountpoint:
            found = dev if fs == fstype else None
    return found


def mounted_type(mountpoint: str) -> str | None:
    """The filesystem type of the topmost mount at ``mountpoint`` in this process's mount
    namespace ("fuse.ossfuse", "tmpfs", ...), or None when nothing is mounted there."""
    found = None
    for _dev, mp, fs in mounts():
        if mp == mountpoint:
            found = fs
    return found


def holders(filesystem: tuple[str, str], exclude_ns: str | None = None) -> list[tuple[int, str]]:
    """Processes (pid, command name) of other mount namespaces in which the ossfuse
    ``filesystem`` (device, source: :func:`mounted_filesystem`) is still mounted: one per
    namespace, the first found. Containers, ``unshare -m`` and ``ip netns exec`` keep copies of
    mounts that outlive an unmount here."""
    done = {exclude_ns or os.readlink("/proc/self/ns/mnt")}
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            ns = os.readlink(f"/proc/{name}/ns/mnt")
            # every process is asked, not one per namespace: a chrooted one sees only the
            # mounts below its root
            if ns in done or not any((dev, source) == filesystem and fs == "fuse.ossfuse"
                                     for dev, _, _, fs, source in _mountinfo(f"/proc/{name}/mountinfo")):
                continue
            done.add(ns)
            found.append((int(name), _comm(name)))
        except (OSError, ValueError):
            continue  # gone meanwhile, or not ours to read
    return found


def daemon_gone(mountpoint: str, record: dict | None = None) -> int | None:
    """When an ossfuse mount is at ``mountpoint`` but its daemon is dead (the kernel then
    answers every access with ENOTCONN, "transport endpoint is not connected"): the dead
    daemon's pid, 0 when there is no registry record to name it. None otherwise (nothing
    mounted, or the daemon runs). ``record``: the daemon's (:func:`record_of`), else the mount
    point's own. Reads mountinfo and the registry; unless the record's daemon runs, it asks
    the mount itself (:func:`mount_answers_enotconn`): a record whose daemon is dead is not
    proof, since it may be stale."""
    if mounted_device(mountpoint) is None:
        return None
    record = record or read_registry(mountpoint)
    if record is not None and record.get("pid") and daemon_alive(record):
        return None
    # No record, or one whose daemon is dead: the record may be stale (a crashed earlier mount
    # at this path; the live daemon's record in another OSSFUSE_RUNTIME_DIR), so only the
    # mount itself can say it is dead. A dead one answers ENOTCONN at once; a live one answers,
    # or (stopped, stuck) does not within the wait: either way something serves it.
    if not mount_answers_enotconn(mountpoint):
        return None
    return record["pid"] if record is not None and record.get("pid") else 0


#: what an access to the mount of a dead FUSE daemon fails with: ENOTCONN, or ECONNABORTED for
#: a request that was waiting when the daemon's last /dev/fuse fd closed
DEAD_MOUNT_ERRNOS = (errno.ENOTCONN, errno.ECONNABORTED)


def mount_answers_enotconn(mountpoint: str, wait: float = 2.0) -> bool:
    """Whether a statfs of ``mountpoint`` fails with ENOTCONN (its FUSE daemon is dead: the
    kernel answers at once) or ECONNABORTED (it died while the statfs waited: the kernel ends
    a request pending when the last /dev/fuse fd closes with that, and a killed daemon's main
    thread reads as dead while its other threads still hold the fd) within ``wait`` seconds.
    A statfs is never answered from the kernel's caches, unlike a stat. It runs in a child
    process, killed after ``wait``: a stopped daemon never answers, and a thread of ours
    blocked in that statfs would keep the mount busy for the unmount that follows (a killed
    process lets go of it)."""
    pid = os.fork()
    if pid == 0:  # the child: exit status 0 ENOTCONN or ECONNABORTED, 1 anything else
        try:
            os.statvfs(mountpoint)
            code = 1
        except OSError as e:
            code = 0 if e.errno in DEAD_MOUNT_ERRNOS else 1
        os._exit(code)
    deadline = time.monotonic() + wait
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status) == 0
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)  # (ends a wait for a FUSE answer)
            os.waitpid(pid, 0)
            return False
        time.sleep(0.005)


def users_of(mountpoint: str) -> list[tuple[int, str, str]]:
    """Processes (pid, command name, what it holds: "open file PATH", "working directory PATH",
    "root directory PATH", "program PATH" or "mapped file PATH", the first found) with a file
    open, their working or root directory, their program or a mapped file (a library, an mmap
    kept after close) at or below ``mountpoint``: what keeps an unmount busy (what ``fuser -vm``
    shows, without psmisc). Reads /proc/PID/{fd/*,cwd,root,exe} links and /proc/PID/maps, which
    name paths without touching the mount; processes of other users are seen only as root."""
    below = mountpoint.rstrip("/") + "/"

    def inside(path: str) -> bool:
        path = path.removesuffix(" (deleted)")
        return path == mountpoint or path.startswith(below)

    kinds = {"cwd": "working directory", "root": "root directory", "exe": "program"}
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        base = f"/proc/{name}"
        try:
            links = [f"{base}/cwd", f"{base}/root", f"{base}/exe"] + [f"{base}/fd/{fd}" for fd in os.listdir(f"{base}/fd")]
        except OSError:
            continue  # gone meanwhile, or not ours to read
        what = None
        for link in links:
            try:
                target = os.readlink(link)
            except OSError:
                continue
            if inside(target):
                what = f"{kinds.get(link.rsplit('/', 1)[1], 'open file')} {printable(target)}"
                break
        if what is None:
            try:  # "address perms offset dev inode   path": the path is the sixth field, spaces and all
                with open(f"{base}/maps", "rb") as maps:
                    mapped = next((path for line in maps if len(parts := line.split(maxsplit=5)) == 6
                                   and inside(path := os.fsdecode(parts[5].rstrip(b"\n")))), None)
            except OSError:
                continue
            if mapped is not None:
                what = f"mapped file {printable(mapped)}"
        if what is not None:
            try:
                found.append((int(name), _comm(name), what))
            except OSError:
                pass
    return found


def killed(pid: int | str) -> bool:
    """Whether process ``pid`` has a SIGKILL pending (/proc/PID/status ShdPnd or SigPnd): it
    was killed, and ends as soon as it leaves the system call it is in."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("ShdPnd:", "SigPnd:")) and int(line.split()[1], 16) >> (signal.SIGKILL - 1) & 1:
                    return True
    except (OSError, ValueError, IndexError):
        pass
    return False


_PF_EXITING = 0x4  # task flag: the process is exiting (include/linux/sched.h)


def exiting(pid: int | str) -> bool:
    """Whether process ``pid`` is on its way out (PF_EXITING in /proc/PID/stat's flags): a
    killed process that left its request has taken its SIGKILL off the pending set
    (:func:`killed` is False then) but may hold its files a moment longer."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return bool(int(fields[6]) & _PF_EXITING)  # field 9 of stat(5); fields[0] is field 3
    except (OSError, ValueError, IndexError):
        return False


def dying(pid: int | str) -> bool:
    """Whether process ``pid`` was killed and has not ended yet: in a request still
    (:func:`killed`) or already on its way out (:func:`exiting`)."""
    return killed(pid) or exiting(pid)


def killed_in_a_request() -> list[tuple[int, str]]:
    """Processes (pid, command name) that were killed (:func:`killed`) with a thread still in
    uninterruptible sleep (state D): each waits for a request it cannot abandon, a FUSE one
    among them (a direct-I/O read, an open or a lookup waits for the daemon's answer), and
    keeps the mount busy until it returns, whether or not it has a file open there (a killed
    thread's process shows none: its leader is a zombie). Processes of other users are seen
    only as root."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or not killed(name):
            continue
        try:
            for tid in os.listdir(f"/proc/{name}/task"):
                with open(f"/proc/{name}/task/{tid}/stat", "rb") as f:
                    if f.read().rsplit(b")", 1)[1].split()[0] == b"D":
                        found.append((int(name), _comm(name)))
                        break
        except (OSError, IndexError):
            continue
    return found


def _record_files() -> list[tuple[str, dict]]:
    """(path, record) of every readable registry record in the runtime directory (of this
    user's mounts, past ones too), by file name."""
    try:
        names = sorted(os.listdir(runtime_dir()))
    except OSError:
        return []
    found = []
    for name in names:
        path = os.path.join(runtime_dir(), name)
        if name.endswith(".json") and (record := _load_record(path)) is not None:
            found.append((path, record))
    return found


def _load_record(path: str) -> dict | None:
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _records() -> list[dict]:
    """Every registry record in the runtime directory (of this user's mounts, past ones too)."""
    return [record for _, record in _record_files()]


def cache_dir_user(cache_dir: str) -> str | None:
    """When a running daemon holds the lock of ``cache_dir`` (``<cache dir>/lock``, an
    exclusive flock for the daemon's life): a short description of it for a message, "the
    ossfuse mount at MP (pid N): already mounted there" when its record is found and MP is
    mounted, "the daemon of MP (pid N), unmounted and still uploading …" when it drains,
    else "another ossfuse mount". None when nobody holds it (then nothing is created or
    locked)."""
    try:
        fd = os.open(os.path.join(cache_dir, "lock"), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return None  # no lock file (a new cache dir) or none we may open: the daemon decides
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        pass
    finally:
        os.close(fd)  # (releases a lock taken just now)
    for r in _records():
        if r.get("cache_dir") == cache_dir and not r.get("exited") and daemon_alive(r):
            mp = r.get("mountpoint")
            if isinstance(mp, str) and mounted_device(mp) is None:  # (a trial: "in use by the mount at" a bare dir)
                return (f"the daemon of {mp} (pid {r['pid']}), unmounted and still finishing its uploads "
                        f"(`ossfuse umount {mp}` waits for it)")
            return f"the ossfuse mount at {mp} (pid {r['pid']}): already mounted there"
    return "another ossfuse mount"


EXITED_RECORD_KEPT = 3600.0  # seconds an exited daemon's record is kept (for the umount that waits on it)


def flocked(path: str) -> int | None:
    """The fd of file ``path`` (made 0600 if missing) with an exclusive flock on it, held until
    it is closed (or the process ends); None when another process holds it. The lock is on the
    file the path names once it is held: one unlinked meanwhile (by the pruner) is
    opened afresh, or two processes could each hold a lock of "the same" path."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path, follow_symlinks=False))
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


@contextlib.contextmanager
def _holding(lock: str):
    """Yields whether this process holds lock file ``lock`` now (:func:`flocked`; False when
    another process holds it or it cannot be opened); released at the end."""
    try:
        fd = flocked(lock)
    except OSError:
        fd = None
    try:
        yield fd is not None
    finally:
        if fd is not None:
            os.close(fd)


def prune_exited_records(older_than: float = EXITED_RECORD_KEPT) -> int:
    """Remove the records of daemons that exited more than ``older_than`` seconds ago (by
    their ``exited_at``, wall clock); returns how many. Only ``umount`` reads such a record,
    within moments of the exit; kept, one per mount point ever used piles up in the runtime
    dir until the next boot (a test suite mounts hundreds), and :func:`_records` reads them
    all. Records of daemons that did not exit (running, or crashed: the next mount and
    ``umount`` need them) stay."""
    removed, cutoff = 0, time.time() - older_than

    def long_exited(record: dict | None) -> bool:
        return record is not None and bool(record.get("exited")) and record.get("exited_at", cutoff) < cutoff

    for path, record in _record_files():
        if not long_exited(record):
            continue
        # under the mount point's lock, read again: a daemon that mounted there since (it
        # takes the lock before it writes its record) wrote its own, which must stay (a
        # re-test: umount then found no record and did not wait for the uploads)
        lock = path[:-len(".json")] + ".lock"
        with _holding(lock) as held:  # (not held: a daemon mounts or serves there)
            if held and long_exited(_load_record(path)):
                with contextlib.suppress(OSError):
                    os.unlink(path)
                    removed += 1
                    os.unlink(lock)
    # the mount point locks (daemon.lock_mountpoint) of records gone before (pruned, or a mount
    # refused before it wrote one), older than the records kept: one per mount point ever used
    # piled up in /run until the next boot (a trial counted 2,948 after a day of test runs)
    try:
        names = set(os.listdir(runtime_dir()))
    except OSError:
        return removed
    for name in names:
        if name.endswith(".lock") and name[:-len(".lock")] + ".json" not in names:
            path = os.path.join(runtime_dir(), name)
            try:
                old = os.stat(path, follow_symlinks=False).st_mtime < cutoff
            except OSError:
                continue
            if old:
                with _holding(path) as held, contextlib.suppress(OSError):
                    if held:
                        os.unlink(path)
    return removed


def running_mounts() -> list[dict]:
    """The registry records of this user's mounts whose daemon runs (each with ``mountpoint``
    and ``config``, the config file's path), from the runtime directory."""
    return [r for r in _records() if not r.get("exited") and daemon_alive(r)]


def path_in_mount(path: str, config: str, command: str) -> str:
    """``check --verify``'s and ``rekey``'s PATH as a user types it, as the path below the
    mount's root it names ("." for all of it). None, "", is everything.

    - A path on this machine (an absolute one; a relative one typed inside a mount, or one that
      names something here): the kernel resolves it (``open(O_PATH | O_NOFOLLOW)``: symlinks
      and ``..`` as for any system call, a symlink at the end named itself unless a trailing
      slash follows it; one whose last name does not exist is its directory and that name),
      and it must be in a running ossfuse mount of ``config`` (its device: a filesystem
      mounted over part of the mount is not the mount); in a bind mount of a subdirectory, the
      path is below the bound one.
    - A relative PATH typed outside any mount that names nothing here (or is ``.``): the path
      below the mount's root (``photos``).

    Raises ValueError (one line naming the PATH as typed) for anything else: a path the kernel
    cannot resolve (ENOENT, ENOTDIR, ELOOP, ...), one not in a running ossfuse mount
    (``/tmp/x``, ``mnt/..``: it would name keys above the root), one in a mount of another
    config or whose daemon's record this runtime dir lacks or shows exited (which bucket it
    shows is not known, and a rekey must not guess), one in a mount whose daemon is gone
    (ENOTCONN), and a PATH that is not UTF-8 (no object name can be)."""
    if not path:
        return path  # none given: everything
    typed = path
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{command} {typed!r}: not UTF-8, as every object name is") from None
    if not os.path.isabs(path):
        try:
            os.getcwd()
        except OSError as e:
            raise ValueError(f"{command} {typed}: the current directory is gone ({e.strerror}): give an "
                             f"absolute PATH") from None
        if typed_below_root(path):
            return path
    canonical, device = _kernel_path(path, typed, command)
    found = _ossfuse_mount_of(canonical, device)
    if found is None:
        raise ValueError(f"{command} {typed}: that is not in a running ossfuse mount: give a path in the mount "
                         f"(or, typed outside any mount, one below the mount's root)")
    mp, root = found
    record = record_of(mp, device)
    running = record is not None and not record.get("exited") and daemon_alive(record)
    made_with = record.get("config") if running and record is not None else None
    if made_with is None or os.path.realpath(made_with) != os.path.realpath(config):
        raise ValueError(f"{command} {typed}: that is in the ossfuse mount at {mp}, made with "
                         f"{made_with or 'a config this runtime dir has no running daemon of'}, not with "
                         f"{os.path.abspath(config)}: give -c that mount's config, or PATH below the mount's root")
    return os.path.normpath(os.path.join(root.lstrip("/"), os.path.relpath(canonical, mp)))


def typed_below_root(path: str) -> bool:
    """Whether :func:`path_in_mount` takes ``path`` as it is typed, as a path below the mount's
    root: a relative one typed outside any mount that names nothing here, or ``.`` there."""
    if not path or os.path.isabs(path):
        return False
    try:
        here = os.getcwd()
    except OSError:
        return False
    return innermost_mount(here) is None and (path == "." or not os.path.lexists(path))


def _kernel_path(path: str, typed: str, command: str) -> tuple[str, str]:
    """(canonical absolute path, device "major:minor") of ``path`` as the kernel resolves it
    (:func:`path_in_mount`); a missing last name is its directory's, joined. Raises ValueError
    naming ``typed`` when the kernel cannot resolve it."""
    def opened(p: str, follow: bool = False) -> tuple[str, str]:
        fd = os.open(p, os.O_PATH | (0 if follow else os.O_NOFOLLOW))
        try:
            st = os.fstat(fd)
            return os.readlink(f"/proc/self/fd/{fd}"), f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
        finally:
            os.close(fd)
    try:
        return opened(path)
    except FileNotFoundError:
        head, last = os.path.split(path)
        if last in ("", ".", ".."):
            err: OSError = FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT))
        else:
            try:
                parent, device = opened(head or ".", follow=True)  # (a directory: its symlinks followed)
                if not stat.S_ISDIR(os.stat(parent).st_mode):
                    raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
                return os.path.join(parent, last), device
            except OSError as e:
                err = e
    except OSError as e:
        err = e
    if err.errno == errno.ENOTCONN:
        raise ValueError(f"{command} {typed}: that is in a mount whose daemon is gone (transport endpoint not "
                         f"connected): unmount it with `ossfuse umount`, or give PATH below the mount's root") from None
    raise ValueError(f"{command} {typed}: {err.strerror or err}") from None


def innermost_mount(path: str) -> str | None:
    """The innermost ossfuse mount point ``path`` (absolute, resolved) is in, or None."""
    found = _ossfuse_mount_of(path)
    return found[0] if found is not None else None


def _ossfuse_mount_of(path: str, device: str | None = None,
                      mountinfo: str = "/proc/self/mountinfo") -> tuple[str, str] | None:
    """(mount point, root) of the innermost mount ``path`` (absolute, resolved) is in, if that
    is an ossfuse mount (of ``device``, when given), else None. ``root`` is the directory of
    the filesystem mounted there (mountinfo's fourth field: "/" for the mount itself, "/sub"
    for a bind mount of its ``sub``)."""
    best: tuple[str, str, bool] | None = None
    for dev, mp, root, fstype, _source in _mountinfo(mountinfo):
        if (path == mp or path.startswith(mp.rstrip("/") + "/")) and (best is None or len(mp) >= len(best[0])):
            best = (mp, root, fstype == "fuse.ossfuse" and device in (None, dev))
    return (best[0], best[1]) if best is not None and best[2] else None
