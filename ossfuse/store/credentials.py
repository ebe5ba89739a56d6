"""Where the OSS access key comes from. Never from the command line (argv is world-readable
in ``/proc``).

Sources (each a :class:`CredentialsProvider`; all are thread-safe, since oss2 asks for
credentials from its worker threads on every request it signs):

* :class:`EnvCredentialsProvider`: ``OSS_ACCESS_KEY_ID``, ``OSS_ACCESS_KEY_SECRET`` and, for STS
  credentials, ``OSS_SESSION_TOKEN`` (the variable names oss2's own
  ``EnvironmentVariableCredentialsProvider`` reads).
* :class:`FileCredentialsProvider`: a TOML file that must be mode 0600 or stricter (no bit for
  group or others) and is refused otherwise::

      # /etc/ossfuse/credentials.toml   (chmod 600)
      access_key_id = "LTAI..."
      access_key_secret = "..."
      security_token = "..."          # optional, for STS credentials

  The file is re-read when its mtime or size changes (checked at most every
  ``recheck_interval`` seconds), so a rotated key is picked up without a restart.
* :class:`EcsRamRoleCredentialsProvider` (the ECS instance's RAM role over the hardened metadata
  service, STS credential refreshed before it expires) and :class:`UriCredentialsProvider`
  (``ALIBABA_CLOUD_CREDENTIALS_URI``): thin adapters over the official ``alibabacloud-credentials``
  library, which does the fetching, caching and refreshing.
* :class:`CredentialChain`: explicit file → environment → credentials URI → RAM role, chosen on
  first use.

:class:`Oss2CredentialsProvider` adapts any of them to oss2's provider interface so that
``oss2.ProviderAuth`` / ``oss2.ProviderAuthV4`` sign every request with the *current*
credentials (a refreshed STS token is used without rebuilding the ``oss2.Bucket``); a security
token becomes the ``x-oss-security-token`` header (oss-rest-api.md §6.1).
"""
from __future__ import annotations

import abc
import logging
import os
import re
import stat
import threading
import time
import tomllib
import urllib.parse
from dataclasses import dataclass
from typing import Mapping

import oss2.credentials

from .base import StoreError

log = logging.getLogger(__name__)

#: The ECS instance metadata service.
DEFAULT_IMDS_URL = "http://100.100.100.200"


class CredentialsError(StoreError):
    """No usable credentials: missing, malformed, a credentials file with unsafe permissions,
    or the metadata service failed and no unexpired credential is left. Permanent (retrying
    cannot fix a missing or unsafe file) unless made with ``temporary=True`` (the metadata
    service was unreachable or answered 5xx). ``code`` is ``NoCredentials``."""

    def __init__(self, message: str, *, temporary: bool | None = None, **kw):
        kw.setdefault("code", "NoCredentials")
        super().__init__(message, temporary=temporary, **kw)


@dataclass(frozen=True)
class Credentials:
    """One access key. ``security_token`` is set for STS credentials; ``expiration`` is seconds
    since the epoch (None: does not expire)."""

    access_key_id: str
    access_key_secret: str
    security_token: str | None = None
    expiration: float | None = None

    def __repr__(self) -> str:  # never print the secret
        return (f"Credentials(access_key_id={self.access_key_id!r}, access_key_secret='***', "
                f"security_token={'***' if self.security_token else None}, expiration={self.expiration})")


class CredentialsProvider(abc.ABC):
    """Hands out the current :class:`Credentials`; called once per signed request, from any thread."""

    @abc.abstractmethod
    def get_credentials(self) -> Credentials:
        """The credentials to sign the next request with; raises CredentialsError."""

    def describe(self) -> str:
        """Where the credentials come from, for logs (never the secret)."""
        return type(self).__name__


class StaticCredentialsProvider(CredentialsProvider):
    """Fixed credentials (tests, or a caller that already has them)."""

    def __init__(self, access_key_id: str, access_key_secret: str, security_token: str | None = None):
        if not access_key_id or not access_key_secret:
            raise CredentialsError("access key id and secret must both be non-empty")
        self._creds = Credentials(access_key_id, access_key_secret, security_token or None)

    def get_credentials(self) -> Credentials:
        return self._creds

    def describe(self) -> str:
        return f"static key {self._creds.access_key_id}"


#: The variable names of oss2 (``EnvironmentVariableCredentialsProvider``): id, secret, STS token.
OSS_ENV = ("OSS_ACCESS_KEY_ID", "OSS_ACCESS_KEY_SECRET", "OSS_SESSION_TOKEN")
#: The names of Alibaba Cloud's other SDKs, CLI and alibabacloud-credentials.
ALIBABA_CLOUD_ENV = ("ALIBABA_CLOUD_ACCESS_KEY_ID", "ALIBABA_CLOUD_ACCESS_KEY_SECRET", "ALIBABA_CLOUD_SECURITY_TOKEN")


