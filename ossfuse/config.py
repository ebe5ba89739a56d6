"""The per-mount configuration file (TOML), loaded and checked.

Every error is a ConfigError whose message names the file, the key and why, e.g.
``/etc/ossfuse/team.toml: encryption.cmk[0].private_key: no such file '/etc/ossfuse/x.pem'``.
"""
from __future__ import annotations

import dataclasses
import os
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from .envelope import EnvelopeError, parse_matdesc  # the format layer: no I/O, imports nothing of ours
from .integrity import LIST_DIR  # (a leaf too: the tag lists' directory name)


class ConfigError(Exception):
    """The configuration file is unreadable or invalid (message names file, key, reason)."""


@dataclass(frozen=True)
class StoreConfig:
    url: str  # "local:///path" or "oss://bucket"
    prefix: str = ""  # "" or ending in "/"
    endpoint: str | None = None
    region: str | None = None
    signature: str = "v4"
    credentials_file: str | None = None  # TOML with access_key_id/secret (mode 0600); else env, RAM role
    ram_role: str | None = None  # ECS RAM role name, or "auto" for the instance's role; unset: not used
    metadata_url: str = "http://100.100.100.200"  # ECS instance metadata service
    max_copy_size: int | None = None  # bytes CopyObject may copy (OSS: 1 GiB); larger objects stream
    retries: int = 5  # extra tries of one failed OSS request (5xx, resets, timeouts), with backoff
    request_deadline: float = 60.0  # seconds one OSS request may take with all its retries
    offline_timeout: float = 5.0  # seconds an unreachable store is retried before a request gets EIO

    @property
    def identity(self) -> str:
        """Which bucket this is, the same for every config naming it: ``oss://BUCKET`` (bucket
        names are unique across OSS, whatever the endpoint) or ``local://`` and the bucket
        directory's resolved path. The write-back journal tags each record with it."""
        if self.url.startswith("local://"):
            return "local://" + os.path.realpath(self.url[len("local://"):])
        return self.url


# OSS bucket names (shared/spec/oss-rest-api.md, "bucket name", DOC 185228), the rule of
# oss2.utils.is_valid_bucket_name (not imported: oss2 costs the CLI ~0.1 s to import)
_BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9-]{1,61}[a-z0-9]")


