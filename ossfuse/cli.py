"""The ``ossfuse`` command: mount, umount, status, rekey, check, keygen, quickstart; and the
mount(8) helper.

Exit status: 0 success; 1 a one-line error on stderr (bad config, missing key file, mount point
busy, …); 75 unmounted but uploads are still journaled (they finish on the next mount).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import subprocess
import sys
import time

from . import config as config_mod
from .daemon import EXIT_PENDING, MountError, process_alive, read_registry, run
from .keyring import generate_rsa_cmk

log = logging.getLogger("ossfuse")

_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _JournalFormatter(logging.Formatter):
    """sd-daemon(3) priority prefixes, so journald keeps each line's level."""

    _PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}

    def format(self, record: logging.LogRecord) -> str:
        return f"<{self._PRIORITY.get(record.levelno, 6)}>{record.name}: {record.getMessage()}"


def _die(msg: str) -> int:
    print(f"ossfuse: {msg}", file=sys.stderr)
    return 1


# fstab/mount(8) options that mean nothing to a FUSE daemon: accepted and ignored.
_IGNORED_OPTIONS = ("_netdev", "nofail", "auto", "noauto", "user", "users", "defaults", "rw")
_IGNORED_PREFIXES = ("x-systemd.", "x-gvfs-", "comment=")


def split_mount_options(cfg, options: list[str]):
    """``-o`` options → (config with uid/gid/umask applied, FUSE options). Raises ValueError
    naming a malformed option."""
    fuse, mount = [], {}
    for opt in options:
        name, _, value = opt.partition("=")
        if opt in _IGNORED_OPTIONS or opt.startswith(_IGNORED_PREFIXES):
            continue
        if name in ("uid", "gid", "umask"):
            try:
                mount[name] = int(value, 8 if name == "umask" else 10)
            except ValueError:
                raise ValueError(f"-o {opt}: {name} needs a number") from None
        elif name == "allow_other":
            mount["allow_other"] = True  # default_permissions is always on, so modes are enforced
        else:
            fuse.append(opt)
    if mount:
        cfg = dataclasses.replace(cfg, mount=dataclasses.replace(cfg.mount, **mount))
    return cfg, fuse


def cmd_mount(args) -> int:
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
    level = getattr(logging, args.log_level.upper())
    if args.ready_fd is not None:  # daemon child: log to a file in the cache dir
        os.makedirs(cfg.cache.dir, mode=0o700, exist_ok=True)
        logging.basicConfig(filename=os.path.join(cfg.cache.dir, "ossfuse.log"), level=level, format=_LOG_FORMAT)
    elif os.environ.get("JOURNAL_STREAM"):  # under systemd: journald reads "<N>" as the priority
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_JournalFormatter())
        logging.basicConfig(level=level, handlers=[handler])
    else:
        logging.basicConfig(stream=sys.stderr, level=level, format=_LOG_FORMAT)

    def on_ready():
        if args.ready_fd is not None:
            os.write(args.ready_fd, b"ready\n")
            os.close(args.ready_fd)

    try:
        return run(cfg, args.mountpoint, options, on_ready)
    except MountError as e:
        log.error("%s", e)
        if args.ready_fd is not None:
            os.write(args.ready_fd, f"{e}\n".encode())
            return 1
        return _die(str(e))


def _spawn_daemon(args, cfg) -> int:
    """Start the daemon in its own session and wait until it reports the mount usable."""
    r, w = os.pipe()
    os.makedirs(cfg.cache.dir, mode=0o700, exist_ok=True)
    cmd = [sys.executable, "-m", "ossfuse", "mount", "-f", "--ready-fd", str(w), "-c", cfg.path,
           "--log-level", args.log_level, args.mountpoint]
    for o in args.o or []:
        cmd += ["-o", o]
    with open(os.path.join(cfg.cache.dir, "ossfuse.log"), "ab") as logf:
        proc = subprocess.Popen(cmd, pass_fds=(w,), stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                start_new_session=True)
    os.close(w)
    with os.fdopen(r, "rb") as pipe:
        message = pipe.read().decode(errors="replace").strip()
    if message == "ready":
        return 0
    proc.wait()
    return _die(message or f"the daemon exited with status {proc.returncode}; see "
                f"{os.path.join(cfg.cache.dir, 'ossfuse.log')}")