class EnvCredentialsProvider(CredentialsProvider):
    """An access key from environment variables ``names`` (id, secret, optional STS token;
    default :data:`OSS_ENV`), read once at construction from ``environ`` (default ``os.environ``).
    Raises CredentialsError when the id or the secret is missing or empty."""

    def __init__(self, environ: Mapping[str, str] | None = None, names: tuple[str, str, str] = OSS_ENV):
        env = os.environ if environ is None else environ
        id_name, secret_name, token_name = names
        ak, sk = env.get(id_name, "").strip(), env.get(secret_name, "").strip()
        if not ak or not sk:
            missing = [n for n, v in ((id_name, ak), (secret_name, sk)) if not v]
            raise CredentialsError("environment credentials incomplete: " + ", ".join(missing) + " not set")
        self._creds = Credentials(ak, sk, env.get(token_name, "").strip() or None)
        self._names = names

    @staticmethod
    def available(environ: Mapping[str, str] | None = None, names: tuple[str, str, str] = OSS_ENV) -> bool:
        """True when the id variable of ``names`` is set (the chain then commits to it)."""
        env = os.environ if environ is None else environ
        return bool(env.get(names[0], "").strip())

    def get_credentials(self) -> Credentials:
        return self._creds

    def describe(self) -> str:
        return f"environment {self._names[0]} (key {self._creds.access_key_id})"


class FileCredentialsProvider(CredentialsProvider):
    """The TOML credentials file described in the module docstring.

    Raises CredentialsError (at construction and on a later re-read) when the file is missing,
    is not a regular file, grants any permission to group or others (mode & 0o077), is not valid
    TOML, or lacks ``access_key_id`` / ``access_key_secret``. A re-read that fails keeps the
    previous credentials and logs a warning."""

    def __init__(self, path: str, *, recheck_interval: float = 10.0):
        self.path = os.path.abspath(os.path.expanduser(path))
        self._recheck = recheck_interval
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._checked = 0.0
        self._creds = self._load()

    def _load(self) -> Credentials:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise CredentialsError(f"credentials file {self.path}: cannot open: {e.strerror}") from None
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())  # checked on the open file: no race with a chmod/rename
            if not stat.S_ISREG(st.st_mode):
                raise CredentialsError(f"credentials file {self.path}: not a regular file")
            mode = stat.S_IMODE(st.st_mode)
            if mode & 0o077:
                raise CredentialsError(
                    f"credentials file {self.path} has mode {mode:04o}: refusing to use it because group or "
                    f"others may read it; it must be 0600 or stricter (run: chmod 600 {self.path})")
            raw = f.read()
        try:
            doc = tomllib.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
            raise CredentialsError(f"credentials file {self.path}: not valid TOML: {e}") from None
        ak, sk, tok = doc.get("access_key_id"), doc.get("access_key_secret"), doc.get("security_token")
        for name, v in (("access_key_id", ak), ("access_key_secret", sk)):
            if not isinstance(v, str) or not v.strip():
                raise CredentialsError(f"credentials file {self.path}: {name} missing or empty")
        if tok is not None and not isinstance(tok, str):
            raise CredentialsError(f"credentials file {self.path}: security_token must be a string")
        self._stamp = (st.st_mtime_ns, st.st_size)
        self._checked = time.monotonic()
        assert isinstance(ak, str) and isinstance(sk, str)  # checked above
        return Credentials(ak.strip(), sk.strip(), (tok or "").strip() or None)

    def get_credentials(self) -> Credentials:
        now = time.monotonic()
        if now - self._checked < self._recheck:
            return self._creds
        with self._lock:
            if now - self._checked < self._recheck:
                return self._creds
            self._checked = now
            try:
                st = os.stat(self.path)
                if (st.st_mtime_ns, st.st_size) != self._stamp:
                    self._creds = self._load()
                    log.info("credentials file %s re-read (key %s)", self.path, self._creds.access_key_id)
            except (OSError, CredentialsError) as e:
                log.warning("credentials file %s: keeping the previous credentials: %s", self.path, e)
            return self._creds

    def describe(self) -> str:
        return f"file {self.path} (key {self._creds.access_key_id})"


def _http_code(message: str) -> int | None:
    """The HTTP status in an alibabacloud-credentials error text (``... HttpCode=404``), else None."""
    m = re.search(r"HttpCode=(\d{3})", message)
    return int(m.group(1)) if m else None


