"""What an operator sees (issue 16): byte progress of uploads in ``ossfuse status``, the
Prometheus metrics of ``status --prometheus`` (parsed with prometheus_client's own parser), the
store's operation counters, rekey's progress lines when stderr is no terminal, and
``ossfuse check`` printing each failure once."""
from __future__ import annotations

import logging
import os
import signal
import time

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from ossfuse import status
from ossfuse.config import CacheConfig, CmkConfig, Config, EncryptionConfig, MountConfig, StoreConfig
from ossfuse.fs import Filesystem
from ossfuse.keyring import Keyring
from ossfuse.store.local import LocalStore

from conftest import Mount, local_config, run_cli
from fakes.core import core_filesystem
from fakes.fault_store import FaultStore

PART = 100 * 1024  # the smallest part size a multipart upload takes (bytes)


def _filesystem(tmp_path, cmk_path, store) -> Filesystem:
    return core_filesystem(tmp_path, cmk_path, store=store, multipart_threshold=PART, part_size=PART, part_workers=1)


def _slow_multipart_store(tmp_path) -> FaultStore:
    os.makedirs(tmp_path / "bucket", mode=0o700, exist_ok=True)
    store = FaultStore(LocalStore(str(tmp_path / "bucket")))
    store.local_disk = False  # take the multipart path of an OSS bucket
    store.delay("upload_part", 0.3)
    return store


def test_status_shows_bytes_uploaded_of_a_slowed_upload(tmp_path, cmk_path):
    """A 5-part upload with 0.3 s per part: status shows its bytes in the store growing part by
    part, then the upload gone and the counters of what the store was asked."""
    size = 5 * PART

    async def main():
        store = _slow_multipart_store(tmp_path)
        fs = _filesystem(tmp_path, cmk_path, store)
        errors = status.RecentErrors()
        seen: list[int] = []
        async with trio.open_nursery() as nursery:
            fs._nursery = nursery
            nursery.start_soon(fs.upload_worker)
            root = fs.get(1)
            node, h = await fs.create(root, "big", 0o644, os.O_WRONLY, 1, 2)
            await fs.write(h, 0, os.urandom(size))
            await fs.flush(h)
            await fs.release(h)
            with trio.fail_after(20):
                while fs.stats["uploaded"] == 0:
                    doc = status.collect(fs, errors, started=0.0)
                    for u in doc["pending_uploads"]["uploading"]:
                        assert u["key"] == "pre/big" and u["bytes_total"] >= size
                        assert doc["pending_uploads"]["bytes_uploaded"] == u["bytes_done"]
                        seen.append(u["bytes_done"])
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
        # seen: 0, then whole parts, growing, never past the total
        assert seen == sorted(seen) and seen[0] == 0
        done = sorted(set(seen))
        assert len(done) >= 4 and all(d % PART == 0 for d in done[:-1]), done
        doc = status.collect(fs, errors, started=0.0)
        assert doc["pending_uploads"]["uploading"] == [] and doc["pending_uploads"]["bytes_uploaded"] == 0
        ops = doc["store_ops"]
        assert ops["calls"]["upload_part"] == 5 and ops["calls"]["create_multipart"] == 1
        assert ops["calls"]["complete_multipart"] == 1
        assert size <= ops["bytes_sent"] < size + 16 * 5  # the ciphertext (plus nothing else)
        text = status.render(dict(doc, mountpoint="/m"))
        assert f"{sum(ops['calls'].values())} operations, {ops['bytes_sent']} bytes sent" in text
        fs.close()

    trio.run(main)


@pytest.mark.expect_log(r"WARNING ossfuse.fs.readdir: skipping key 'pre/x{300}': not a valid file name",
                        r"ERROR test: an error after the warning")
