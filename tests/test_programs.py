"""Everyday programs doing their real work in the mount (issue: editors, copy tools, git,
databases, appends, names, file managers), each checked after a remount with an emptied cache."""
from __future__ import annotations

import errno
import fcntl
import mmap
import contextlib
import os
import sqlite3
import stat
import subprocess
import time
import unicodedata

import pytest

from conftest import run_sync

pytestmark = pytest.mark.timeout(180)


def sh(cmd: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, shell=True, check=True, capture_output=True, text=True, **kw)


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


# -- editors ---------------------------------------------------------------------------------
@pytest.mark.parametrize("settings", ["", "set backup backupcopy=no", "set backup backupcopy=yes",
                                      "set nowritebackup backupcopy=auto"])
def test_vim_save_patterns_leave_only_the_file(mount, settings):
    p = mount.path("notes.txt")
    with open(p, "w") as f:
        f.write("line one\n")
    os.chmod(p, 0o640)
    # swap file, 4913 probe, backup file and rename-or-copy write, as vim does by default
    cmd = ["vim", "-N", "-u", "NONE", "-i", "NONE", "-Es",
           "-c", "set swapfile directory=.", "-c", settings or "set nobackup",
           "-c", "normal Goline two", "-c", "wq", p]
    r = subprocess.run(cmd, cwd=mount.mnt, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert read(p) == b"line one\nline two\n"
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o640
    mount.remount()
    assert read(p) == b"line one\nline two\n"
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o640
    assert os.listdir(mount.mnt) == ["notes.txt"]
    assert mount.keys() == ["notes.txt"]  # no swap, backup or 4913 left in the bucket


def test_nano_edits_and_saves(mount):
    p = mount.path("nano.txt")
    with open(p, "w") as f:
        f.write("first\n")
    session = f"ossfuse-nano-{os.getpid()}"
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "80", "-y", "24",
                    f"nano --ignorercfiles {p}"], check=True)
    try:
        time.sleep(0.5)
        subprocess.run(["tmux", "send-keys", "-t", session, "M-/", "second line", "Enter"], check=True)
        subprocess.run(["tmux", "send-keys", "-t", session, "C-o", "Enter"], check=True)
        time.sleep(0.5)
        subprocess.run(["tmux", "send-keys", "-t", session, "C-x"], check=True)
        for _ in range(50):
            if subprocess.run(["tmux", "has-session", "-t", session], capture_output=True).returncode:
                break
            time.sleep(0.1)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
    mount.remount()
    assert read(p).startswith(b"first\nsecond line")
    assert mount.keys() == ["nano.txt"]


def test_gui_editor_writes_temp_then_renames_over_the_open_file(mount):
    p = mount.path("doc.txt")
    with open(p, "wb") as f:
        f.write(b"version 1")
    mount.remount()
    reader = open(p, "rb")
    try:
        tmp = mount.path(".doc.txt.goutputstream-XYZ")
        with open(tmp, "wb") as f:
            f.write(b"version 2, longer")
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, p)
        assert reader.read() == b"version 1"
    finally:
        reader.close()
    assert read(p) == b"version 2, longer"
    mount.remount()
    assert read(p) == b"version 2, longer"
    assert mount.keys() == ["doc.txt"]


@pytest.mark.expect_log(r"WARNING ossfuse\.daemon: found \d+ journaled file",
                        r"WARNING ossfuse\.writeback\.journal: unsaved changes of '[^']*f' \(work file ",
                        r"WARNING ossfuse\.daemon: the unsaved changes of 1 file\(s\) left by an earlier run")