def cmd_umount(args) -> int:
    mp = os.path.abspath(args.mountpoint)
    reg = read_registry(mp)
    if not os.path.ismount(mp):
        return _die(f"{mp} is not mounted")
    r = subprocess.run(["fusermount3", "-u", mp], capture_output=True, text=True)
    if r.returncode != 0:
        return _die((r.stderr.strip() or f"fusermount3 -u {mp} failed").replace("fusermount3: ", ""))
    if reg is None or reg.get("exited"):
        return 0
    pid = reg["pid"]
    deadline = time.monotonic() + args.timeout
    while process_alive(pid):  # the daemon finishes pending uploads after the unmount, then exits
        if time.monotonic() > deadline:
            return _die(f"unmounted, but the daemon (pid {pid}) is still uploading after "
                        f"{args.timeout:.0f}s; it goes on in the background")
        time.sleep(0.05)
    reg = read_registry(mp) or {}
    if reg.get("status") == EXIT_PENDING:
        print("ossfuse: unmounted; some uploads failed and stay journaled until the next mount "
              "(see the log in the cache dir)", file=sys.stderr)
        return EXIT_PENDING
    return 0


def cmd_status(args) -> int:
    from . import status
    from .daemon import registry_path
    mp = os.path.abspath(args.mountpoint)
    try:
        doc = status.query(registry_path(mp, ".sock"))
    except OSError:
        if not os.path.ismount(mp):
            return _die(f"{mp} is not a mount point")
        return _die(f"no ossfuse daemon answers for {mp} (not an ossfuse mount, or mounted by another user)")
    doc["mountpoint"] = mp
    print(json.dumps(doc, indent=2) if args.json else status.render(doc))
    return 0


def mount_helper(argv: list[str] | None = None) -> int:
    """``mount.fuse.ossfuse CONFIG MOUNTPOINT [-o opts] [-n] [-s] [-v]``, as mount(8) and
    fstab call it for type ``fuse.ossfuse``: the config file stands where a device would."""
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="mount.fuse.ossfuse")
    p.add_argument("config")
    p.add_argument("mountpoint")
    p.add_argument("-o", action="append")
    for flag in ("-n", "-s", "-v", "-f"):  # mount(8)'s no-mtab, sloppy, verbose, fake
        p.add_argument(flag, action="store_true")
    p.add_argument("-t", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    return main(["mount", "-c", args.config, args.mountpoint] + [x for o in args.o or [] for x in ("-o", o)])


def _tool_setup(args):
    """Config, keyring and store for the commands that work on the store directly."""
    from .daemon import credentials_for, open_store
    from .keyring import Keyring
    cfg = config_mod.load(args.config)
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="ossfuse: %(message)s")
    credentials = credentials_for(cfg)
    return cfg, Keyring(cfg.encryption, credentials), open_store(cfg, credentials)


def cmd_rekey(args) -> int:
    import trio
    from . import rekey
    try:
        cfg, keyring, store = _tool_setup(args)
    except (config_mod.ConfigError, MountError, OSError, ValueError, TypeError) as e:
        return _die(str(e))
    for name in (args.from_id, args.to_id):
        if name is not None and name not in keyring.cmks:
            return _die(f"{cfg.path}: no CMK with id {name!r}")

    async def run():
        total = 0
        if not args.dry_run:  # size the progress bar with a first, cheap listing pass
            async for o in rekey._all_objects(store, cfg.store.prefix + args.path.strip("/")):
                total += o.size
        update, close = rekey.progress_bar(total)
        try:
            return await rekey.rekey(cfg, store, keyring, path=args.path, from_id=args.from_id, to_id=args.to_id,
                                     dry_run=args.dry_run, progress=update)
        finally:
            close()

    summary = trio.run(run)
    print(summary.render(args.dry_run))
    return 1 if summary.failed else 0


def cmd_check(args) -> int:
    from . import rekey
    try:
        cfg, keyring, store = _tool_setup(args)
    except (config_mod.ConfigError, MountError, OSError, ValueError, TypeError) as e:
        return _die(str(e))
    results = rekey.check(cfg, keyring, store)
    for ok, line in results:
        print(("ok    " if ok else "FAIL  ") + line)
    return 0 if all(ok for ok, _ in results) else 1


def cmd_keygen(args) -> int:
    if args.bits < 2048:
        return _die(f"--bits {args.bits}: an RSA CMK needs at least 2048 bits")
    try:
        generate_rsa_cmk(args.path, args.bits)
    except FileExistsError as e:
        return _die(f"{e.filename}: already exists; not overwriting a CMK")
    except OSError as e:
        return _die(f"{args.path}: {e.strerror}")
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