def test_status_keeps_recent_warnings_apart_from_errors(tmp_path, cmk_path):
    """A name listings have to skip (a 300-byte key: no valid file name) is one WARNING, not one
    per listing (they flooded the recent warnings); status shows it under recent warnings
    (document, text and Prometheus gauge), not as "recent errors: none" alone, and an ERROR
    logged afterwards is listed under errors only."""
    errors = status.RecentErrors()
    logging.getLogger().addHandler(errors)  # as the daemon does
    try:
        async def main():
            os.makedirs(tmp_path / "bucket", mode=0o700, exist_ok=True)
            store = LocalStore(str(tmp_path / "bucket"))
            await store.put_bytes("pre/" + "x" * 300, b"", {})
            fs = _filesystem(tmp_path, cmk_path, store)
            for _ in range(3):  # every listing skips it, one line says so
                h = fs.opendir(fs.get(1))
                assert [e[1] for e in await fs.readdir_entries(h, 0)] == []
                fs.releasedir(h.fh)
            assert store.counters.calls["list"] == 3
            doc = status.collect(fs, errors, started=0.0)
            logging.getLogger("test").error("an error after the warning")
            doc2 = status.collect(fs, errors, started=0.0)
            fs.close()
            return doc, doc2

        doc, doc2 = trio.run(main)
    finally:
        logging.getLogger().removeHandler(errors)
    skipped = f"skipping key 'pre/{'x' * 300}': not a valid file name"
    assert [w["message"] for w in doc["recent_warnings"]] == [skipped] and doc["recent_errors"] == []
    text = status.render(dict(doc, mountpoint="/m"))
    assert "recent errors:    none" in text and "recent warnings:\n  " in text and skipped in text
    assert _metrics(status.prometheus(dict(doc, mountpoint="/m")))["ossfuse_recent_warnings"] == {
        (("mountpoint", "/m"),): 1.0}
    assert [e["message"] for e in doc2["recent_errors"]] == ["an error after the warning"]
    assert [w["message"] for w in doc2["recent_warnings"]] == [skipped]


def test_render_shows_upload_progress():
    doc = {"store": "local:///b", "prefix": "", "uptime_seconds": 3, "state": "serving",
           "pending_uploads": {"count": 1, "bytes": 400, "oldest_seconds": 2, "failing": [],
                               "uploading": [{"key": "pre/big", "bytes_done": 100, "bytes_total": 400}],
                               "bytes_uploaded": 100},
           "cache": {"dir": "/c", "bytes": 0, "max_bytes": 10, "staging_bytes": 400, "hits": 3, "misses": 1,
                     "hit_ratio": 0.75},
           "store_ops": {"calls": {"put_file": 2}, "retries": {}, "errors": [], "bytes_sent": 9,
                         "bytes_received": 0},
           "cmks": [], "rules": [], "counters": {"uploaded": 1, "upload_failures": 0, "recovered": 0},
           "recent_errors": []}
    text = status.render(doc)
    assert "pre/big: 100 of 400 bytes (25%)" in text
    assert "hit rate 75%" in text
    assert "pending uploads:  1 file(s), 400 bytes, the oldest first changed 2 s ago (open files included)" in text
    assert "2 operations, 9 bytes sent, 0 received, 0 error(s), 0 retries" in text
    assert "refused as asked" not in text
    # a conditional request refused is how another client's change shows, not an error (a trial:
    # "28295 error(s)" after two mounts' editors raced over one file, every one of them such)
    doc["store_ops"]["errors"] = [{"op": "copy", "kind": "PreconditionFailed", "count": 5},
                                  {"op": "put_file", "kind": "FileAlreadyExists", "count": 2},
                                  {"op": "put_file", "kind": "DestinationChanged", "count": 4},
                                  {"op": "get_range", "kind": "NoSuchKey", "count": 1},
                                  {"op": "head", "kind": "ServiceUnavailable", "count": 3}]
    text = status.render(doc)
    assert ("0 received, 3 error(s), 0 retries; 12 refused as asked (a version check, create-only, or a missing "
            "key: what another client's change looks like)") in text