def test_a_program_started_by_a_writer_commits_the_file_as_a_close_does(make_mount):
    """A child process inherits the writer's descriptor at fork and closes it at exec (also a
    close-on-exec one): the kernel sends that close to the filesystem like any close of a
    duplicate, so what the file holds then is committed, as a close commits it, and survives
    a crash of the daemon (docs/semantics.md; NFS and ossfs commit at every close too)."""
    m = make_mount()
    fd = os.open(m.path("f"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, b"first half ")
        subprocess.run(["true"], check=True)
        os.write(fd, b"second half")  # no close after it: not committed
        m.kill9()
    finally:
        with contextlib.suppress(OSError):  # ENOTCONN: the daemon is gone
            os.close(fd)
    m.start()
    assert open(m.path("f"), "rb").read() == b"first half "


def test_libreoffice_style_lock_file(mount):
    lock = mount.path(".~lock.report.odt#")
    fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, b",user,host,30.11.2026 07:00,file:///;\n")
        os.lseek(fd, 0, os.SEEK_SET)
        assert os.read(fd, 100).startswith(b",user,host")
        with pytest.raises(FileExistsError):
            os.open(lock, os.O_CREAT | os.O_EXCL | os.O_RDWR)
        # another process sees the POSIX lock
        r = subprocess.run(["python3", "-c", f"import fcntl,os; fd=os.open({lock!r}, os.O_RDWR); "
                            "fcntl.lockf(fd, fcntl.LOCK_EX|fcntl.LOCK_NB)"], capture_output=True, text=True)
        assert r.returncode != 0 and ("Resource temporarily unavailable" in r.stderr or "denied" in r.stderr)
    finally:
        os.close(fd)
    os.unlink(lock)
    mount.remount()
    assert mount.keys() == [] and os.listdir(mount.mnt) == []


# -- copy tools ------------------------------------------------------------------------------
def _tree(root: str) -> None:
    os.makedirs(os.path.join(root, "a", "b"))
    for i in range(12):
        with open(os.path.join(root, "a" if i % 2 else "a/b", f"f{i}"), "wb") as f:
            f.write(os.urandom(i * 3000))
    os.chmod(os.path.join(root, "a", "f1"), 0o600)
    os.symlink("b/f0", os.path.join(root, "a", "link"))
    os.utime(os.path.join(root, "a", "f3"), ns=(1_400_000_000_000_000_000, 1_400_000_000_123_456_789))


def test_cp_a_rsync_and_tar_round_trips(mount, tmp_path):
    src = str(tmp_path / "src")
    _tree(src)
    sh(f"cp -a {src} {mount.path('cp')}")
    sh(f"rsync -a {src}/ {mount.path('rs')}/")
    mount.remount()
    for d in ("cp", "rs"):
        sh(f"diff -r {src} {mount.path(d)}")
        st_src, st_dst = os.lstat(os.path.join(src, "a", "f3")), os.lstat(mount.path(d, "a", "f3"))
        assert st_src.st_mtime_ns == st_dst.st_mtime_ns
        assert stat.S_IMODE(os.stat(mount.path(d, "a", "f1")).st_mode) == 0o600
    # a second rsync transfers nothing: sizes and mtimes match
    out = sh(f"rsync -a --stats {src}/ {mount.path('rs')}/").stdout
    assert "Number of regular files transferred: 0" in out
    # rsync --inplace rewrites part of a file in place
    f5 = os.path.join(src, "a", "f5")
    with open(f5, "r+b") as f:
        f.seek(100)
        f.write(b"CHANGED")
    # rsync's quick check compares whole seconds (--modify-window 0): a change in the second
    # the file was made looks unchanged, so move its mtime to a different second
    os.utime(f5, ns=(os.stat(f5).st_atime_ns, os.stat(f5).st_mtime_ns + 2_000_000_000))
    sh(f"rsync -a --inplace {src}/ {mount.path('rs')}/")
    mount.remount()
    assert read(mount.path("rs", "a", "f5")) == read(f5)
    # tar -x into the mount, tar -c out of it: contents, modes and mtimes survive
    sh(f"tar -C {src} -cf {tmp_path}/in.tar a")
    sh(f"mkdir {mount.path('tar')} && tar -C {mount.path('tar')} -xf {tmp_path}/in.tar")
    mount.remount()
    sh(f"tar -C {mount.path('tar')} -cf {tmp_path}/out.tar a")
    os.mkdir(tmp_path / "back")
    sh(f"tar -C {tmp_path}/back -xf {tmp_path}/out.tar")
    sh(f"diff -r {src}/a {tmp_path}/back/a")
    listing = sh(f"tar -tvf {tmp_path}/out.tar").stdout
    assert "a/link -> b/f0" in listing and "-rw-------" in listing


