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
* :class:`EcsRamRoleCredentialsProvider`: the RAM role attached to the ECS instance, from the
  instance metadata service in hardened (token) mode: ``PUT /latest/api/token`` with
  ``X-aliyun-ecs-metadata-token-ttl-seconds``, then, carrying ``X-aliyun-ecs-metadata-token``,
  ``GET /latest/meta-data/ram/security-credentials/`` (the role name) and
  ``GET /latest/meta-data/ram/security-credentials/<role>`` (JSON ``Code``, ``AccessKeyId``,
  ``AccessKeySecret``, ``SecurityToken``, ``Expiration`` as ``YYYY-MM-DDTHH:MM:SSZ`` UTC).
  The STS credential is refreshed before it expires (see the class).
* :class:`CredentialChain`: explicit file → environment → RAM role, chosen on first use.

:class:`Oss2CredentialsProvider` adapts any of them to oss2's provider interface so that
``oss2.ProviderAuth`` / ``oss2.ProviderAuthV4`` sign every request with the *current*
credentials (a refreshed STS token is used without rebuilding the ``oss2.Bucket``); a security
token becomes the ``x-oss-security-token`` header (oss-rest-api.md §6.1).
"""
from __future__ import annotations

import abc
import json
import logging
import os
import stat
import threading
import time
import tomllib
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Mapping

import oss2.credentials

from ..retry import Budget, RetryPolicy, retry_sync
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


class EnvCredentialsProvider(CredentialsProvider):
    """``OSS_ACCESS_KEY_ID`` / ``OSS_ACCESS_KEY_SECRET`` / ``OSS_SESSION_TOKEN`` (optional), read once
    at construction from ``environ`` (default ``os.environ``). Raises CredentialsError when the id
    or the secret is missing or empty."""

    def __init__(self, environ: Mapping[str, str] | None = None):
        env = os.environ if environ is None else environ
        ak, sk = env.get("OSS_ACCESS_KEY_ID", "").strip(), env.get("OSS_ACCESS_KEY_SECRET", "").strip()
        if not ak or not sk:
            missing = [n for n, v in (("OSS_ACCESS_KEY_ID", ak), ("OSS_ACCESS_KEY_SECRET", sk)) if not v]
            raise CredentialsError("environment credentials incomplete: " + ", ".join(missing) + " not set")
        self._creds = Credentials(ak, sk, env.get("OSS_SESSION_TOKEN", "").strip() or None)

    @staticmethod
    def available(environ: Mapping[str, str] | None = None) -> bool:
        """True when ``OSS_ACCESS_KEY_ID`` is set (the chain then commits to the environment)."""
        env = os.environ if environ is None else environ
        return bool(env.get("OSS_ACCESS_KEY_ID", "").strip())

    def get_credentials(self) -> Credentials:
        return self._creds

    def describe(self) -> str:
        return f"environment (key {self._creds.access_key_id})"


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
        assert isinstance(ak, str) and isinstance(sk, str)  # checked just above (for the type checker)
        if tok is not None and not isinstance(tok, str):
            raise CredentialsError(f"credentials file {self.path}: security_token must be a string")
        self._stamp = (st.st_mtime_ns, st.st_size)
        self._checked = time.monotonic()
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


def _parse_expiration(value: str) -> float:
    """``2017-11-01T05:20:01Z`` (the ECS metadata format; fractional seconds tolerated) → epoch s."""
    v = value.strip()
    if v.endswith("Z"):
        v = v[:-1] + "+00:00"
    dt = datetime.fromisoformat(v)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


class EcsRamRoleCredentialsProvider(CredentialsProvider):
    """STS credentials of the ECS instance's RAM role (module docstring for the protocol).

    :param role: the role name; None asks the metadata service (or ``ALIBABA_CLOUD_ECS_METADATA``).
    :param base_url: metadata service root (tests point it at a local stand-in).
    :param token_ttl: seconds the metadata token is requested for (1..21600).
    :param timeout: seconds per metadata HTTP request; ``attempts`` tries per fetch.
    :param refresh_margin: refresh when ``expiration - now`` falls below
        ``min(refresh_margin, 0.2 * lifetime)`` seconds, lifetime being the expiration minus the
        fetch time (so a 6 h credential is renewed 15 min early, a 10 s one 2 s early).
    :param retry_interval: after a failed refresh, wait this long before asking again; meanwhile
        the still-valid old credential is used.
    :param imds_v1_fallback: if the token PUT fails, go on without a token (normal mode).
        Off by default: hardened mode only.

    Raises CredentialsError when no credential can be fetched and none is still valid.
    """

    _TOKEN_PATH = "/latest/api/token"
    _CREDS_PATH = "/latest/meta-data/ram/security-credentials/"

    def __init__(self, role: str | None = None, *, base_url: str = DEFAULT_IMDS_URL, token_ttl: int = 21600,
                 timeout: float = 2.0, attempts: int = 3, refresh_margin: float = 900.0,
                 retry_interval: float = 10.0, imds_v1_fallback: bool = False):
        self.role = role or os.environ.get("ALIBABA_CLOUD_ECS_METADATA") or None
        self.base_url = base_url.rstrip("/")
        self.token_ttl = max(1, min(int(token_ttl), 21600))
        self.timeout = timeout
        self.attempts = max(1, attempts)
        self.refresh_margin = refresh_margin
        self.retry_interval = retry_interval
        self.imds_v1_fallback = imds_v1_fallback
        self._lock = threading.Lock()
        self._creds: Credentials | None = None
        self._refresh_at = 0.0       # wall-clock seconds
        self._next_try = 0.0         # after a failed refresh
        self._token: str | None = None
        self._token_until = 0.0
        #: number of successful credential fetches (tests observe refreshes through it)
        self.fetch_count = 0

    # -- HTTP -------------------------------------------------------------------------------
    def _http(self, method: str, path: str, headers: dict[str, str], timeout: float | None = None) -> str:
        req = urllib.request.Request(self.base_url + path, method=method, headers=headers,
                                     data=b"" if method == "PUT" else None)
        # the metadata service is link-local: never go through an HTTP proxy from the environment
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(req, timeout=timeout or self.timeout) as resp:
            return resp.read().decode("utf-8")

    def _get_token(self, timeout: float | None = None) -> str | None:
        now = time.time()
        if self._token and now < self._token_until:
            return self._token
        try:
            tok = self._http("PUT", self._TOKEN_PATH,
                             {"X-aliyun-ecs-metadata-token-ttl-seconds": str(self.token_ttl)}, timeout).strip()
        except (urllib.error.URLError, OSError) as e:
            if self.imds_v1_fallback:
                log.warning("ECS metadata token request failed (%s); continuing without a token", e)
                return None
            raise CredentialsError(f"ECS metadata service {self.base_url}: token request failed: {e}",
                                   temporary=True) from None
        self._token = tok
        self._token_until = now + self.token_ttl * 0.8
        return tok

    def _fetch_once(self, timeout: float | None = None) -> Credentials:
        """One try; CredentialsError says whether another may help (``temporary``)."""
        token = self._get_token(timeout)
        headers = {"X-aliyun-ecs-metadata-token": token} if token else {}
        try:
            role = self.role
            if not role:
                lines = self._http("GET", self._CREDS_PATH, headers, timeout).split()
                if not lines:
                    raise CredentialsError("no RAM role is attached to this ECS instance")
                role = lines[0].strip()
            body = self._http("GET", self._CREDS_PATH + urllib.parse.quote(role, safe=""), headers, timeout)
        except urllib.error.HTTPError as e:
            if e.code in (401, 403):
                self._token = None  # an expired or rejected token: ask for a new one next time
            raise CredentialsError(f"ECS metadata service {self.base_url}: HTTP {e.code} {e.reason}",
                                   temporary=e.code in (401, 403, 429) or e.code >= 500) from None
        try:
            doc = json.loads(body)
            if doc.get("Code", "Success") != "Success":
                raise CredentialsError(f"ECS metadata service: role {role}: Code={doc.get('Code')}",
                                       temporary=True)
            creds = Credentials(doc["AccessKeyId"], doc["AccessKeySecret"], doc.get("SecurityToken") or None,
                                _parse_expiration(doc["Expiration"]) if doc.get("Expiration") else None)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CredentialsError(f"ECS metadata service: role {role}: malformed credentials: {e!r}") from None
        if not self.role:
            self.role = role
        return creds

    def _fetch(self) -> Credentials:
        """One credential fetch under the shared retry policy (``ossfuse.retry``): ``attempts``
        tries, 0.1 s backoff doubling to 1 s with jitter, within ``attempts × (timeout + 1)``
        seconds. An unreachable service, a timeout, a 5xx or a rejected token (401/403: a new
        one is asked for) are retried; a missing role or malformed answer fails at once."""
        policy = RetryPolicy(attempts=self.attempts, deadline=self.attempts * (self.timeout + 1.0),
                             backoff=0.1, backoff_max=1.0)

        def attempt(budget: Budget) -> Credentials:
            try:
                return self._fetch_once(budget.timeout(self.timeout))
            except (urllib.error.URLError, OSError) as e:
                raise CredentialsError(f"ECS metadata service {self.base_url} unreachable: "
                                       f"{getattr(e, 'reason', None) or e}", temporary=True) from None

        return retry_sync(policy, attempt)

    # -- provider ---------------------------------------------------------------------------
    def get_credentials(self) -> Credentials:
        now = time.time()
        creds = self._creds
        if creds is not None and now < self._refresh_at:
            return creds
        with self._lock:
            now = time.time()
            creds = self._creds
            if creds is not None and now < self._refresh_at:
                return creds
            if creds is not None and now < self._next_try and (creds.expiration is None or now < creds.expiration):
                return creds  # a refresh failed a moment ago: use the old one until it expires
            try:
                new = self._fetch()
            except CredentialsError as e:
                if creds is not None and (creds.expiration is None or now < creds.expiration):
                    self._next_try = now + self.retry_interval
                    log.warning("RAM role credential refresh failed, using the current one until %s: %s",
                                creds.expiration, e)
                    return creds
                raise
            self.fetch_count += 1
            if new.expiration is None:
                self._refresh_at = now + 3600.0
            else:
                lifetime = max(0.0, new.expiration - now)
                self._refresh_at = new.expiration - min(self.refresh_margin, 0.2 * lifetime)
            self._creds = new
            log.info("RAM role %s: credentials %s fetched, valid until %s", self.role, new.access_key_id,
                     new.expiration)
            return new

    def describe(self) -> str:
        return f"ECS RAM role {self.role or '(auto)'} via {self.base_url}"


class CredentialChain(CredentialsProvider):
    """Explicit file → environment → ECS RAM role, decided on the first ``get_credentials`` (or
    ``resolve()``) and then fixed:

    * ``file`` given: only that file. An unusable file (wrong mode, missing keys) is an error,
      never a silent fall-through to another source.
    * else, ``OSS_ACCESS_KEY_ID`` set in ``environ``: the environment (incomplete → error).
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
        if self.file:
            return FileCredentialsProvider(self.file)
        if EnvCredentialsProvider.available(self.environ):
            return EnvCredentialsProvider(self.environ)
        if not self.ram_role:
            raise CredentialsError("no OSS credentials: no credentials file configured and OSS_ACCESS_KEY_ID "
                                   "is not set (the ECS RAM role is disabled)")
        prov = EcsRamRoleCredentialsProvider(self.role, base_url=self.imds_url, timeout=self.imds_timeout)
        try:
            prov.get_credentials()
        except CredentialsError as e:
            raise CredentialsError("no OSS credentials: no credentials file configured, OSS_ACCESS_KEY_ID is "
                                   f"not set, and the ECS RAM role failed: {e}", temporary=e.temporary) from None
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