def test_names_holding_newlines_or_escapes_stay_on_their_line_in_status_check_and_rekey():
    """A trial: a conflict copy named ``evil\\n  2026-12-06 fake line\\x1b[2J`` forged an output line
    of ``check --verify`` and ``rekey --dry-run`` and sent ESC to the terminal; ``status``
    escaped the ESC, not the newline. Every such name is now one line, its controls escaped."""
    from ossfuse import rekey
    evil = "pre/evil\n  2026-12-06 fake line\x1b[2J\t.txt"
    shown = "pre/evil\\n  2026-12-06 fake line\\x1b[2J\\t.txt"
    verify = rekey.VerifySummary(failed=[f"{evil} (ETag E): block 0 fails"], plaintext=1, plaintext_keys=[evil])
    rk = rekey.RekeySummary(failed=[f"{evil}: boom"], damaged=[f"{evil} (ETag E): bad"])
    rk.readers_after["main"] = [evil]
    doc = {"store": "local:///b", "prefix": "", "uptime_seconds": 3, "state": "serving",
           "pending_uploads": {"count": 2, "bytes": 8, "oldest_seconds": 0, "failing": [evil],
                               "uploading": [{"key": evil, "bytes_done": 1, "bytes_total": 4}],
                               "bytes_uploaded": 1},
           "cache": {"dir": "/c", "bytes": 0, "max_bytes": 10, "staging_bytes": 0, "hits": 0, "misses": 0,
                     "hit_ratio": None},
           "store_ops": {"calls": {}, "retries": {}, "errors": [], "bytes_sent": 0, "bytes_received": 0},
           "cmks": [], "rules": [], "counters": {"uploaded": 0, "upload_failures": 0, "recovered": 0},
           "conflicts": {"count": 1, "recent": [evil]},
           "recent_errors": [{"time": 0, "message": f"cannot read {evil}"}]}
    doc["cmks"] = [{"id": "big", "type": "RsaCmk", "wrap_alg": "RSA/NONE/OAEPWithSHA-1AndMGF1Padding",
                    "matdesc": {"big": "A" * 6500}, "encrypts_new_objects": True}]
    cmk_line = next(line for line in status.render(doc).splitlines() if line.startswith("CMK:"))
    assert len(cmk_line) < 300 and "… (6511 characters; --json has it whole)" in cmk_line, cmk_line  # (trial AA)
    for text in (verify.render(), rk.render(False), rk.render(True), status.render(doc)):
        assert "\x1b" not in text and "fake line" in text
        assert not any(line.startswith("  2026-12-06 fake line") for line in text.splitlines()), text
        assert shown in text or repr(evil).strip("'") in text, text