def _number(path: str, name: str, value) -> float:
    """``value`` as positive seconds, else ConfigError naming the setting."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= SECONDS_MAX:
        raise ConfigError(f"{path}: {name}: must be a positive number of seconds (at most {SECONDS_MAX}), "
                          f"not {value!r}")
    return float(value)


@dataclass(frozen=True)
class CmkConfig:
    id: str
    type: str  # "rsa" or "kms"
    private_key: str | None = None  # rsa: PKCS#1 or PKCS#8 PEM file
    matdesc: dict[str, str] | None = None
    # exact matdesc header text to write (parses to ``matdesc``); None: Go's json.Marshal form
    matdesc_text: str | None = None
    default_for_no_matdesc: bool = False  # reads objects that carry no matdesc
    key_id: str | None = None  # kms: the KMS key id or alias
    region: str | None = None  # kms
    endpoint: str | None = None  # kms: default https://kms.<region>.aliyuncs.com
    encoding: str = "oss2"  # kms: header encoding written, "oss2" (oss2 ≥ 2.11) or "raw" (Go, Java)
    passphrase: str | None = None  # kms: oss2's EncryptionContext {"x-passphrase": ...}
    credentials_file: str | None = None  # kms: own credentials (TOML, 0600); default: the mount's


@dataclass(frozen=True)
class RuleConfig:
    prefix: str
    encrypt_with: str


@dataclass(frozen=True)
class EncryptionConfig:
    encrypt_with: str
    cmks: tuple[CmkConfig, ...] = field(metadata={"toml": "cmk"})  # [[encryption.cmk]] tables
    rules: tuple[RuleConfig, ...] = field(default=(), metadata={"toml": "rule"})
    plaintext_objects: str = "show"  # objects without an envelope: "show" as they are, or "hide"


@dataclass(frozen=True)
class CacheConfig:
    dir: str
    block_size: int = 1 << 20  # bytes fetched per cache block
    max_size: int = 10 << 30  # bytes of cached ciphertext at most (staged files come on top)
    min_free: int = 512 << 20  # bytes kept free on the cache disk (least recently used blocks go first)


@dataclass(frozen=True)
class MountConfig:
    attr_timeout: float = 1.0  # seconds the kernel may cache attributes
    entry_timeout: float = 1.0  # seconds the kernel may cache name lookups
    multipart_threshold: int = 32 << 20  # bytes; larger objects use a multipart upload
    part_size: int = 8 << 20  # bytes; multiple of 16, grown to keep ≤ 10,000 parts
    upload_workers: int = 4  # objects uploaded at once
    part_workers: int = 4  # parts of one object uploaded at once
    startup_timeout: float = 60.0  # seconds to keep retrying an unreachable store at mount
    close_waits_for_upload: bool = False  # true: close() returns once the object is in the bucket
    retry_interval: float = 30.0  # seconds between background retries of a failed upload
    # seconds a closed file waits before its upload starts, so the chmod/utime/rename that cp -p,
    # tar and rsync do after close go into that one upload; None: 1 s, 0 on a local-directory bucket
    upload_delay: float | None = None
    uid: int | None = None  # owner of objects without x-oss-meta-uid (default: the mounter)
    gid: int | None = None
    umask: int | None = None  # set: masks every mode (objects without one, new files, dirs); unset: 022 for the former
    allow_other: bool = False
    # KiB the kernel reads ahead of a sequential reader (the mount's bdi read_ahead_kb; set as
    # root only). Larger reads mean fewer FUSE requests: the kernel default of 128 KiB makes one
    # request per 128 KiB. 0: leave the kernel's default.
    read_ahead_kib: int = 1024


@dataclass(frozen=True)
class Config:
    path: str
    store: StoreConfig
    encryption: EncryptionConfig
    cache: CacheConfig
    mount: MountConfig = field(default_factory=MountConfig)


def _toml_types(hint: Any) -> tuple[type, ...]:
    """The TOML value types a field of type ``hint`` accepts: ``X | None`` → those of X (None
    is the key left out), float → int or float (TOML ``1`` for ``1.0``), a tuple → an array,
    a dict → a table."""
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        return tuple(t for a in typing.get_args(hint) if a is not type(None) for t in _toml_types(a))
    if hint is float:
        return (int, float)
    if origin is tuple or hint is tuple:
        return (list,)
    if origin is dict or hint is dict:
        return (dict,)
    if hint in (str, int, bool):
        return (hint,)
    raise TypeError(f"no TOML type for {hint!r}")  # a new field of a new kind: teach this function


def _schema(cls: type) -> tuple[dict[str, tuple[type, ...]], tuple[str, ...]]:
    """A table's keys → accepted TOML types, and its required keys, derived from dataclass
    ``cls`` (a field's TOML key is its name, or its ``metadata["toml"]``)."""
    hints = typing.get_type_hints(cls)
    keys, required = {}, []
    for f in dataclasses.fields(cls):
        key = f.metadata.get("toml", f.name)
        keys[key] = _toml_types(hints[f.name])
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            required.append(key)
    return keys, tuple(required)


#: section → (key → accepted TOML types, required keys), from the dataclasses above.
_SCHEMA: dict[str, tuple[dict[str, tuple[type, ...]], tuple[str, ...]]] = {
    section: _schema(cls) for section, cls in (
        ("store", StoreConfig), ("encryption", EncryptionConfig), ("encryption.cmk", CmkConfig),
        ("encryption.rule", RuleConfig), ("cache", CacheConfig), ("mount", MountConfig))}

# options that were removed, and what replaced them (the message names the replacement)
_REPLACED = {"mount": {"upload_retries": "each store request is retried within store.request_deadline, "
                                         "and a failed upload again every mount.retry_interval seconds; "
                                         "remove the line"}}


def _check_table(path: str, section: str, where: str, table: Any) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: {where}: must be a table")
    schema, required = _SCHEMA[section]
    for key, value in table.items():
        if key in _REPLACED.get(section, {}):
            raise ConfigError(f"{path}: {where}.{key}: no longer an option: {_REPLACED[section][key]}")
        if key not in schema:
            raise ConfigError(f"{path}: {where}.{key}: unknown key (known: {', '.join(sorted(schema))})")
        want = schema[key]
        # bool is an int subclass in Python: refuse true/false where a number is wanted
        if not isinstance(value, want) or (isinstance(value, bool) and bool not in want):
            names = " or ".join(t.__name__ for t in want)
            raise ConfigError(f"{path}: {where}.{key}: must be {names}, not {type(value).__name__}")
    for key in required:
        if key not in table:
            raise ConfigError(f"{path}: {where}.{key}: required key missing")
    return table


def _check_matdesc_text(path: str, where: str, text: str, matdesc: dict[str, str] | None) -> dict[str, str]:
    """The matdesc map that ``matdesc_text`` (the exact header text to write) stands for. It must
    be a flat JSON object of strings, fit an HTTP header (printable ASCII: escape others as
    ``\\uXXXX``) and, when ``matdesc`` is given too, parse to the same map. Raises ConfigError."""
    key = f"{path}: {where}.matdesc_text"
    try:
        parsed = parse_matdesc(text)
    except EnvelopeError:
        raise ConfigError(f"{key}: must be a JSON object of string values, e.g. '{{\"team\": \"alpha\"}}', "
                          f"got {text!r}") from None
    if not parsed:
        raise ConfigError(f"{key}: an empty description is written as no header; remove the key")
    if not all(" " <= ch <= "~" for ch in text):
        raise ConfigError(f"{key}: must be printable ASCII (an OSS metadata header); "
                          "write other characters as \\uXXXX escapes")
    if matdesc is not None and parsed != matdesc:
        raise ConfigError(f"{key}: describes {parsed} but matdesc is {matdesc}; give one of them, "
                          "or make them equal")
    return parsed


def _check_key_file(path: str, where: str, key_path: str) -> None:
    """An RSA CMK's private key file: present, readable, mode 0600 or stricter (ConfigError)."""
    if not os.path.isfile(key_path):
        raise ConfigError(f"{path}: {where}.private_key: no such file {key_path!r}")
    if not os.access(key_path, os.R_OK):
        raise ConfigError(f"{path}: {where}.private_key: not readable {key_path!r}")
    try:
        with open(key_path, "rb") as f:
            head = f.read(64)
    except OSError as e:
        raise ConfigError(f"{path}: {where}.private_key: cannot read {key_path!r}: {e.strerror}") from None
    if b"-----BEGIN PUBLIC KEY-----" in head or b"-----BEGIN RSA PUBLIC KEY-----" in head:
        # before the mode check: a .pub file is world-readable, and "chmod 600 it" led nowhere
        raise ConfigError(f"{path}: {where}.private_key: {key_path!r} is a public key; name the private key "
                          f"(keygen writes it beside the .pub, without that suffix)")
    if os.stat(key_path).st_mode & 0o077:
        raise ConfigError(f"{path}: {where}.private_key: {key_path!r} is readable by group or others; "
                          f"chmod 600 it (a CMK must stay private)")


def load(path: str, *, missing_keys: bool = False) -> Config:
    """Read and check the TOML file at ``path``; raises ConfigError. ``missing_keys``: an RSA
    CMK's private key file may be missing (quickstart, which makes it)."""
    try:
        with open(path, "rb") as f:
            # TOML is UTF-8; a BOM (Windows editors) is taken off (tomllib refused it at column 1)
            raw = tomllib.loads(f.read().decode("utf-8-sig"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    except UnicodeDecodeError as e:  # a Latin-1 comment gave a traceback (a trial)
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start} is 0x{e.object[e.start]:02x}): save it as "
                          "UTF-8") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    for key in raw:
        if key not in ("store", "encryption", "cache", "mount"):
            raise ConfigError(f"{path}: {key}: unknown section (known: cache, encryption, mount, store)")
    for section in ("store", "encryption", "cache"):
        if section not in raw:
            raise ConfigError(f"{path}: [{section}]: required section missing")

    st = _check_table(path, "store", "store", raw["store"])
    url = st["url"]
    if not (url.startswith("local://") or url.startswith("oss://")):
        raise ConfigError(f"{path}: store.url: must start with local:// or oss://, got {url!r}")
    if url == "local://":
        raise ConfigError(f"{path}: store.url: local:// needs the bucket directory's path")
    if url.startswith("local://"):  # like every path here, relative to the config file
        url = "local://" + os.path.join(os.path.dirname(os.path.abspath(path)), url[len("local://"):])
    if url.startswith("oss://"):
        bucket, _, rest = url[len("oss://"):].partition("/")
        if not bucket:
            raise ConfigError(f"{path}: store.url: oss:// needs a bucket name")
        if rest:
            raise ConfigError(f"{path}: store.url: {url!r} names a path after the bucket; write "
                              f"\"oss://{bucket}\" and put the path in store.prefix")
        if not _BUCKET_NAME.fullmatch(bucket):  # oss2 refuses it with no reason given
            raise ConfigError(f"{path}: store.url: {bucket!r} is not a valid OSS bucket name (3 to 63 "
                              "characters: lower-case letters, digits and '-', starting with a letter or "
                              "digit and not ending with '-')")
        if "endpoint" not in st:
            raise ConfigError(f"{path}: store.endpoint: required for an oss:// store "
                              "(e.g. \"https://oss-cn-hangzhou.aliyuncs.com\")")
    creds = st.get("credentials_file")
    if creds is not None:
        creds = os.path.join(os.path.dirname(os.path.abspath(path)), creds)
        if not os.path.isfile(creds):
            raise ConfigError(f"{path}: store.credentials_file: no such file {creds!r}")
    prefix = st.get("prefix", "").lstrip("/")
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    for name in prefix.split("/")[:-1]:  # each a directory name the mount itself would accept
        if name in ("", ".", "..") or "\0" in name or len(name.encode()) > 255:
            raise ConfigError(f"{path}: store.prefix: {st['prefix']!r} has {name!r} as a directory name: "
                              "give names separated by single '/', none of them '.' or '..' nor over 255 "
                              "bytes (the mount would skip such a key in its listings)")
        if name == LIST_DIR:  # its objects are tag lists the mount's files name (a trial deleted one)
            raise ConfigError(f"{path}: store.prefix: {st['prefix']!r} names {LIST_DIR}, where ossfuse keeps "
                              "integrity tag lists (docs/integrity.md): no mount may show it")
    if st.get("signature", "v4") not in ("v1", "v4"):
        raise ConfigError(f"{path}: store.signature: must be \"v1\" or \"v4\"")
    if not 0 <= st.get("retries", 5) <= 100:
        raise ConfigError(f"{path}: store.retries: must be 0 to 100, got {st['retries']}")
    store = StoreConfig(url=url, prefix=prefix, endpoint=st.get("endpoint"), region=st.get("region"),
                        signature=st.get("signature", "v4"), credentials_file=creds,
                        ram_role=st.get("ram_role"), metadata_url=st.get("metadata_url", "http://100.100.100.200"),
                        max_copy_size=st.get("max_copy_size"), retries=st.get("retries", 5),
                        request_deadline=_number(path, "store.request_deadline", st.get("request_deadline", 60.0)),
                        offline_timeout=_number(path, "store.offline_timeout", st.get("offline_timeout", 5.0)))

    en = _check_table(path, "encryption", "encryption", raw["encryption"])
    cmks = []
    for i, c in enumerate(en["cmk"]):
        where = f"encryption.cmk[{i}]"
        c = _check_table(path, "encryption.cmk", where, c)
        base = os.path.dirname(os.path.abspath(path))
        md = c.get("matdesc")
        if md is not None and not all(isinstance(v, str) for v in md.values()):
            raise ConfigError(f"{path}: {where}.matdesc: values must be strings")
        md_text = c.get("matdesc_text")
        if md_text is not None:
            md = _check_matdesc_text(path, where, md_text, md)
        common = dict(id=c["id"], type=c["type"], matdesc=md, matdesc_text=md_text,
                      default_for_no_matdesc=c.get("default_for_no_matdesc", False))
        if c["type"] == "rsa":
            if "private_key" not in c:
                raise ConfigError(f"{path}: {where}.private_key: required for type \"rsa\"")
            key_path = os.path.join(base, c["private_key"])
            if not (missing_keys and not os.path.lexists(key_path)):
                _check_key_file(path, where, key_path)
            if "passphrase" in c:
                raise ConfigError(f"{path}: {where}.passphrase: applies to type \"kms\" only "
                                  "(RSA private keys must be unencrypted PEM files, mode 0600)")
            cmks.append(CmkConfig(private_key=key_path, **common))
        elif c["type"] == "kms":
            for k in ("key_id", "region"):
                if k not in c:
                    raise ConfigError(f"{path}: {where}.{k}: required for type \"kms\"")
            if c.get("encoding", "oss2") not in ("oss2", "raw"):
                raise ConfigError(f"{path}: {where}.encoding: must be \"oss2\" or \"raw\"")
            creds = c.get("credentials_file")
            if creds is not None:
                creds = os.path.join(base, creds)
                if not os.path.isfile(creds):
                    raise ConfigError(f"{path}: {where}.credentials_file: no such file {creds!r}")
            cmks.append(CmkConfig(key_id=c["key_id"], region=c["region"], endpoint=c.get("endpoint"),
                                  encoding=c.get("encoding", "oss2"), passphrase=c.get("passphrase"),
                                  credentials_file=creds, **common))
        else:
            raise ConfigError(f"{path}: {where}.type: unknown CMK type {c['type']!r} (known: kms, rsa)")
    ids = [c.id for c in cmks]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"{path}: encryption.cmk: duplicate id")
    if en["encrypt_with"] not in ids:
        raise ConfigError(f"{path}: encryption.encrypt_with: no CMK with id {en['encrypt_with']!r}")
    rules = []
    for i, r in enumerate(en.get("rule", [])):
        r = _check_table(path, "encryption.rule", f"encryption.rule[{i}]", r)
        if r["encrypt_with"] not in ids:
            raise ConfigError(f"{path}: encryption.rule[{i}].encrypt_with: no CMK with id {r['encrypt_with']!r}")
        rules.append(RuleConfig(prefix=r["prefix"].lstrip("/"), encrypt_with=r["encrypt_with"]))
    if en.get("plaintext_objects", "show") not in ("show", "hide"):
        raise ConfigError(f"{path}: encryption.plaintext_objects: must be \"show\" or \"hide\"")
    encryption = EncryptionConfig(encrypt_with=en["encrypt_with"], cmks=tuple(cmks), rules=tuple(rules),
                                  plaintext_objects=en.get("plaintext_objects", "show"))

    ca = _check_table(path, "cache", "cache", raw["cache"])
    if not ca["dir"].strip():  # the config file's own directory (/etc/ossfuse, beside the CMKs: a trial)
        raise ConfigError(f"{path}: cache.dir: must name a directory")
    bs = ca.get("block_size", 1 << 20)
    if bs < 4096 or bs % 4096:
        raise ConfigError(f"{path}: cache.block_size: must be a multiple of 4096 bytes")
    cache = CacheConfig(dir=os.path.join(os.path.dirname(os.path.abspath(path)), ca["dir"]), block_size=bs,
                        max_size=ca.get("max_size", 10 << 30), min_free=ca.get("min_free", 512 << 20))
    if cache.max_size < 4 * bs:
        raise ConfigError(f"{path}: cache.max_size: must be at least 4 blocks of cache.block_size "
                          f"({4 * bs} bytes), got {cache.max_size}")
    if cache.min_free < 0:
        raise ConfigError(f"{path}: cache.min_free: must not be negative, got {cache.min_free}")
    if url.startswith("local://") and (why := _overlap(cache.dir, url[len("local://"):])):
        raise ConfigError(f"{path}: cache.dir {cache.dir} {why} the bucket directory of store.url; "
                          "ossfuse manages both (the bucket's sweep would take the cache's files for "
                          "objects, the cache's eviction the bucket's): give them separate directories")

    mo = _check_table(path, "mount", "mount", raw.get("mount", {}))
    mount = MountConfig(**mo)
    for k in ("attr_timeout", "entry_timeout", "upload_delay", "startup_timeout", "retry_interval"):
        if getattr(mount, k) is not None and getattr(mount, k) != getattr(mount, k):
            raise ConfigError(f"{path}: mount.{k}: must be a number of seconds, got nan")
        if getattr(mount, k) is not None and getattr(mount, k) < 0:
            raise ConfigError(f"{path}: mount.{k}: must not be negative")
        if getattr(mount, k) is not None and getattr(mount, k) > SECONDS_MAX:
            raise ConfigError(f"{path}: mount.{k}: must be at most {SECONDS_MAX} seconds, got {getattr(mount, k)}")
    if mount.retry_interval < RETRY_INTERVAL_MIN:  # 0 retried a failing upload in a busy loop (a trial)
        raise ConfigError(f"{path}: mount.retry_interval: must be at least {RETRY_INTERVAL_MIN} seconds, got "
                          f"{mount.retry_interval}")
    for k in ("uid", "gid"):
        if (why := id_error(getattr(mount, k))) is not None:
            raise ConfigError(f"{path}: mount.{k}: {why}")
    if mount.umask is not None and not 0 <= mount.umask <= 0o777:
        raise ConfigError(f"{path}: mount.umask: must be 0 to 0o777, got {mount.umask:#o}")
    if mount.part_size % 16 or mount.part_size < 100 * 1024:
        raise ConfigError(f"{path}: mount.part_size: must be a multiple of 16 and at least 102400 bytes")
    for k in ("upload_workers", "part_workers"):
        if getattr(mount, k) < 1:
            raise ConfigError(f"{path}: mount.{k}: must be at least 1")
    if not 0 <= mount.read_ahead_kib <= 1 << 20:
        raise ConfigError(f"{path}: mount.read_ahead_kib: must be 0 (the kernel's default) to 1048576 KiB")
    return Config(path=os.path.abspath(path), store=store, encryption=encryption, cache=cache, mount=mount)