def cmd_quickstart(args) -> int:
    """Create (once) a CMK, a config and a local bucket, then mount it."""
    root = os.geteuid() == 0
    etc = args.etc or ("/etc/ossfuse" if root else os.path.expanduser("~/.config/ossfuse"))
    var = args.var or ("/var/lib/ossfuse" if root else os.path.expanduser("~/.local/share/ossfuse"))
    cache = args.cache or ("/var/cache/ossfuse/default" if root else os.path.expanduser("~/.cache/ossfuse/default"))
    mp = os.path.abspath(args.mountpoint or ("/mnt/ossfuse" if root else os.path.expanduser("~/ossfuse")))
    bucket = os.path.join(var, "bucket")
    key = os.path.join(etc, "default.pem")
    conf = os.path.join(etc, "default.toml")
    os.makedirs(etc, mode=0o700, exist_ok=True)
    os.makedirs(bucket, mode=0o700, exist_ok=True)
    os.makedirs(mp, exist_ok=True)
    if not os.path.exists(key):
        generate_rsa_cmk(key)
        print(f"created CMK {key} (keep a copy: without it the files cannot be decrypted)")
    if not os.path.exists(conf):
        with open(conf, "w") as f:
            f.write(QUICKSTART_CONFIG.format(bucket=bucket, key=key, cache=cache))
        print(f"created config {conf}")
    if os.path.ismount(mp):
        with open("/proc/self/mounts") as f:
            fstype = next((line.split()[2] for line in f if line.split()[1] == mp), "")
        if fstype != "fuse.ossfuse":
            return _die(f"{mp}: something else ({fstype or 'unknown'}) is mounted there; pass another mount point")
        print(f"already mounted: {mp}")
    else:
        ns = argparse.Namespace(config=conf, mountpoint=mp, foreground=False, o=None, log_level="info",
                                ready_fd=None)
        status = cmd_mount(ns)
        if status:
            return status
    print(f"folder: {mp}\nbucket directory: {bucket}\nconfig: {conf}\n"
          f"unmount with: ossfuse umount {mp}\nmount again with: ossfuse mount -c {conf} {mp}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ossfuse", description="Mount an OSS bucket prefix with "
                                "client-side encryption compatible with the OSS SDKs.")
    from importlib.metadata import version
    p.add_argument("--version", action="version", version=f"ossfuse {version('ossfuse')}")
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("mount", help="mount a bucket prefix")
    m.add_argument("-c", "--config", required=True, help="TOML config file")
    m.add_argument("mountpoint")
    m.add_argument("-f", "--foreground", action="store_true", help="do not daemonize; log to stderr")
    m.add_argument("-o", action="append", metavar="OPT[,OPT...]", help="FUSE mount options (e.g. allow_other,ro)")
    m.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    m.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    m.set_defaults(fn=cmd_mount)

    u = sub.add_parser("umount", help="unmount, then wait until every pending upload is in the bucket")
    u.add_argument("mountpoint")
    u.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for uploads (default 3600)")
    u.set_defaults(fn=cmd_umount)

    st = sub.add_parser("status", help="pending uploads, cache use, recent errors, CMKs of a mount")
    st.add_argument("mountpoint")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.set_defaults(fn=cmd_status)

    r = sub.add_parser("rekey", help="re-wrap objects' data keys to another CMK (content untouched)")
    r.add_argument("-c", "--config", required=True)
    r.add_argument("--from", dest="from_id", metavar="ID", help="only objects wrapped by this CMK")
    r.add_argument("--to", dest="to_id", metavar="ID", help="target CMK (default: what the rules pick)")
    r.add_argument("--dry-run", action="store_true", help="say what would change, change nothing")
    r.add_argument("path", nargs="?", default="", help="directory under the mount's prefix (default: all)")
    r.set_defaults(fn=cmd_rekey)

    ch = sub.add_parser("check", help="prove every CMK wraps and unwraps, and the store answers")
    ch.add_argument("-c", "--config", required=True)
    ch.set_defaults(fn=cmd_check)

    k = sub.add_parser("keygen", help="write a new RSA CMK (PATH and PATH.pub)")
    k.add_argument("path")
    k.add_argument("--bits", type=int, default=3072)
    k.set_defaults(fn=cmd_keygen)

    q = sub.add_parser("quickstart", help="create a CMK, a config and a local bucket, and mount it")
    q.add_argument("mountpoint", nargs="?")
    q.add_argument("--etc", help=argparse.SUPPRESS)
    q.add_argument("--var", help=argparse.SUPPRESS)
    q.add_argument("--cache", help=argparse.SUPPRESS)
    q.set_defaults(fn=cmd_quickstart)

    args = p.parse_args(argv)
    try:
        return args.fn(args)
    except BrokenPipeError:  # e.g. `ossfuse status MNT | head -1`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