def test_a_process_name_holding_a_newline_stays_on_the_line_that_names_it():
    """A trial: a program named ``sl\\neep`` holding a file split ``ossfuse umount``'s refusal in
    two lines. Command names read from /proc are escaped as object names are."""
    import subprocess
    import sys

    from ossfuse.registry import _comm
    p = subprocess.Popen([sys.executable, "-c", "import ctypes, sys, time; ctypes.CDLL(None).prctl(15, b'sl\\neep\\x1b[2J'); "
                          "print('named', flush=True); time.sleep(30)"], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline() == "named\n"
        assert _comm(p.pid) == "sl\\neep\\x1b[2J"
    finally:
        p.kill()
        p.wait()


def _metrics(text: str) -> dict[str, dict[tuple, float]]:
    """family name → {(sorted label items): value} from the text format, via prometheus_client."""
    out: dict[str, dict[tuple, float]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def test_prometheus_text_parses_and_carries_the_status(tmp_path, cmk_path):
    """The exposition text of a real status document, read back with prometheus_client's parser:
    every value the document has, each sample labelled with the mount point (quotes and
    backslashes in it escaped), errors by operation and kind."""
    from ossfuse.store.base import StoreError

    async def main():
        store = _slow_multipart_store(tmp_path)
        store.fail("head", key="pre/nope", error="permanent")
        fs = _filesystem(tmp_path, cmk_path, store)
        async with trio.open_nursery() as nursery:
            fs._nursery = nursery
            nursery.start_soon(fs.upload_worker)
            root = fs.get(1)
            node, h = await fs.create(root, "small", 0o644, os.O_WRONLY, 1, 2)
            await fs.write(h, 0, b"x" * 1000)
            await fs.flush(h)
            await fs.release(h)
            with trio.fail_after(10):
                while fs.stats["uploaded"] == 0:
                    await trio.sleep(0.02)
            nursery.cancel_scope.cancel()
        with pytest.raises(StoreError):
            await fs.store.head("pre/nope")
        h = await fs.open(node, os.O_RDONLY)
        assert await fs.read(h, 0, 1000) == b"x" * 1000
        await fs.release(h)
        doc = status.collect(fs, status.RecentErrors(), started=0.0)
        fs.close()
        return doc

    doc = trio.run(main)
    mp = '/mnt/we"ird\\dir'
    doc["mountpoint"] = mp
    text = status.prometheus(doc)
    m = _metrics(text)
    lab = (("mountpoint", mp),)
    assert m["ossfuse_up"][lab] == 1 and m["ossfuse_draining"][lab] == 0
    assert m["ossfuse_pending_uploads"][lab] == 0 and m["ossfuse_pending_upload_bytes"][lab] == 0
    assert m["ossfuse_uploads_total"][lab] == 1
    assert m["ossfuse_store_sent_bytes_total"][lab] == doc["store_ops"]["bytes_sent"] >= 1000
    assert m["ossfuse_store_received_bytes_total"][lab] == doc["store_ops"]["bytes_received"]
    assert m["ossfuse_store_operations_total"][(("mountpoint", mp), ("op", "put_file"))] == 1
    assert m["ossfuse_store_errors_total"][(("kind", "InjectedPermanent"), ("mountpoint", mp), ("op", "head"))] == 1
    c = doc["cache"]
    assert m["ossfuse_cache_bytes"][lab] == c["bytes"] and m["ossfuse_cache_max_bytes"][lab] == c["max_bytes"]
    assert m["ossfuse_cache_hits_total"][lab] + m["ossfuse_cache_misses_total"][lab] == c["hits"] + c["misses"] > 0
    assert m["ossfuse_cache_hit_ratio"][lab] == c["hit_ratio"]
    families = {f.name: f.type for f in text_string_to_metric_families(text)}
    assert text.endswith("\n") and text.count("# TYPE ") == len(families) >= 20
    assert families["ossfuse_store_retries"] == "counter" and families["ossfuse_pending_uploads"] == "gauge"
    assert m["ossfuse_quarantined_journal_entries"][lab] == 0
    # the README lists every family by its exposed name (a counter's with its _total)
    readme = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")).read()
    exposed = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}
    assert sorted(n for n in exposed if f"`{n}`" not in readme and f"`{n}{{" not in readme) == []


def test_status_prometheus_flag_of_the_command(tmp_path):
    r = run_cli("status", "--json", "--prometheus", str(tmp_path))
    assert r.returncode == 2 and "not allowed with" in r.stderr
    r = run_cli("status", "--help")
    assert "--prometheus" in r.stdout and "textfile" in r.stdout


def test_prometheus_reports_a_dead_or_absent_daemon_as_down(tmp_path, cmk_path):
    """With a textfile collector the file must change when the daemon dies: ``--prometheus``
    then prints ``ossfuse_up`` 0 alone (parsed by prometheus_client), says why on stderr and
    exits 0 (the README's cron line moves the file only on success). Before, it printed
    nothing and exited 1, so the file kept the last answer's ``ossfuse_up 1`` for ever."""
    m = Mount(str(tmp_path / "m"), cmk_path)
    m.start()
    try:
        r = run_cli("status", "--prometheus", m.mnt)
        assert r.returncode == 0 and _metrics(r.stdout)["ossfuse_up"] == {(("mountpoint", m.mnt),): 1.0}
        os.kill(m.pid, signal.SIGKILL)
        while os.path.ismount(m.mnt):
            time.sleep(0.01)
        r = run_cli("status", "--prometheus", m.mnt)
        assert r.returncode == 0 and _metrics(r.stdout) == {"ossfuse_up": {(("mountpoint", m.mnt),): 0.0}}
        assert "no ossfuse daemon answers" in r.stderr and r.stderr.count("\n") == 1
    finally:
        m.cleanup()
    r = run_cli("status", "--prometheus", str(tmp_path))  # nothing mounted there
    assert r.returncode == 0 and _metrics(r.stdout) == {"ossfuse_up": {(("mountpoint", str(tmp_path)),): 0.0}}
    r = run_cli("status", str(tmp_path))  # the other forms still fail
    assert r.returncode == 1 and "is not a mount point" in r.stderr and r.stdout == ""


# --------------------------------------------------------------------------------- rekey


def test_rekey_progress_lines_and_directory_markers(tmp_path, cmk_path, other_cmk_path):
    """Without a terminal, rekey writes progress lines (here only the last, the run is short)
    with objects and bytes of the totals; a directory marker is counted apart from objects
    that are not encrypted."""
    from ossfuse import config as config_mod
    os.makedirs(tmp_path / "bucket", mode=0o700)
    path = local_config(tmp_path, {"k": cmk_path, "k2": other_cmk_path}, matdesc={"k2": {"who": "k2"}})
    cfg = config_mod.load(path)
    sizes = {"a": 1000, "b": 20_000}

    async def write():
        store = LocalStore(str(tmp_path / "bucket"))
        fs = Filesystem(cfg, store, Keyring(cfg.encryption), uid=1, gid=2)
        root = fs.get(1)
        d = await fs.mkdir(root, "d", 0o755, 1, 2)
        for name, n in sizes.items():
            node, h = await fs.create(d, name, 0o644, os.O_WRONLY, 1, 2)
            await fs.write(h, 0, b"z" * n)
            await fs.flush(h)
            await fs.release(h)
        await store.put_bytes("d/plain", b"not encrypted", {})
        assert fs.dirty == set()
        fs.close()

    trio.run(write)
    r = run_cli("rekey", "-c", path, "--to", "k2", "d", timeout=120,
                env={k: v for k, v in os.environ.items() if k != "OSSFUSE_PROGRESS"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "changed: 2 object(s)" in r.stdout
    assert "skipped, not encrypted: 1" in r.stdout and "skipped, directory markers: 1" in r.stdout, r.stdout
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("rekey: ")]
    assert lines and lines[-1].startswith("rekey: 4 of 4 objects, ") and lines[-1].endswith("(100%)"), r.stderr
    assert "\r" not in r.stderr  # no progress bar redraws in a log


def test_rekey_progress_writes_a_line_every_interval():
    import io
    now = [0.0]
    out = io.StringIO()
    p = __import__("ossfuse.rekey", fromlist=["PassProgress"]).PassProgress(
        10, 10 << 20, stream=out, interval=5.0, tty=False, clock=lambda: now[0])
    for _ in range(4):
        now[0] += 2.0
        p.update(1 << 20)
    p.close()
    assert out.getvalue().splitlines() == ["rekey: 3 of 10 objects, 3.0 MiB of 10.0 MiB (30%)",
                                          "rekey: 4 of 10 objects, 4.0 MiB of 10.0 MiB (40%)"]
    dry = __import__("ossfuse.rekey", fromlist=["PassProgress"]).PassProgress(None, None, stream=out, tty=False)
    dry.update(5)
    assert dry.line() == "rekey: 1 objects, 5 B done"
    dry = __import__("ossfuse.rekey", fromlist=["PassProgress"]).PassProgress(None, None, stream=out, tty=False,
                                                                               dry_run=True)
    dry.update(5)  # trial X: a dry run's last line said "done"
    assert dry.line() == "rekey --dry-run: 1 objects, 5 B looked at, nothing changed"
    verify = __import__("ossfuse.rekey", fromlist=["PassProgress"]).PassProgress(2, 10, stream=out, tty=False,
                                                                                  label="check --verify")
    verify.update(5)  # trial AC: a long verify said nothing until it ended
    assert verify.line() == "check --verify: 1 of 2 objects, 5 B of 10 B (50%)"


# --------------------------------------------------------------------------------- check
def test_check_prints_each_failure_once(tmp_path, cmk_path):
    """A store that refuses connections: one FAIL line naming it, nothing else on stderr."""
    path = tmp_path / "c.toml"
    path.write_text(f'[store]\nurl = "oss://bkt"\nendpoint = "http://127.0.0.1:1"\nregion = "cn-hangzhou"\n'
                    f'retries = 0\n[encryption]\nencrypt_with = "k"\n[[encryption.cmk]]\nid = "k"\ntype = "rsa"\n'
                    f'private_key = "{cmk_path}"\n[cache]\ndir = "{tmp_path}/cache"\n')
    env = dict(os.environ, OSS_ACCESS_KEY_ID="id", OSS_ACCESS_KEY_SECRET="secret")
    r = run_cli("check", "-c", str(path), env=env)
    assert r.returncode == 1
    assert r.stderr == ""
    fails = [ln for ln in r.stdout.splitlines() if ln.startswith("FAIL")]
    assert fails == ["FAIL  store oss://bkt does not answer: OSS ListObjects '': cannot connect to "
                     "http://127.0.0.1:1: connection refused"], r.stdout
    assert r.stdout.count("connection refused") == 1
    r = run_cli("check", "-c", str(path), "--verify", env=env)  # a store that does not answer: said, not run
    assert r.returncode == 1 and r.stdout.splitlines()[-1] == "--verify was not run: fix the failures above first", r.stdout

    # a credentials file others may read: the store was never asked, and the line says why
    # (it said "does not answer")
    creds = tmp_path / "creds.toml"
    creds.write_text('access_key_id = "id"\naccess_key_secret = "secret"\n')
    creds.chmod(0o644)
    path.write_text(path.read_text().replace("retries = 0\n", f'retries = 0\ncredentials_file = "{creds}"\n'))
    r = run_cli("check", "-c", str(path))
    assert r.returncode == 1 and r.stderr == "", r.stderr
    fails = [ln for ln in r.stdout.splitlines() if ln.startswith("FAIL")]
    assert fails == [f"FAIL  store oss://bkt: no usable credentials: credentials file {creds} has mode 0644: refusing "
                     f"to use it because group or others may read it; it must be 0600 or stricter (run: chmod 600 "
                     f"{creds})"], r.stdout


def test_check_of_a_store_that_answers_with_errors_says_it_fails(tmp_path, cmk_path, oss_server):
    """A trial: a store answering HTTP 503 was "does not answer", though an answer is an
    answer (it is reachable: docs/semantics.md); it "fails", with the error."""
    from conftest import AK, BUCKET, REGION, SK
    path = tmp_path / "c.toml"
    path.write_text(f'[store]\nurl = "oss://{BUCKET}"\nendpoint = "{oss_server.endpoint}"\nregion = "{REGION}"\n'
                    f'retries = 0\n[encryption]\nencrypt_with = "k"\n[[encryption.cmk]]\nid = "k"\ntype = "rsa"\n'
                    f'private_key = "{cmk_path}"\n[cache]\ndir = "{tmp_path}/cache"\n')
    oss_server.faults.add(status=503, count=None)
    r = run_cli("check", "-c", str(path), env=dict(os.environ, OSS_ACCESS_KEY_ID=AK, OSS_ACCESS_KEY_SECRET=SK))
    fails = [ln for ln in r.stdout.splitlines() if ln.startswith("FAIL")]
    assert r.returncode == 1 and len(fails) == 1, r.stdout
    assert fails[0].startswith(f"FAIL  store oss://{BUCKET} fails: OSS ListObjects '': HTTP 503"), fails


# ------------------------------------------------------------------ errno of a wrong CMK
@pytest.mark.expect_log(r"ossfuse\.fs\.files: cannot open")
def test_wrong_cmk_is_eio_and_no_cmk_is_eacces_as_documented(tmp_path, cmk_path, other_cmk_path, caplog):
    """No CMK of this configuration matches the object (wrap-alg, matdesc): EACCES. The CMK that
    matches cannot unwrap the data key (a wrong key, or a damaged key header: an RSA CMK cannot
    tell them apart): EIO. Each with one log line naming the object; README and
    docs/semantics.md say the same."""
    import errno

    from ossfuse.fs import FsError
    os.makedirs(tmp_path / "bucket", mode=0o700)

    def cfg_with(cmk: CmkConfig) -> Config:
        return Config(path=str(tmp_path / "c.toml"), store=StoreConfig(url=f"local://{tmp_path / 'bucket'}"),
                      encryption=EncryptionConfig(encrypt_with=cmk.id, cmks=(cmk,)),
                      cache=CacheConfig(dir=str(tmp_path / f"cache-{cmk.id}")), mount=MountConfig(upload_delay=0.0))

    async def write(cfg: Config, name: str):
        fs = Filesystem(cfg, LocalStore(str(tmp_path / "bucket")), Keyring(cfg.encryption), uid=1, gid=2)
        node, h = await fs.create(fs.get(1), name, 0o644, os.O_WRONLY, 1, 2)
        await fs.write(h, 0, b"secret")
        await fs.flush(h)
        await fs.release(h)
        fs.close()

    async def read_errno(fs: Filesystem, name: str) -> int:
        try:
            node = await fs.lookup(fs.get(1), name)
            h = await fs.open(node, os.O_RDONLY)
            await fs.read(h, 0, 100)
        except FsError as e:
            return e.errno
        raise AssertionError(f"{name} was read")

    async def main():
        await write(cfg_with(CmkConfig("stranger", "rsa", other_cmk_path)), "wrong-key")
        await write(cfg_with(CmkConfig("dept", "rsa", other_cmk_path, matdesc={"dept": "unknown"})), "no-cmk")
        reader = cfg_with(CmkConfig("k", "rsa", cmk_path))
        fs = Filesystem(reader, LocalStore(str(tmp_path / "bucket")), Keyring(reader.encryption), uid=1, gid=2)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert await read_errno(fs, "wrong-key") == errno.EIO
            assert await read_errno(fs, "no-cmk") == errno.EACCES
        fs.close()
        return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]

    messages = trio.run(main)
    wrong = [m for m in messages if "'wrong-key'" in m]
    nocmk = [m for m in messages if "'no-cmk'" in m]
    assert len(wrong) == 1 and "cannot unwrap" in wrong[0], messages
    assert len(nocmk) == 1 and '{"dept":"unknown"}' in nocmk[0], messages
    assert "CMK 'k'" in wrong[0]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    readme = " ".join(open(os.path.join(root, "README.md")).read().split())
    semantics = " ".join(open(os.path.join(root, "docs", "semantics.md")).read().split())
    assert "No match: `EACCES`" in readme and "cannot unwrap the data key" in readme
    assert "(a wrong CMK, or a damaged key header): `EIO`" in readme
    assert "Unknown matdesc: `EACCES`; a CMK that cannot unwrap: `EIO`" in semantics


def test_status_says_where_the_log_goes_under_systemd_and_in_the_foreground(monkeypatch):
    """``status`` names the daemon's log (a new-user trial: only the README did): the log
    file of ``ossfuse mount`` (tests/test_systemd.py), the journal with the unit's journalctl
    when systemd started it, else standard error."""
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [h for h in root.handlers if not getattr(h, "baseFilename", None)])
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    assert status.log_destination() == "standard error (a foreground mount)"
    monkeypatch.setenv("JOURNAL_STREAM", "8:12345")
    real_open = open

    def cgroup(path, *args, **kw):
        if path == "/proc/self/cgroup":
            import io
            return io.StringIO("0::/system.slice/system-ossfuse.slice/ossfuse@mnt-data.service\n")
        return real_open(path, *args, **kw)
    monkeypatch.setattr("builtins.open", cgroup)
    assert status.log_destination() == "the journal (journalctl -u ossfuse@mnt-data.service)"
    monkeypatch.setattr("builtins.open", real_open)
    assert status.log_destination().startswith("the journal (journalctl")  # (this process's own cgroup)