def test_mv_across_directories_and_in_and_out(mount, tmp_path):
    os.mkdir(mount.path("x"))
    os.mkdir(mount.path("y"))
    (tmp_path / "outside").write_bytes(b"from outside")
    sh(f"mv {tmp_path}/outside {mount.path('x')}/")
    sh(f"mv {mount.path('x', 'outside')} {mount.path('y', 'moved')}")
    with open(mount.path("x", "leaving"), "wb") as f:
        f.write(b"going out")
    sh(f"mv {mount.path('x', 'leaving')} {tmp_path}/left")
    sh(f"mv {mount.path('y')} {mount.path('x', 'y2')}")
    mount.remount()
    assert read(mount.path("x", "y2", "moved")) == b"from outside"
    assert (tmp_path / "left").read_bytes() == b"going out"
    assert sorted(mount.keys()) == ["x/", "x/y2/", "x/y2/moved"]


# -- git ---------------------------------------------------------------------------------------
def test_git_clone_commit_gc_fsck(mount, tmp_path):
    origin = tmp_path / "origin"
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@e", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@e", "HOME": str(tmp_path)}
    sh(f"git init -q {origin} && cp -a {os.path.dirname(__file__)}/../ossfuse {origin}/ "
       f"&& git -C {origin} add -A && git -C {origin} commit -qm first", env=env)
    repo = mount.path("repo")
    sh(f"git clone -q {origin} {repo}", env=env)
    with open(os.path.join(repo, "NEW"), "w") as f:
        f.write("new file\n")
    sh(f"git -C {repo} add NEW && git -C {repo} commit -qm second", env=env)
    assert sh(f"git -C {repo} status --porcelain", env=env).stdout == ""
    sh(f"git -C {repo} gc -q", env=env)
    # git compares mtimes in whole seconds: files changed in the second its index was written
    # are "racily clean", and a status re-reads them and writes the index. One second later
    # a status leaves an index no entry is racy against.
    time.sleep(1.1)
    assert sh(f"git -C {repo} status --porcelain", env=env).stdout == ""
    tracked = sh(f"git -C {repo} ls-files", env=env).stdout.split()
    inodes = {p: os.stat(os.path.join(repo, p)).st_ino for p in tracked}
    index = os.stat(os.path.join(repo, ".git", "index")).st_mtime_ns
    mount.remount()
    assert sh(f"git -C {repo} status --porcelain", env=env).stdout == ""
    # the files keep their inode numbers across mounts, so git trusts its index: it did not
    # read and hash every file again and write the index anew (it did with numbers per mount)
    assert {p: os.stat(os.path.join(repo, p)).st_ino for p in tracked} == inodes
    assert os.stat(os.path.join(repo, ".git", "index")).st_mtime_ns == index
    fsck = subprocess.run(f"git -C {repo} fsck --full --strict", shell=True, capture_output=True, text=True, env=env)
    assert fsck.returncode == 0, fsck.stderr
    assert sh(f"git -C {repo} log --format=%s", env=env).stdout.split() == ["second", "first"]


# -- databases, mmap and locks -----------------------------------------------------------------
@pytest.mark.parametrize("journal_mode", ["delete", "wal"])
def test_sqlite_survives_remount(mount, journal_mode):
    db = mount.path(f"{journal_mode}.db")
    con = sqlite3.connect(db)
    con.execute(f"PRAGMA journal_mode={journal_mode}")
    con.execute("CREATE TABLE t (i INTEGER, s TEXT)")
    for i in range(200):
        con.execute("INSERT INTO t VALUES (?, ?)", (i, "x" * (i % 50)))
        if i % 20 == 0:
            con.commit()
    con.commit()
    con.execute("DELETE FROM t WHERE i % 3 = 0")
    con.commit()
    con.close()
    mount.remount()
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert con.execute("SELECT count(*), sum(i) FROM t").fetchone() == (133, sum(i for i in range(200) if i % 3))
    con.close()


