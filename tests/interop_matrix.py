"""Print the interop matrix: every writer × every reader of encrypted objects, pass or fail.

    .venv/bin/python tests/interop_matrix.py

Writers and readers: an ossfuse mount, the C++, Go V1 and Go V2 SDKs' encryption clients
(../shared/tools/sdk-clients, or $OSSFUSE_SHARED_TOOLS), oss2 CryptoBucket and the Python V2
EncryptionClient, all on one bucket of the OSS test server (tests/oss_server.py). A cell passes
when every case (tests/interop_clients.py: 0 B, 1 B, 100 KiB + 7 and 2 MiB + odd multipart, with
and without matdesc) written by the row's client reads byte-exact with the column's, whole and
at an odd range (SHA-256 compared). A second table does the same with a KMS CMK (local KMS,
``encoding = "raw"``) for the clients that have one in common. Exit status 1 if a cell with the
mount on either side fails (failures between two SDKs are printed, not counted).
Takes about a minute; the same cells with the mount on one side run in the test suite
(tests/test_interop_sdk.py). Results are recorded in docs/semantics.md.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from conftest import AK, BUCKET, REGION, SK, Mount  # noqa: E402
from interop_clients import CLIENTS, KMS_CASES, MOUNT_OPTIONS, SDK_TO_MOUNT, Env, missing_tools, mount_keyring, run_cell  # noqa: E402
from kms_server import KmsTestServer  # noqa: E402
from oss_remote import RemoteOssServer  # noqa: E402

from ossfuse.keyring import generate_rsa_cmk  # noqa: E402


def table(title: str, names: list[str], clients: dict, cases) -> tuple[list[str], list[tuple[bool, str]]]:
    """Markdown lines of one matrix (rows write, columns read) and the failures: (whether the
    mount was one side, details)."""
    lines = [f"{title} (rows write, columns read; passed cases / cases):", "",
             "| writer \\ reader | " + " | ".join(clients[n].label for n in names) + " |",
             "|---|" + "---|" * len(names)]
    details = []
    for w in names:
        cells = []
        for r in names:
            results = run_cell(clients[w], clients[r], cases)
            bad = [(name, problem) for name, problem in results if problem]
            cells.append(f"pass {len(results)}/{len(results)}" if not bad else
                         f"**FAIL** {len(results) - len(bad)}/{len(results)}")
            details += [("mount" in (w, r), f"{clients[w].label} → {clients[r].label}, {name}: {problem}")
                        for name, problem in bad]
        lines.append(f"| {clients[w].label} | " + " | ".join(cells) + " |")
    return lines, details


def main() -> int:
    why = missing_tools()
    if why:
        print(f"cannot run: {why}", file=sys.stderr)
        return 2
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="ossfuse-interop-") as root:
        cmk, other = os.path.join(root, "cmk.pem"), os.path.join(root, "other.pem")
        generate_rsa_cmk(cmk, bits=2048)
        generate_rsa_cmk(other, bits=2048)
        server = RemoteOssServer(access_key_id=AK, access_key_secret=SK, bucket=BUCKET, region=REGION,
                                 root_dir=os.path.join(root, "oss"))
        kms = KmsTestServer({AK: SK})
        mount = None
        try:
            kms.start()
            key_id = kms.create_key()
            mount = Mount(os.path.join(root, "m"), cmk, MOUNT_OPTIONS, server=server,
                          extra=mount_keyring(cmk, kms.endpoint, key_id))
            mount.start()
            env = Env(server.endpoint, cmk, other, mount, kms.endpoint, key_id)
            clients = {name: cls(env, os.path.join(root, "work")) for name, cls in CLIENTS.items()}
            rsa_lines, rsa_fail = table("RSA CMK", list(CLIENTS), clients, SDK_TO_MOUNT)
            kms_lines, kms_fail = table('KMS CMK, `encoding = "raw"`', ["mount", "go1"], clients, KMS_CASES)
        finally:
            if mount is not None:
                mount.cleanup()
            kms.stop()
            server.close()
    print("\n".join(rsa_lines + [""] + kms_lines))
    print(f"\ncases: {', '.join(f'{c.name} ({c.size} B)' for c in SDK_TO_MOUNT + KMS_CASES)}; "
          f"{time.monotonic() - started:.0f} s")
    for ours, d in rsa_fail + kms_fail:
        print(("FAIL: " if ours else "FAIL between SDKs (no ossfuse involved): ") + d)
    return 1 if any(ours for ours, _ in rsa_fail + kms_fail) else 0


if __name__ == "__main__":
    sys.exit(main())