@pytest.mark.expect_log(r"abort of multipart upload \S+ of 'pre/big' failed: .*tried again when the store answers",
                        r"upload of 'pre/big' failed; the data stays staged")
@pytest.mark.parametrize("when", ["store back", "unmount"])
def test_a_multipart_upload_whose_abort_failed_is_aborted_again_before_unmount_ends(tmp_path, cmk_path, caplog,
                                                                                   when):
    """Trial R: a part failed, then its upload's abort failed too (the store had gone away):
    the unfinished upload stayed in the bucket after a clean unmount (OSS bills its parts)
    until the next mount aborted it as "left by an earlier run". Now it is aborted again once
    the store answers, and at the latest by the drain at unmount; the file itself uploads."""
    data = os.urandom(3 * PART)

    async def main():
        store = _slow_multipart_store(tmp_path)
        store.rules.clear()  # (no slow parts here)
        fs = _filesystem(tmp_path, cmk_path, store)
        store.fail("upload_part", count=1)
        store.fail("abort_multipart", count=1)
        node, h = await fs.create(fs.get(1), "big", 0o644, os.O_WRONLY, 1, 2)
        await fs.write(h, 0, data)
        await fs.flush(h)
        await fs.release(h)
        assert not await fs.commit.upload_node(node, closed_only=True)  # the part fails, then its abort
        assert len(fs.uploader.failed_aborts) == 1
        assert len(await store.inner.list_multipart_uploads("pre/")) == 1
        if when == "store back":  # (StoreHealth's back-online callback)
            async with trio.open_nursery() as nursery:
                fs._nursery = nursery
                fs._retry_failed_aborts()
            assert fs.uploader.failed_aborts == {} and await store.inner.list_multipart_uploads("pre/") == []
        assert await fs.drain() == 0  # uploads the file (and aborts a leftover)
        assert fs.uploader.failed_aborts == {} and await store.inner.list_multipart_uploads("pre/") == []
        assert os.listdir(os.path.join(fs.cfg.cache.dir, "multipart")) == []  # the ledger has nothing left
        assert await store.inner.get_range("pre/big", 0, 1) != b""
        fs.close()
        await store.aclose()

    with caplog.at_level("INFO"):
        trio.run(main)
    assert any("aborted multipart upload" in r.getMessage() and "its first abort had failed" in r.getMessage()
               for r in caplog.records)



