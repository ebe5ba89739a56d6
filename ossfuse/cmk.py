"""The CMK interface and its two errors, shared by the RSA CMK (``keyring``) and the KMS CMK
(``kms``); a module of its own so that ``keyring`` may use ``kms`` without ``kms`` importing
``keyring`` back."""
from __future__ import annotations

import abc

from . import envelope as env
from .config import CmkConfig


class CmkUnavailable(Exception):
    """The CMK's service (KMS) cannot be reached right now; the operation may work later."""


class KeyMissing(Exception):
    """No CMK in this mount's keyring matches the object (wrap-alg and matdesc)."""


class Cmk(abc.ABC):
    """One customer master key: wraps/unwraps small secrets (data key, IV)."""

    def __init__(self, cfg: CmkConfig):
        self.id = cfg.id
        self.matdesc = dict(cfg.matdesc) if cfg.matdesc else None
        # the header text written: the config's exact text, else Go's form (readers that match
        # by text, Go V1 and V2, find it; issue 15)
        self.matdesc_raw = getattr(cfg, "matdesc_text", None) or env.encode_matdesc(self.matdesc)

    wrap_alg: str  # what this CMK writes
    reads_wrap_algs: tuple[str, ...] = ()  # what it reads (defaults to (wrap_alg,))

    def reads(self, wrap_alg: str) -> bool:
        return wrap_alg.lower() in (a.lower() for a in (self.reads_wrap_algs or (self.wrap_alg,)))

    @abc.abstractmethod
    def wrap(self, secret: bytes) -> bytes:
        """The wrapped form of ``secret`` as stored (base64-decoded) in the header."""

    @abc.abstractmethod
    def unwrap(self, blob: bytes, wrap_alg: str) -> bytes:
        """Inverse of wrap for an object of ``wrap_alg``; raises EnvelopeError if ``blob`` was
        not wrapped by this CMK."""
