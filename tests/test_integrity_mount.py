"""Integrity tags through a real mount (issue 17, docs/integrity.md), on the local bucket and the
OSS test server: a bit flipped in the stored object gives EIO (whole and ranged reads) with one
log line naming the object, block and ETag, while the rest of the file reads; ``ossfuse status``
counts verified bytes; ``ossfuse check --verify`` names the damaged object; rename and rekey
keep the tags valid."""
from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
import time

import pytest

from conftest import BUCKET, OSSFUSE, run_sync
from ossfuse import envelope as env
from ossfuse import integrity

pytestmark = pytest.mark.timeout(240)
MIB = 1 << 20


def flip(m, key: str, offset: int) -> None:
    """Flip a bit of the stored body of ``key``: the local bucket's blob file, or the OSS test
    server's stored bytes (with the CRC recomputed, so only the tags can notice)."""
    if m.server is not None:
        m.server.call("flip_bit", BUCKET, key, offset)
        return
    store = m.store
    path = store._blob_path(store._row(key)[5])
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x10]))


def status(m) -> dict:
    import json
    r = subprocess.run(OSSFUSE + ["status", "--json", m.mnt], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def check_verify(m, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(OSSFUSE + ["check", "-c", m.config, "--verify", *extra], capture_output=True,
                          text=True, timeout=120, env=m.env)


def _check_verify_names_what_a_path_means(m) -> None:
    """``check --verify PATH`` as users type PATH (in the mount, below its root, relative, through
    links, ".."): what each names, or its one-line refusal. Over ``m``'s f (3,145,851 bytes), h
    (1,000), d (a directory marker)."""
    forms = ("PATH is a path in the mount, as in /mnt/ossfuse/photos or photos typed in /mnt/ossfuse, or one below "
             "the mount's root, as in photos")
    for where, why in (("nosuchdir", f"no object there ({forms})"),  # the forms: only for the typed form
                       (m.path("nosuchdir"), "no such file or directory")):
        r = check_verify(m, where)  # a PATH that matches nothing: no summary of nothing first
        assert r.returncode == 1 and "verified:" not in r.stdout, r.stdout
        assert r.stderr == f"ossfuse: check --verify {where}: {why}\n", r.stderr
    for where, why in ((("d/../../f", f"PATH is above the mount's root ({forms})"),  # ("..": the whole bucket)
                        ("..", "that is not in a running ossfuse mount: give a path in the mount (or, typed outside "
                               "any mount, one below the mount's root)"))):  # (the parent of the cwd here)
        r = check_verify(m, where)
        assert r.returncode == 1 and r.stderr == f"ossfuse: check --verify {where}: {why}\n", r.stderr
    for where, count in (("f", "1 object(s), 3145851 bytes"), ("./h", "1 object(s), 1000 bytes"),
                         ("d/..//f", "1 object(s), 3145851 bytes"), (".", "2 object(s), 3146851 bytes"),
                         # a path in the mount, as a user types it (it said "no object there": a trial)
                         (m.mnt, "2 object(s), 3146851 bytes"), (m.path("f"), "1 object(s), 3145851 bytes"),
                         (m.path("d", "..", "h"), "1 object(s), 1000 bytes")):
        r = check_verify(m, where)  # a file, as a path is written (it said "no object there")
        assert r.returncode == 0 and f"verified: {count}; without tags: 0" in r.stdout, (where, r.stdout, r.stderr)
        # its progress on stderr (a line every 5 s and a last one; a trial: a long run said nothing)
        assert re.fullmatch(r"check --verify: (\d+) of \1 objects, .* \(100%\)", r.stderr.splitlines()[-1]), r.stderr
    for cwd, where, count in ((m.path("d"), ["../h"], "1 object(s), 1000 bytes"),
                              (m.mnt, ["f"], "1 object(s), 3145851 bytes"),
                              (m.path("d"), [".."], "2 object(s), 3146851 bytes"),
                              (m.path("d"), [], "2 object(s), 3146851 bytes")):  # none: all, wherever typed
        # typed inside the mount, a relative PATH is from there (from d, "f" named the root's f: a trial)
        r = subprocess.run(OSSFUSE + ["check", "-c", m.config, "--verify", *where], capture_output=True, text=True,
                           timeout=120, env=m.env, cwd=cwd)
        assert r.returncode == 0 and f"verified: {count}; without tags: 0" in r.stdout, (cwd, where, r.stdout, r.stderr)
    for cwd, where in ((m.mnt, "../d"), (None, m.mnt + "/../d")):  # ".." out of the mount: not "d" of the bucket
        r = subprocess.run(OSSFUSE + ["check", "-c", m.config, "--verify", where], capture_output=True, text=True,
                           timeout=120, env=m.env, cwd=cwd)  # (it named the bucket's keys above the root: a trial)
        assert r.returncode == 1 and "verified:" not in r.stdout and r.stderr == (
            f"ossfuse: check --verify {where}: that is not in a running ossfuse mount: give a path in the mount (or, "
            f"typed outside any mount, one below the mount's root)\n"), r.stderr
    link = os.path.join(os.path.dirname(m.mnt), "to-mnt")
    os.symlink(m.mnt, link)
    os.symlink("h", m.path("hlink"))  # a link in the mount names itself, also through a link to the mount
    for where, count in ((os.path.join(link, "h"), "1 object(s), 1000 bytes"),
                         (os.path.join(link, "hlink"), "1 object(s), 1 bytes")):
        r = check_verify(m, where)
        assert r.returncode == 0 and f"verified: {count};" in r.stdout, (where, r.stdout, r.stderr)
    os.unlink(m.path("hlink"))  # (the counts below are of f and h)
    for where in (os.path.dirname(m.mnt), "/d", os.path.join(link, "d", "..", "..", "d"),
                  m.mnt.replace("/", "//") + "/../d"):  # absolute, not in the mount: never read as a bucket path
        r = check_verify(m, where)
        assert r.returncode == 1 and "verified:" not in r.stdout and "that is not in a running ossfuse mount" in \
            r.stderr, r.stdout + r.stderr
    top = os.path.dirname(m.mnt)
    os.symlink(m.path("d"), os.path.join(top, "to-d"))
    os.symlink("d", m.path("dl"))
    for cwd, where, expect in ((top, "to-d/../h", "verified: 1 object(s), 1000 bytes;"),  # the kernel's "..", typed
                               # outside any mount: a relative path that names something here is that
                               (top, "mnt/h", "verified: 1 object(s), 1000 bytes;"),
                               (None, m.path("dl") + "/", "verified: 0 object(s), 0 bytes;")):  # "/": the link's target
        r = subprocess.run(OSSFUSE + ["check", "-c", m.config, "--verify", where], capture_output=True, text=True,
                           timeout=120, env=m.env, cwd=cwd)
        assert r.returncode == 0 and expect in r.stdout, (cwd, where, r.stdout, r.stderr)
    os.unlink(m.path("dl"))
    for cwd, where, why in ((top, "mnt/..", "that is not in a running ossfuse mount"),  # it meant the whole bucket
                            (None, m.path("nonexist", ".."), "No such file or directory"),
                            (None, m.path("f", "..", "h"), "Not a directory"),
                            (None, "\udcff", "'\\udcff': not UTF-8, as every object name is")):
        r = subprocess.run(OSSFUSE + ["check", "-c", m.config, "--verify", where], capture_output=True, text=True,
                           timeout=120, env=m.env, cwd=cwd)  # (each acted on objects not named: a trial)
        assert r.returncode == 1 and "verified:" not in r.stdout and why in r.stderr and \
            r.stderr.count("\n") == 1, (where, r.stdout, r.stderr)
    other = m.config + ".copy"  # the same settings, another file: which mount it means is not known
    shutil.copy(m.config, other)
    r = subprocess.run(OSSFUSE + ["check", "-c", other, "--verify", m.path("f")], capture_output=True, text=True,
                       timeout=120, env=m.env)
    assert r.returncode == 1 and "verified:" not in r.stdout and r.stderr == (
        f"ossfuse: check --verify {m.path('f')}: that is in the ossfuse mount at {m.mnt}, made with {m.config}, "
        f"not with {other}: give -c that mount's config, or PATH below the mount's root\n"), r.stdout + r.stderr


@pytest.mark.expect_log(r"cannot read 'f': block 24 \(bytes 1572864-1638399\) of version ETag \S+ fails its "
                        r"integrity tag \(fetched twice\)")
def test_flipped_bit_in_the_store_gives_eio_and_check_names_it(make_mount):
    m = make_mount()
    data = os.urandom(3 * MIB + 123)
    with open(m.path("f"), "wb") as f:
        f.write(data)
    with open(m.path("g"), "wb") as f:
        f.write(data[:1000])
    os.rename(m.path("g"), m.path("h"))  # a rename copies the object: its tags stay valid
    os.mkdir(m.path("d"))  # a directory marker: counted apart, not as a plaintext object
    os.mkfifo(m.path("p"))  # a special file: no content, no envelope, counted apart too
    run_sync(m.store.put_bytes, "plain.txt", b"another client's plaintext", {})  # named in the summary
    m.remount()  # cold: nothing cached, nothing in the kernel's page cache
    spec = integrity.parse(m.head("f").metadata)
    assert spec.block == 64 << 10 and len(spec.tags) == 16 * 49
    r = check_verify(m)
    assert r.returncode == 0 and "verified: 2 object(s), 3146851 bytes; without tags: 0" in r.stdout, r.stdout
    assert ("not encrypted: 1 (e.g. 'plain.txt'); integrity tag lists (ossfuse's own, not encrypted by design): 0; "
            "special files (FIFOs, sockets, devices: no content): 1; directory markers: 1; failed: 0") in r.stdout, \
        r.stdout
    if m.kind == "local":  # what a PATH names does not depend on the store: checked once
        _check_verify_names_what_a_path_means(m)
    flip(m, "f", 3 * MIB // 2 + 5)  # block 24 of 64 KiB
    with open(m.path("h"), "rb") as f:
        assert f.read() == data[:1000]
    with open(m.path("f"), "rb") as f:
        assert os.pread(f.fileno(), 4096, 0) == data[:4096]  # blocks before it read
        assert os.pread(f.fileno(), 4096, 2 * MIB) == data[2 * MIB:2 * MIB + 4096]  # and after it
        # and the other tagged blocks of its cache block (a trial: one bad 64 KiB block made the
        # whole 1 MiB around it EIO)
        assert os.pread(f.fileno(), 4096, MIB + 4096) == data[MIB + 4096:MIB + 8192]
        assert os.pread(f.fileno(), 4096, 3 * MIB // 2 + 65536) == data[3 * MIB // 2 + 65536:3 * MIB // 2 + 69632]
        with pytest.raises(OSError) as e:  # ranged, inside the damaged block
            os.pread(f.fileno(), 100, 3 * MIB // 2)
        assert e.value.errno == errno.EIO
    with open(m.path("f"), "rb") as f, pytest.raises(OSError) as e:  # whole
        f.read()
    assert e.value.errno == errno.EIO
    doc = status(m)
    assert doc["integrity"]["failures"] >= 2 and doc["integrity"]["unverified_bytes"] == 0
    assert doc["integrity"]["verified_bytes"] >= 1000 + 2 * 4096
    lines = [ln for ln in m.log().splitlines() if "fails its integrity tag (fetched twice)" in ln]
    assert len(lines) == 1 and "ERROR" in lines[0] and "'f'" in lines[0] and "block 24 " in lines[0], lines
    # the refetch's INFO once too, though two reads met the block (a trial counted 13 lines)
    assert m.log().count("fails its integrity tag; fetching it again") == 1, m.log()
    etag = m.head("f").etag
    r = check_verify(m)
    assert r.returncode == 1
    assert re.search(rf"FAIL  f \(ETag {etag}\): block 24 \(bytes 1572864-1638399\) fails its integrity tag",
                     r.stdout), r.stdout
    assert "verified: 1 object(s), 1000 bytes" in r.stdout and "failed: 1" in r.stdout
    r = check_verify(m, "f")
    assert r.returncode == 1 and "verified: 0 object(s)" in r.stdout and "failed: 1" in r.stdout, r.stdout
    assert re.search(rf"FAIL  f \(ETag {etag}\): block 24 ", r.stdout), r.stdout
    flip(m, "f", 3 * MIB // 2 + 5)  # repaired
    with open(m.path("f"), "rb") as f:
        assert f.read() == data


@pytest.mark.expect_log(r"cannot open 'g': object has 5000 bytes, its envelope says 4000")
def test_check_names_an_object_whose_envelope_states_another_length(make_mount):
    """An object whose envelope states another plaintext length than its size is refused by
    the mount (EIO): `check --verify` names it too (a trial: it counted it verified, its tags
    being those of the bytes it has)."""
    from conftest import run_sync
    m = make_mount()
    data = os.urandom(5000)
    for name in ("f", "g"):
        with open(m.path(name), "wb") as f:
            f.write(data)
    m.remount()  # uploaded
    info = m.head("g")
    body = run_sync(m.store.get_range, "g", 0, info.size)
    run_sync(m.store.put_bytes, "g", body, {**info.metadata, "client-side-encryption-unencrypted-content-length": "4000"})
    m.remount()
    with pytest.raises(OSError) as e, open(m.path("g"), "rb") as f:
        f.read()
    assert e.value.errno == errno.EIO
    r = check_verify(m)
    assert r.returncode == 1, r.stdout + r.stderr
    assert re.search(r"FAIL  g \(ETag \S+\): object has 5000 bytes, its envelope says 4000", r.stdout), r.stdout
    assert "verified: 1 object(s), 5000 bytes" in r.stdout and "failed: 1" in r.stdout, r.stdout


def test_multipart_uploads_and_rekey_keep_valid_tags(tmp_path, cmk_path, other_cmk_path, oss_server):
    """Tags of a multipart upload (computed at seal, before the parts go) are in the metadata
    given at initiate; ``ossfuse rekey`` rewraps the same data key and IV, so the header it
    carries over still verifies: ``check --verify`` and a mount read every byte verified."""
    from conftest import Mount
    cmks = (f'[[encryption.cmk]]\nid = "b"\ntype = "rsa"\nprivate_key = "{other_cmk_path}"\n'
            'matdesc = { cmk = "b" }\n')
    m = Mount(str(tmp_path / "m"), cmk_path, "multipart_threshold = 204800\npart_size = 102400",
              server=oss_server, extra=cmks)
    files = {"big": os.urandom(3 * MIB + 7), "small": os.urandom(1001)}
    m.start()
    try:
        for name, data in files.items():
            with open(m.path(name), "wb") as f:
                f.write(data)
    finally:
        assert m.stop() == 0
    big = m.head("big").metadata
    assert big["client-side-encryption-part-size"] == "102400"  # multipart indeed
    headers = {k: m.head(k).metadata[integrity.HEADER] for k in files}
    assert integrity.parse(big).tags is not None
    r = check_verify(m)
    assert r.returncode == 0 and f"verified: 2 object(s), {3 * MIB + 7 + 1001} bytes" in r.stdout, r.stdout
    r = subprocess.run(OSSFUSE + ["rekey", "-c", m.config, "--to", "b"], capture_output=True, text=True,
                       env=m.env, timeout=120)
    assert r.returncode == 0 and "changed: 2 object(s)" in r.stdout, r.stdout + r.stderr
    assert {k: m.head(k).metadata[integrity.HEADER] for k in files} == headers  # carried over
    assert all(m.head(k).metadata["client-side-encryption-matdesc"] == '{"cmk":"b"}' for k in files)
    r = check_verify(m)
    assert r.returncode == 0 and f"verified: 2 object(s), {3 * MIB + 7 + 1001} bytes" in r.stdout, r.stdout
    m.start()
    try:
        for name, data in files.items():
            with open(m.path(name), "rb") as f:
                assert f.read() == data
        doc = status(m)
        assert doc["integrity"] == {"verified_bytes": 3 * MIB + 7 + 1001, "unverified_bytes": 0, "failures": 0}
    finally:
        assert m.stop() == 0
    m.check_log()


B_CMK = '[[encryption.cmk]]\nid = "b"\ntype = "rsa"\nprivate_key = "{}"\nmatdesc = {{ cmk = "b" }}\n'


@pytest.mark.expect_log(r"rekey of 'bad' \(ETag \S+\) skipped: it fails its integrity tags",
                        r"rekey of 'lenbad' \(ETag \S+\) skipped: its envelope is damaged")
def test_rekey_skips_and_reports_a_damaged_object(tmp_path, cmk_path, other_cmk_path):
    """A damaged object is never re-saved under the new CMK (that would give it fresh, valid
    tags over bad bytes): rekey checks the tags, leaves it as it is, names it on one line and
    exits 1; the good objects are rekeyed."""
    from conftest import Mount
    m = Mount(str(tmp_path / "m"), cmk_path, extra=B_CMK.format(other_cmk_path))
    m.start()
    try:
        for name in ("bad", "good"):
            with open(m.path(name), "wb") as f:
                f.write(os.urandom(200_000))
    finally:
        assert m.stop() == 0
    flip(m, "bad", 70_000)
    before = m.head("bad")
    good = m.head("good")  # trial Y: an envelope whose plaintext length is no length was re-saved
    body = run_sync(lambda: m.store.get_range("good", 0, good.size))
    run_sync(lambda: m.store.put_bytes("lenbad", body, {**good.metadata, env.H_PLAIN_LEN: "abc"}))
    lenbad = m.head("lenbad")
    r = subprocess.run(OSSFUSE + ["rekey", "-c", m.config, "--to", "b", "--dry-run"], capture_output=True,
                       text=True, env=m.env, timeout=120)
    assert r.returncode == 1 and "would change: 2 object(s)" in r.stdout, r.stdout + r.stderr  # (lenbad)
    assert ("skipped, damaged envelope: 1; integrity tags not checked in a dry run (contents are not read; "
            "`ossfuse check --verify` reads them)") in r.stdout.splitlines(), r.stdout  # says it cannot tell
    r = subprocess.run(OSSFUSE + ["rekey", "-c", m.config, "--to", "b"], capture_output=True, text=True,
                       env=m.env, timeout=120)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "changed: 1 object(s)" in r.stdout, r.stdout
    damaged = [ln for ln in r.stdout.splitlines() if ln.startswith("  DAMAGED ")]
    assert damaged == [f"  DAMAGED bad (ETag {before.etag}): block 1 (bytes 65536-131071) fails its integrity tag",
                       f"  DAMAGED lenbad (ETag {lenbad.etag}): its envelope's plaintext length 'abc' is not a "
                       "length (decimal digits)"], r.stdout
    assert m.head("lenbad").metadata == lenbad.metadata
    after = m.head("bad")
    assert after.etag == before.etag and after.metadata == before.metadata  # left as it was
    assert m.head("good").metadata["client-side-encryption-matdesc"] == '{"cmk":"b"}'


@pytest.mark.expect_log(r"cannot open 'f': no CMK for wrap-alg 'RSA/NONE/PKCS1Padding' and matdesc \{\"cmk\":\"b\"\}",
                        r"WARNING ossfuse\.daemon: 1 of the first 1 encrypted objects in the bucket cannot be read")
def test_rekey_to_a_cmk_a_running_mount_lacks_warns_and_the_read_names_the_matdesc(tmp_path, cmk_path,
                                                                                   other_cmk_path):
    """A mount whose config has only the old CMK, and a rekey (with another config) to a CMK
    it lacks: rekey warns, naming that mount; the mount's read is EACCES with one log line
    naming the object and the matdesc it has no CMK for."""
    from conftest import Mount
    m = Mount(str(tmp_path / "m"), cmk_path)
    m.start()
    try:
        with open(m.path("f"), "wb") as f:
            f.write(b"data")
        wider = tmp_path / "wider.toml"
        with open(m.config) as f:
            wider.write_text(f.read().replace("[cache]", B_CMK.format(other_cmk_path) + "[cache]")
                             .replace(m.cache, str(tmp_path / "cache2")))
        r = subprocess.run(OSSFUSE + ["rekey", "-c", str(wider), "--to", "b"], capture_output=True, text=True,
                           env=m.env, timeout=120)
        assert r.returncode == 0 and "changed: 1 object(s)" in r.stdout, r.stdout + r.stderr
        assert (f"ossfuse: warning: mount {m.mnt} (config {m.config}) has no CMK 'b' (matdesc "
                '{"cmk": "b"}): its reads of the rekeyed objects will fail with EACCES') in r.stderr, r.stderr
        # that the mount is up is said too: edits through it may be lost or become conflict copies
        assert (f"ossfuse: warning: mount {m.mnt} of this store is up: a change saved through it while this "
                "rewrites that file's object can be overwritten by the older content put back") in r.stderr, r.stderr
        m.remount()  # forget the old envelope the mount knew: its start says it reads none of them
        assert m.mount_stderr.startswith("ossfuse: warning: 1 of the first 1 encrypted objects in the bucket "
                                         "cannot be read with this config's CMKs (e.g. 'f': "), m.mount_stderr
        with pytest.raises(OSError) as e:
            open(m.path("f"), "rb").read()
        assert e.value.errno == errno.EACCES
        lines = [ln for ln in m.log().splitlines() if " ERROR " in ln and "no CMK for" in ln]
        assert len(lines) == 1 and "'f'" in lines[0], lines
    finally:
        m.stop()


@pytest.mark.expect_log(r"cannot open 'f': no CMK for wrap-alg 'RSA/NONE/PKCS1Padding' and matdesc \{\"cmk\":\"b\"\}")
def test_rekey_warns_of_a_mount_of_its_own_config_that_was_mounted_before_the_cmk_was_added(tmp_path, cmk_path,
                                                                                        other_cmk_path):
    """Trial X: the README's way — keygen, add the CMK to the config the mount uses, rekey with
    that config — gave no warning, then EACCES for every rekeyed file until a remount (the
    check compared the config file, which has the CMK now, not what the daemon loaded)."""
    from conftest import Mount
    m = Mount(str(tmp_path / "m"), cmk_path)
    m.start()
    try:
        with open(m.path("f"), "wb") as f:
            f.write(b"data")
        with open(m.config) as f:
            text = f.read()
        with open(m.config, "w") as f:
            f.write(text.replace("[cache]", B_CMK.format(other_cmk_path) + "[cache]"))
        r = subprocess.run(OSSFUSE + ["rekey", "-c", m.config, "--to", "b"], capture_output=True, text=True,
                           env=m.env, timeout=120)
        assert r.returncode == 0 and "changed: 1 object(s)" in r.stdout, r.stdout + r.stderr
        assert (f"ossfuse: warning: mount {m.mnt} (config {m.config}) was mounted before its config had CMK 'b' "
                '(matdesc {"cmk": "b"}): its reads of the rekeyed objects will fail with EACCES until it is '
                "mounted again") in r.stderr, r.stderr
        time.sleep(0.6)  # attr_timeout: the mount takes the rekeyed version
        with pytest.raises(OSError) as e:  # what the warning said
            open(m.path("f"), "rb").read()
        assert e.value.errno == errno.EACCES
        m.remount()
        assert open(m.path("f"), "rb").read() == b"data"
    finally:
        m.stop()


@pytest.mark.expect_log(r"cannot open 'f': no CMK for wrap-alg 'RSA/NONE/PKCS1Padding' and matdesc \{\"cmk\":\"b\"\}")
def test_a_rekey_over_oss_keeps_the_etag_and_running_mounts_see_the_new_envelope(tmp_path, cmk_path,
                                                                                  other_cmk_path, oss_server):
    """Over OSS a rekey streams the same ciphertext back, so the ETag (the MD5 of the body)
    stays and only the envelope changes. Trial T: a mount that had read the file kept the old
    envelope for minutes — still EACCES 135 s after the object was rekeyed back to a CMK it
    has, and a chmod sent the old envelope, which OSS refused (EIO for 3.5 minutes; a store
    without that rule would have put the old wrapped key back). Trial U: a touch or fchmod
    through a descriptor failed ESTALE (the kernel retries only calls by path), and an open
    trusting its attributes gave EACCES for attr_timeout after a rekey back. Now: a mount takes
    a re-wrapped envelope as a new version at its next check; an attribute change OSS refuses
    for the envelope it knew goes onto the one the object has (one INFO line); an open whose
    CMK is missing asks the store once before EACCES; open handles read on."""
    from conftest import Mount
    a = Mount(str(tmp_path / "a"), cmk_path, server=oss_server)  # attr_timeout 0.5 s
    c = Mount(str(tmp_path / "c"), cmk_path, server=oss_server, mount_options="attr_timeout = 60\nentry_timeout = 60")
    data = b"data" * 1000
    a.start()
    try:
        c.start()
        try:
            with open(a.path("f"), "wb") as f:
                f.write(data)
            assert a.stop() == 0
            a.start()
            assert open(a.path("f"), "rb").read() == data
            fd = os.open(c.path("f"), os.O_RDONLY)  # c holds the envelope it had then
            try:
                assert os.read(fd, 4) == b"data"
                before = a.head("f")
                wider = tmp_path / "wider.toml"
                with open(a.config) as f:
                    wider.write_text(f.read().replace("[cache]", B_CMK.format(other_cmk_path) + "[cache]")
                                     .replace(a.cache, str(tmp_path / "cache-rekey")))

                def rekey(to: str) -> None:
                    r = subprocess.run(OSSFUSE + ["rekey", "-c", str(wider), "--to", to], capture_output=True,
                                       text=True, env=a.env, timeout=120)
                    assert r.returncode == 0 and "changed: 1 object(s)" in r.stdout, r.stdout + r.stderr

                rekey("b")
                after = a.head("f")
                assert after.etag == before.etag and after.metadata["client-side-encryption-matdesc"] == '{"cmk":"b"}'
                # c's attributes are fresh for 60 s: the copies send the envelope it holds, OSS
                # refuses them, and each change goes onto the envelope the object has now
                os.fchmod(fd, 0o600)  # through a descriptor: no retry by the kernel
                os.utime(c.path("f"), ns=(1_600_000_000 * 10**9,) * 2)
                now = c.head("f")
                assert now.etag == before.etag and int(now.metadata["mode"]) & 0o777 == 0o600
                assert now.metadata["mtime"].startswith("1600000000")
                assert now.metadata["client-side-encryption-key"] == after.metadata["client-side-encryption-key"]
                assert now.metadata["client-side-encryption-matdesc"] == '{"cmk":"b"}'
                assert os.pread(fd, 8, 3996) == b"data"  # its own data key: the same bytes
            finally:
                os.close(fd)
            with pytest.raises(OSError) as e:  # c lacks CMK b: the envelope it knows now
                open(c.path("f"), "rb").read()
            assert e.value.errno == errno.EACCES
            time.sleep(0.6)  # a's attr_timeout: its next open checks, and finds a CMK it lacks
            with pytest.raises(OSError) as e:
                open(a.path("f"), "rb").read()
            assert e.value.errno == errno.EACCES
            rekey("main")
            time.sleep(0.6)
            assert open(a.path("f"), "rb").read() == data  # at once, not minutes later
            # c trusts its attributes for 60 s, but asks once before EACCES
            assert open(c.path("f"), "rb").read() == data
        finally:
            c.stop()
    finally:
        a.stop()
    assert "copy of 'f' refused: its data key was wrapped anew" in c.log()
    assert [ln for ln in c.log().splitlines() if " ERROR " in ln and "no CMK" in ln] == [
        ln for ln in c.log().splitlines() if " ERROR " in ln], c.log()  # only the real EACCES is an ERROR


def _mounted_with_f(tmp_path, cmk_path):
    """A started mount on a local bucket holding file ``f`` (4000 bytes), remounted: cold."""
    from conftest import Mount
    m = Mount(str(tmp_path / "m"), cmk_path)
    m.start()
    try:
        with open(m.path("f"), "wb") as f:
            f.write(b"data" * 1000)
        m.remount()
    except BaseException:
        m.cleanup()
        raise
    return m


@pytest.mark.expect_log(r"reading 'f' failed: .*the stored body of this object is missing \(blob file \S+ is gone\)")
def test_a_lost_body_in_the_local_store_is_eio_saying_it_is_missing(tmp_path, cmk_path):
    """The local bucket's blob of an object deleted behind its back: EIO with one line saying
    the body is missing (not "the object kept changing", which points at another writer)."""
    m = _mounted_with_f(tmp_path, cmk_path)
    try:
        os.unlink(m.store._blob_path(m.store._row("f")[5]))
        with pytest.raises(OSError) as e:
            open(m.path("f"), "rb").read()
        assert e.value.errno == errno.EIO
        lines = [ln for ln in m.log().splitlines() if "'f'" in ln and "ERROR" in ln]
        assert len(lines) == 1 and "is missing" in lines[0] and "kept changing" not in lines[0], lines
    finally:
        m.stop()


@pytest.mark.expect_log(r"'f' was deleted by another client while open")
def test_an_object_deleted_by_another_client_after_open_is_estale_saying_so(tmp_path, cmk_path):
    """Another client deletes the object between the mount's HEAD (open) and its GET (read):
    ESTALE and one line saying it was deleted."""
    from conftest import run_sync
    m = _mounted_with_f(tmp_path, cmk_path)
    try:
        with open(m.path("f"), "rb") as f:
            run_sync(m.store.delete, "f")
            with pytest.raises(OSError) as e:
                f.read()
        assert e.value.errno == errno.ESTALE
        lines = [ln for ln in m.log().splitlines() if "'f'" in ln and "ERROR" in ln]
        assert len(lines) == 1 and "deleted by another client" in lines[0], lines
    finally:
        m.stop()


@pytest.mark.parametrize("swap", ["data key and IV", "whole envelope"])
@pytest.mark.expect_log(r"cannot read 'k': block 0 \(bytes 0-\d+\) of version ETag \S+ fails its integrity tag")
def test_another_envelope_on_an_unchanged_body_is_eio_in_running_mounts(tmp_path, cmk_path, oss_server, swap):
    """Trial BT7 finding 1: with write access to the bucket, put object j's data key and IV
    (or j's whole envelope, tag header and all) on k's unchanged body: the ETag (the body's MD5)
    stays, so a running mount took it for a re-wrap (``ossfuse rekey``), kept the tags and the
    checked blocks of the old key and served k's ciphertext decrypted with j's key: garbage,
    counted "verified", nothing logged (a fresh mount gave EIO). Now blocks and tags hold for
    the data key they were checked under: EIO and one ERROR line, in the mount that wrote k
    (its upload's blocks, adopted) and in one that had read it (fetched blocks), never other
    bytes than k's."""
    from conftest import Mount
    w = Mount(str(tmp_path / "w"), cmk_path, server=oss_server)  # attr_timeout 0.5 s
    r = Mount(str(tmp_path / "r"), cmk_path, server=oss_server)
    data = os.urandom(300_000)
    w.start()
    try:
        r.start()
        try:
            for name, content in (("k", data), ("j", os.urandom(len(data)))):  # (j: as long, or its envelope says so)
                with open(w.path(name), "wb") as f:
                    f.write(content)
                    os.fsync(f.fileno())  # in the bucket
            assert open(r.path("k"), "rb").read() == data  # r fetched, checked and cached its blocks
            k, j = w.head("k"), w.head("j")
            if swap == "whole envelope":
                meta = dict(j.metadata)
            else:
                meta = {**k.metadata, env.H_KEY: j.metadata[env.H_KEY], env.H_START: j.metadata[env.H_START]}
            body = run_sync(w.store.get_range, "k", 0, k.size)
            assert run_sync(w.store.put_bytes, "k", body, meta).etag == k.etag  # (the same body: the same ETag)
            time.sleep(1.2)  # past both mounts' attr_timeout: the next open asks the store
            for m in (w, r):
                got = subprocess.run(["dd", f"if={m.path('k')}", "iflag=direct", "bs=64K", "status=none"],
                                     capture_output=True, timeout=60)
                assert got.returncode == 1 and b"Input/output error" in got.stderr, (m.kind, got.stderr)
                assert data.startswith(got.stdout), "bytes other than k's were served"
                errors = [ln for ln in m.log().splitlines() if "ERROR" in ln and "'k'" in ln]
                assert len(errors) == 1 and "fails its integrity tag" in errors[0], errors
        finally:
            r.stop()
    finally:
        w.stop()


@pytest.mark.expect_log(r"GET 'f' failed: OSS GET 'f': CRC-64 mismatch between client and OSS \(the bytes read are not "
                        r"those OSS stored: damaged in transit, or at rest\)",
                        r"reading 'f' failed: OSS GET 'f': CRC-64 mismatch")
def test_a_body_that_fails_oss_crc_on_every_read_is_named_damaged_by_check(tmp_path, cmk_path, oss_server):
    """Trial BT7 finding 3: a small file damaged at rest where OSS's CRC-64 of it stays the
    old one (read in one GET, whose CRC the client checks before the tags): the mount's EIO
    said "damaged in transit" only, and ``check --verify`` printed "NOT CHECKED (run it
    again)" with "failed: 0". Now the line says either may be, and check names it FAIL."""
    from conftest import Mount
    m = Mount(str(tmp_path / "m"), cmk_path, server=oss_server)
    m.write_config(store_options="retries = 1")  # (each try fails alike; check uses the config too)
    m.start()
    try:
        data = os.urandom(777)
        with open(m.path("f"), "wb") as f:
            f.write(data)
        m.remount()  # cold: the read asks the store
        oss_server.call("flip_bit", BUCKET, "f", 300, keep_crc=True)
        with pytest.raises(OSError) as e, open(m.path("f"), "rb") as f:
            f.read()
        assert e.value.errno == errno.EIO
        r = check_verify(m)
        assert r.returncode == 1 and "failed: 1" in r.stdout and "not checked" not in r.stdout, r.stdout
        assert re.search(r"FAIL  f \(ETag \w+\): OSS GET 'f': CRC-64 mismatch", r.stdout), r.stdout
    finally:
        m.stop()