SAVE_DELAY = 0.5  # upload_delay of the save-loop tests (seconds)


def _save_in_a_loop(tmp_path, cmk_path, save) -> tuple[list[float], list[float], int]:
    """Save ``f`` in the root of a core filesystem (upload_delay SAVE_DELAY, one upload worker)
    with ``await save(fs, root, i)`` for i = 1, 2, … every SAVE_DELAY / 10 s for 6 delays, as
    the content :func:`_saved` gives. Returns (seconds after the start when each new ETag of
    ``pre/f`` was seen, status's oldest pending age after each save, uploads during the loop);
    afterwards ``f`` must read as the last save, whole."""

    async def main():
        fs = core_filesystem(tmp_path, cmk_path, upload_delay=SAVE_DELAY)
        errors = status.RecentErrors()
        root = fs.get(1)
        seen: dict[str, float] = {}
        ages: list[float] = []
        async with trio.open_nursery() as nursery:
            fs._nursery = nursery
            nursery.start_soon(fs.upload_worker)
            start = trio.current_time()
            i = 0
            while trio.current_time() - start < 6 * SAVE_DELAY:
                i += 1
                await save(fs, root, i)
                info = await fs.store.head("pre/f")
                if info is not None and info.etag not in seen:
                    seen[info.etag] = trio.current_time() - start
                ages.append(status.collect(fs, errors, started=0.0)["pending_uploads"]["oldest_seconds"])
                await trio.sleep(SAVE_DELAY / 10)
            uploaded = fs.stats["uploaded"]
            nursery.cancel_scope.cancel()
        assert await fs.drain() == 0
        h = await fs.open(fs.by_path["f"], os.O_RDONLY)
        assert await fs.read(h, 0, 1 << 20) == _saved(i)
        await fs.release(h)
        fs.close()
        await fs.store.aclose()
        return sorted(seen.values()), ages, uploaded

    return trio.run(main)