class LibraryCredentialsProvider(CredentialsProvider):
    """Adapter: a provider of ``alibabacloud-credentials`` (the official Alibaba Cloud credentials
    library: ECS RAM role, credentials URI, …, each with its own cache and refresh before expiry)
    as an ossfuse :class:`CredentialsProvider`.

    ``get_credentials`` raises CredentialsError when the library raises: temporary unless the
    error names an HTTP 4xx status other than 401/403/429 (a role that does not exist, a
    malformed request: asking again cannot help)."""

    def __init__(self, provider, what: str):
        self.provider = provider  # an alibabacloud_credentials_api.ICredentialsProvider
        self.what = what
        self._last_id: str | None = None

    def get_credentials(self) -> Credentials:
        try:
            c = self.provider.get_credentials()
        except Exception as e:  # the library raises CredentialException, requests' and ValueError
            text = " ".join(str(getattr(e, "message", None) or e).split()) or type(e).__name__
            code = _http_code(text)
            permanent = code is not None and 400 <= code < 500 and code not in (401, 403, 429)
            raise CredentialsError(f"{self.what}: {text}", temporary=not permanent) from None
        creds = Credentials(c.get_access_key_id(), c.get_access_key_secret(), c.get_security_token() or None,
                            float(c.get_expiration()) if c.get_expiration() else None)
        if creds.access_key_id != self._last_id:
            self._last_id = creds.access_key_id
            log.info("%s: credentials %s, valid until %s", self.what, creds.access_key_id, creds.expiration)
        return creds

    def describe(self) -> str:
        return self.what


def _quiet_library_logger() -> None:
    """alibabacloud-credentials adds a stderr handler to its ``credentials`` logger on import:
    drop it, so its warnings go through ossfuse's own logging (journald) once, not twice."""
    logging.getLogger("credentials").handlers.clear()


class EcsRamRoleCredentialsProvider(LibraryCredentialsProvider):
    """STS credentials of the ECS instance's RAM role, from alibabacloud-credentials'
    ``EcsRamRoleCredentialsProvider`` in hardened mode (IMDSv2: ``PUT /latest/api/token``, then
    the role name and its credentials with ``X-aliyun-ecs-metadata-token``; no fall-back to
    token-less requests). The library caches the credential and fetches a new one from 15 min
    before its ``Expiration`` (at once for a shorter-lived one); a failed refresh keeps a
    credential that has not expired.

    :param role: the role name; None asks the metadata service (or ``ALIBABA_CLOUD_ECS_METADATA``).
    :param base_url: metadata service root, ``http://HOST[:PORT]`` (tests point it at a local
        stand-in).
    :param timeout: connect and read timeout of each metadata request, seconds.

    Unlike the hand-written client it replaced, the library sends metadata requests through
    ``HTTP_PROXY`` when that is set in the environment (it has no way to bypass it).
    """

    def __init__(self, role: str | None = None, *, base_url: str = DEFAULT_IMDS_URL, timeout: float = 2.0):
        from alibabacloud_credentials.http import HttpOptions
        from alibabacloud_credentials.provider.ecs_ram_role import EcsRamRoleCredentialsProvider as LibEcs
        _quiet_library_logger()
        url = urllib.parse.urlsplit(base_url)
        if url.scheme != "http" or not url.netloc or url.path.strip("/"):
            raise CredentialsError(f"metadata_url {base_url!r}: must be http://HOST[:PORT]")
        ms = max(1, int(timeout * 1000))
        # async_update_enabled=False: no APScheduler thread per provider; the caller that finds the
        # credential due for a refresh fetches it (bounded by the timeouts above).
        lib = LibEcs(role_name=role or None, disable_imds_v1=True, async_update_enabled=False,
                     http_options=HttpOptions(connect_timeout=ms, read_timeout=ms))
        # The library has no option for the metadata host (always 100.100.100.200): set its
        # private attribute so store.metadata_url is honoured. test_ram_role_* fail if it moves.
        attr = "_EcsRamRoleCredentialsProvider__metadata_service_host"
        if not hasattr(lib, attr):
            raise CredentialsError("alibabacloud-credentials changed: cannot set the metadata service host")
        setattr(lib, attr, url.netloc)
        self.role = role
        self.base_url = base_url
        super().__init__(lib, f"ECS RAM role {role or '(auto)'} via {base_url}")