RETRY_INTERVAL_MIN = 0.1  # seconds
SECONDS_MAX = 10**7  # ~115 days: a longer time setting is a typo (and 1e308 overflowed the mount's wait)
_ID_MAX = 2**32 - 2  # uid_t/gid_t; 2^32 - 1 is (uid_t)-1, "no owner"


def id_error(value: int | None) -> str | None:
    """Why ``value`` is no uid or gid (one phrase), or None (None: not set, fine)."""
    if value is not None and not 0 <= value <= _ID_MAX:
        return f"must be 0 to {_ID_MAX}, got {value}"
    return None


def _overlap(a: str, b: str) -> str | None:
    """How directory ``a`` overlaps directory ``b`` ("is", "is inside", "holds"), compared as
    real paths (symlinks resolved as far as they exist); None when neither holds the other."""
    ra, rb = os.path.realpath(a), os.path.realpath(b)
    if ra == rb:
        return "is"
    if ra.startswith(rb.rstrip("/") + "/"):
        return "is inside"
    if rb.startswith(ra.rstrip("/") + "/"):
        return "holds"
    return None


def dir_inside_mountpoint(cfg: Config, mountpoint: str) -> str | None:
    """Why ``cfg`` cannot be mounted at ``mountpoint`` because its cache dir or local bucket
    directory is at or below it (the daemon would wait on its own mount for them: a lookup
    through the mount it serves never returns; and the mount point would not be empty), or
    None. Compares real paths (symlinks resolved as far as the paths exist); call it before
    mounting, while the mount point is a plain directory."""
    dirs = [("cache dir (cache.dir)", cfg.cache.dir)]
    if cfg.store.url.startswith("local://"):
        dirs.append(("bucket directory (store.url)", cfg.store.url[len("local://"):]))
    for what, d in dirs:
        how = _overlap(d, mountpoint)
        if how in ("is", "is inside"):
            return (f"{cfg.path}: the {what} {d} {how} the mount point {os.path.abspath(mountpoint)}: the mount "
                    f"would hide it from ossfuse itself; choose a directory outside it")
        if how == "holds":
            # the daemon walks these directories (the local bucket's orphan sweep, the cache's
            # eviction): into its own mount, where nobody answers it (a new-user trial mounted
            # a local bucket inside its own directory)
            return (f"{cfg.path}: the mount point {os.path.abspath(mountpoint)} is inside the {what} {d}, which "
                    f"ossfuse manages; choose a mount point outside it")
    return None