def _saved(i: int) -> bytes:
    return f"save {i}\n".encode() * i


async def _write_new(fs, root, name: str, i: int) -> None:
    node, h = await fs.create(root, name, 0o644, os.O_WRONLY, 1, 2)
    await fs.write(h, 0, _saved(i))
    await fs.flush(h)
    await fs.release(h)


def test_a_name_saved_by_rename_faster_than_upload_delay_still_reaches_the_store(tmp_path, cmk_path):
    """Trial R: a status file written to a temporary name and renamed over its name 20 times a
    second, with upload_delay 0.5 s, never reached the bucket while its writer ran (each
    version was renamed over before its own delay ended) and status's oldest age stayed at 0 s.
    Now the version that took the name is uploaded when the one it replaced was due: the
    bucket gets a new version about every delay, each one whole, and status counts the age
    from the name's oldest change not in the bucket."""

    async def save(fs, root, i):
        await _write_new(fs, root, "f.tmp", i)
        await fs.rename(root, "f.tmp", root, "f", 0)

    times, ages, _ = _save_in_a_loop(tmp_path, cmk_path, save)
    # the first within about a delay of the first save (plus the upload), then about one per delay
    assert len(times) >= 3 and times[0] < 2 * SAVE_DELAY, times  # the code before: none
    assert max(ages) >= 0.6 * SAVE_DELAY, ages  # not reset by every save


@pytest.mark.parametrize("how", ["rm then create", "rm then mv"])
def test_a_name_saved_by_delete_and_create_faster_than_upload_delay_is_still_uploaded(tmp_path, cmk_path, how):
    """Trial S: `rm f; echo x > f` (or `rm f; mv f.tmp f`) 20 times a second with upload_delay
    0.5 s uploaded nothing while the writer ran (each new file was unlinked before its own
    delay ended), and status's oldest age stayed at 0 s. The file that takes the name now
    inherits the queued upload of the one unlinked there (UploadScheduler.vacated/took_path):
    about one upload per delay. (Each `rm` still deletes what the last upload put there: the
    writer asked for that.)"""

    async def save(fs, root, i):
        if i > 1:
            await fs.unlink(root, "f")
        name = "f" if how == "rm then create" else "f.tmp"
        await _write_new(fs, root, name, i)
        if name != "f":
            await fs.rename(root, name, root, "f", 0)

    _, ages, uploaded = _save_in_a_loop(tmp_path, cmk_path, save)
    assert uploaded >= 3, uploaded  # the code before: 0
    assert max(ages) >= 0.6 * SAVE_DELAY, ages