class UriCredentialsProvider(LibraryCredentialsProvider):
    """Credentials served over HTTP at ``uri`` (``ALIBABA_CLOUD_CREDENTIALS_URI``: a JSON object
    with ``Code``, ``AccessKeyId``, ``AccessKeySecret``, ``SecurityToken``, ``Expiration``), from
    alibabacloud-credentials' ``URLCredentialsProvider`` (cached, refreshed before expiry)."""

    def __init__(self, uri: str, *, timeout: float = 5.0):
        from alibabacloud_credentials.http import HttpOptions
        from alibabacloud_credentials.provider.uri import URLCredentialsProvider
        _quiet_library_logger()
        ms = max(1, int(timeout * 1000))
        lib = URLCredentialsProvider(uri=uri, http_options=HttpOptions(connect_timeout=ms, read_timeout=ms))
        super().__init__(lib, f"credentials URI {uri}")


class CredentialChain(CredentialsProvider):
    """The mount's credential sources in this order, decided on the first ``get_credentials``
    (or ``resolve()``) and then fixed:

    * ``file`` given: only that file. An unusable file (wrong mode, missing keys) is an error,
      never a silent fall-through to another source.
    * else, ``OSS_ACCESS_KEY_ID`` set in ``environ`` (default ``os.environ``): the environment
      (oss2's names; incomplete → error); else ``ALIBABA_CLOUD_ACCESS_KEY_ID`` (the names of
      Alibaba Cloud's other SDKs and CLI, with ``ALIBABA_CLOUD_ACCESS_KEY_SECRET`` /
      ``ALIBABA_CLOUD_SECURITY_TOKEN``).
    * else ``ALIBABA_CLOUD_CREDENTIALS_URI``: :class:`UriCredentialsProvider`.
    * else, if ``ram_role`` is true: the instance's RAM role (``role``, ``imds_url``,
      ``imds_timeout`` as in :class:`EcsRamRoleCredentialsProvider`).

    Raises CredentialsError naming every source tried when none gives credentials.
    """

    def __init__(self, file: str | None = None, *, environ: Mapping[str, str] | None = None,
                 ram_role: bool = True, role: str | None = None, imds_url: str = DEFAULT_IMDS_URL,
                 imds_timeout: float = 2.0):
        self.file = file
        self.environ = environ
        self.ram_role = ram_role
        self.role = role
        self.imds_url = imds_url
        self.imds_timeout = imds_timeout
        self._lock = threading.Lock()
        self._provider: CredentialsProvider | None = None

    def resolve(self) -> CredentialsProvider:
        """Pick the source (once) and return its provider; raises CredentialsError."""
        if self._provider is not None:
            return self._provider
        with self._lock:
            if self._provider is None:
                self._provider = self._pick()
                log.info("OSS credentials from %s", self._provider.describe())
            return self._provider

    def _pick(self) -> CredentialsProvider:
        env = os.environ if self.environ is None else self.environ
        if self.file:
            return FileCredentialsProvider(self.file)
        if EnvCredentialsProvider.available(env):
            return EnvCredentialsProvider(env)
        if EnvCredentialsProvider.available(env, ALIBABA_CLOUD_ENV):
            return EnvCredentialsProvider(env, ALIBABA_CLOUD_ENV)
        uri = env.get("ALIBABA_CLOUD_CREDENTIALS_URI", "").strip()
        if uri:
            prov: CredentialsProvider = UriCredentialsProvider(uri)
        elif not self.ram_role:
            raise CredentialsError("no OSS credentials: no credentials file configured and OSS_ACCESS_KEY_ID "
                                   "is not set (the ECS RAM role is disabled)")
        else:
            prov = EcsRamRoleCredentialsProvider(self.role, base_url=self.imds_url, timeout=self.imds_timeout)
        try:
            prov.get_credentials()
        except CredentialsError as e:
            raise CredentialsError("no OSS credentials: no credentials file configured, OSS_ACCESS_KEY_ID is "
                                   f"not set, and the {prov.describe()} failed: {e}", temporary=e.temporary) from None
        return prov

    def get_credentials(self) -> Credentials:
        return self.resolve().get_credentials()

    def describe(self) -> str:
        return self._provider.describe() if self._provider else "credential chain (unresolved)"


class Oss2CredentialsProvider(oss2.credentials.CredentialsProvider):
    """Adapter: an ossfuse :class:`CredentialsProvider` as an oss2 credentials provider, for
    ``oss2.ProviderAuth`` (V1) / ``oss2.ProviderAuthV4`` (V4). Asked on every signed request."""

    def __init__(self, provider: CredentialsProvider):
        self.provider = provider

    def get_credentials(self) -> oss2.credentials.Credentials:
        c = self.provider.get_credentials()
        return oss2.credentials.Credentials(c.access_key_id, c.access_key_secret, c.security_token or "")