def test_shared_writable_mmap_is_flushed(mount):
    p = mount.path("mapped")
    with open(p, "wb") as f:
        f.write(bytes(64 * 1024))
    with open(p, "r+b") as f:
        m = mmap.mmap(f.fileno(), 0, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        m[1000:1005] = b"HELLO"
        m[60000:60003] = b"END"
        m.flush()
        m.close()
    mount.remount()
    data = read(p)
    assert data[1000:1005] == b"HELLO" and data[60000:60003] == b"END" and len(data) == 64 * 1024


def test_flock_and_fcntl_locks_between_processes(mount):
    p = mount.path("locked")
    with open(p, "wb") as f:
        f.write(b"x")
    probe = ("import fcntl,os,sys; fd=os.open(sys.argv[1], os.O_RDWR); "
             "getattr(fcntl, sys.argv[2])(fd, fcntl.LOCK_EX|fcntl.LOCK_NB)")
    with open(p, "r+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        assert subprocess.run(["python3", "-c", probe, p, "flock"], capture_output=True).returncode != 0
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        assert subprocess.run(["python3", "-c", probe, p, "flock"], capture_output=True).returncode == 0
        fcntl.lockf(f.fileno(), fcntl.LOCK_EX)
        assert subprocess.run(["python3", "-c", probe, p, "lockf"], capture_output=True).returncode != 0


# -- appends and sizes -------------------------------------------------------------------------
def test_appends_from_two_processes(mount):
    p = mount.path("shared.log")
    script = f"for i in $(seq 1 200); do echo \"$1 line $i\" >> {p}; done"
    procs = [subprocess.Popen(["bash", "-c", script, "-", tag]) for tag in ("A", "B")]
    assert [pr.wait(120) for pr in procs] == [0, 0]
    mount.remount()
    lines = read(p).decode().splitlines()
    assert len(lines) == 400
    assert sorted(lines) == sorted([f"{t} line {i}" for t in "AB" for i in range(1, 201)])


def test_stat_size_and_mtime_while_writing_and_after_fsync(mount):
    p = mount.path("growing")
    with open(p, "wb") as f:
        f.write(b"a" * 1000)
        f.flush()
        assert os.stat(p).st_size == 1000
        t0 = os.stat(p).st_mtime_ns
        time.sleep(0.05)
        f.write(b"b" * 500)
        f.flush()
        st = os.stat(p)
        assert st.st_size == 1500 and st.st_mtime_ns > t0
        os.fsync(f.fileno())
        assert mount.head("growing").size == 1500
        assert os.stat(p).st_size == 1500
    mtime = os.stat(p).st_mtime_ns
    mount.remount()
    st = os.stat(p)
    assert (st.st_size, st.st_mtime_ns) == (1500, mtime)


# -- names ---------------------------------------------------------------------------------------
NAMES = ["with space", "100%", "a+b", "#hash", "semi;colon", "quote'\"", "new\nline",
         unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café"), "日本語",
         "é" * 127, "x" * 255]


def test_names_are_kept_byte_exact(mount):
    for n in NAMES:
        with open(mount.path(n), "wb") as f:
            f.write(n.encode())
    mount.remount()
    assert sorted(os.listdir(mount.mnt)) == sorted(NAMES)
    for n in NAMES:
        assert read(mount.path(n)) == n.encode()
    assert set(mount.keys()) == set(NAMES)
    with pytest.raises(OSError) as e:
        open(mount.path("y" * 256), "wb")
    assert e.value.errno == errno.ENAMETOOLONG
    # a name that is not UTF-8: no such file (a lookup), and creating it is EINVAL with one line
    # saying why (a new-user trial: EINVAL, and nothing in the log)
    bad = os.fsencode(mount.mnt) + b"/bad\xff"
    with pytest.raises(FileNotFoundError):
        os.stat(bad)
    for make in (lambda: open(bad, "wb"), lambda: os.mkdir(bad)):
        with pytest.raises(OSError) as e:
            make()
        assert e.value.errno == errno.EINVAL
    said = [line for line in mount.log().splitlines() if "not UTF-8" in line]
    assert len(said) == 2 and all("b'bad\\xff': EINVAL: the name is not UTF-8, and OSS object keys are" in line
                                  for line in said), said


def test_deep_paths_up_to_the_key_limit(mount):
    parts = ["d" * 200] * 4  # 4 * 201 bytes of directories
    deep = mount.path(*parts)
    os.makedirs(deep)
    name_ok = "f" * (1023 - 4 * 201)
    with open(os.path.join(deep, name_ok), "wb") as f:
        f.write(b"deep")
    with pytest.raises(OSError) as e:
        open(os.path.join(deep, name_ok + "x"), "wb")
    assert e.value.errno == errno.ENAMETOOLONG
    mount.remount()
    assert read(os.path.join(deep, name_ok)) == b"deep"


@pytest.mark.expect_log(r"ossfuse\.fs\.objmeta:", r"ossfuse\.fs\.readdir: skipping key")
def test_keys_other_tools_write_never_break_listings(mount):
    s = mount.store
    for key, data in [("a//b", b"1"), ("x/../y", b"2"), ("k/", b"data in a dir marker"),
                      ("new\nline", b"3"), ("ok", b"4"), ("./dot", b"5"), ("w1/.", b"6"), ("w1/./x", b"7")]:
        run_sync(s.put_bytes, key, data, {})
    time.sleep(0.6)
    names = sorted(os.listdir(mount.mnt))
    assert names == sorted(["a", "x", "k", "new\nline", "ok", "w1"])
    assert os.listdir(mount.path("w1")) == []  # "." is not a name (skipped, said once; a trial: also
    # called "both an object and a prefix; showing the object", which it did not show)
    assert os.listdir(mount.path("a")) == []  # "" is not a name
    assert os.listdir(mount.path("x")) == []  # ".." is not a name
    assert stat.S_ISDIR(os.stat(mount.path("k")).st_mode)
    assert read(mount.path("new\nline")) == b"3"
    sh(f"find {mount.mnt} && ls -lR {mount.mnt} && du -s {mount.mnt}")
    log = mount.log()
    assert "not a valid file name" in log and "directory marker holding" in log
    assert "skipping key 'w1/.'" in log and "both an object and a prefix" not in log
    for name in os.listdir(mount.cache):  # cache entries are hashes, never paths from keys
        assert name in ("objects", "staging", "unlinked", "multipart", "renames", "lock", "ossfuse.log", "local-bucket", "bucket", "indoubt.log",
                        "datakeys.sqlite", "datakeys.sqlite-wal", "datakeys.sqlite-shm",
                        "attrs.sqlite", "attrs.sqlite-wal", "attrs.sqlite-shm")


# -- file managers ---------------------------------------------------------------------------------
def test_find_du_ls_over_a_deep_tree(mount, tmp_path):
    src = tmp_path / "tree"
    for i in range(6):
        d = src.joinpath(*[f"level{j}" for j in range(i + 1)])
        d.mkdir(parents=True)
        for k in range(5):
            (d / f"file{k}").write_bytes(os.urandom(1000 + k))
    sh(f"cp -a {src} {mount.path('tree')}")
    mount.remount()
    found = sh(f"cd {mount.mnt} && find tree | sort").stdout
    expected = sh(f"cd {tmp_path} && find tree | sort").stdout
    assert found == expected
    assert len(sh(f"ls -lR {mount.path('tree')}").stdout.splitlines()) > 40
    du = int(sh(f"du -sb --apparent-size {mount.path('tree')}").stdout.split()[0])
    assert du >= sum(1000 + k for k in range(5)) * 6


def test_fallocate_is_eopnotsupp_and_posix_fallocate_falls_back(mount):
    """fallocate(2) (any mode) is refused with EOPNOTSUPP, the file untouched; glibc's
    posix_fallocate then writes the range itself, so the file grows to the asked length and
    the bytes it added read as zeros."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
    p = mount.path("alloc")
    with open(p, "wb") as f:
        f.write(b"abc")
    fd = os.open(p, os.O_RDWR)
    try:
        for mode in (0, 1):  # 0: allocate and extend; 1: FALLOC_FL_KEEP_SIZE
            assert libc.fallocate(fd, mode, 0, 8192) == -1
            assert ctypes.get_errno() == errno.EOPNOTSUPP
        assert os.fstat(fd).st_size == 3
        os.posix_fallocate(fd, 0, 5000)
        assert os.fstat(fd).st_size == 5000
    finally:
        os.close(fd)
    with open(p, "rb") as f:
        assert f.read() == b"abc" + bytes(4997)


def test_xattrs_are_refused_with_enotsup_consistently(mount):
    p = mount.path("x")
    with open(p, "wb") as f:
        f.write(b"x")
    for call in (lambda: os.setxattr(p, "user.comment", b"v"), lambda: os.getxattr(p, "user.comment"),
                 lambda: os.listxattr(p), lambda: os.removexattr(p, "user.comment"),
                 lambda: os.setxattr(p, "user.comment", b"v")):
        with pytest.raises(OSError) as e:
            call()
        assert e.value.errno == errno.ENOTSUP
    r = subprocess.run(["setfattr", "-n", "user.k", "-v", "v", p], capture_output=True, text=True)
    assert r.returncode != 0 and "not supported" in r.stderr.lower()
