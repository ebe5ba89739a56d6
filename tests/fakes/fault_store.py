"""An in-process, fault-injecting :class:`~ossfuse.store.base.ObjectStore` for tests of the
layers above the store (the model is mountpoint-s3's ``failure_client``: a wrapper around a
working client whose behaviour a test arms per operation).

``FaultStore(inner)`` wraps any store (usually a ``LocalStore`` in ``tmp_path``) and forwards
every call to it, unless an armed *rule* matches the call. With nothing armed it behaves exactly
like ``inner`` (``tests/test_store_contract.py`` runs the store contract against it).

Operations are named after the store methods: ``head``, ``get_range``, ``get_range_with_info``
(one call: OSS answers it with one GET), ``put_file``,
``put_bytes``, ``create_multipart``, ``upload_part``, ``complete_multipart``,
``abort_multipart``, ``list``, ``list_multipart_uploads``, ``copy``, ``delete``. A rule's
``key`` is an ``fnmatch`` pattern (``"*"``: any) matched against the call's key; for ``copy``
against the source *or* the destination; for ``list``/``list_multipart_uploads`` against the
prefix. ``op`` is one name, a tuple of names, or ``"*"``. ``count`` is how many matching calls
the rule acts on (``None``: every one). Every matching delay and hook acts on a call; of the
error rules (``fail``, ``lose_response``) only the first armed one that matches does (so two
``fail`` rules for one op fire on two successive calls). Each arming method returns a
:class:`Rule` whose ``hits`` counts what it did.

Arming (all return the Rule):

* ``fail(op, key="*", error="temporary", count=1)``: the call raises *before* reaching
  ``inner`` (nothing happens in the bucket). ``error`` is ``"temporary"`` (StoreUnavailable,
  ``temporary=True``, no answer: a refused connection or a timeout once the store's own retries
  ran out), ``"busy"`` (StoreUnavailable with ``answered``: an HTTP 503 "Please reduce your
  request rate" that outlived the retries), ``"permanent"``
  (StoreError, ``temporary=False``: e.g. AccessDenied), ``"no_such_key"`` (NoSuchKey),
  ``"precondition"`` (PreconditionFailed), a StoreError subclass, or a callable
  ``(op, key) -> BaseException``.
* ``lose_response(op, key="*", error="temporary", count=1)``: the call *is applied* to
  ``inner``, then the error is raised (the answer was lost: the caller must cope with a PUT,
  copy or delete that happened although it failed).
* ``delay(op, seconds, key="*", count=None)``: ``await trio.sleep(seconds)`` before the call
  (several matching delays add up).
* ``replace(key, data=None, metadata=None, *, before="*", count=1)``: a *foreign writer*: just
  before the next call of ``before`` that matches ``key``, another client replaces object
  ``key`` in ``inner`` (new ETag). ``data`` None keeps its bytes, ``metadata`` None keeps its
  metadata (so ``replace(k, metadata={...})`` is another client's chmod, ``replace(k, b"x")``
  another client's edit).
* ``hook(op, fn, key="*", when="before", count=None)``: ``await fn(inner, op, keys)`` before
  (or ``"after"``, once the call succeeded) each matching call: any other interference.
* ``clear()`` disarms everything (counts stay); ``reset_counts()`` zeroes the counters.

Observing: ``counts`` (a Counter: op → calls made to this store, failed ones included),
``calls`` (list of ``(op, keys)`` in order), ``injected`` (list of ``(kind, op, keys)``),
``inner`` (the wrapped store, to check what really is in the bucket).

Example::

    from fakes.fault_store import FaultStore
    from ossfuse.store.local import LocalStore

    store = FaultStore(LocalStore(str(tmp_path / "bucket")))
    store.fail("put_file", key="dir/*", error="temporary", count=2)
    store.lose_response("copy", key="a")              # the copy happens, the caller sees an error
    store.replace("b", b"their edit", before="copy")  # someone rewrites b before our next copy
    store.delay("head", 0.5)
    ...  # drive the code under test with ``store``
    assert store.counts["put_file"] == 3
    info = await store.inner.head("a")                 # the truth, bypassing the faults

Thread-safety: meant for one trio run (rules are consumed in call order on the event loop).
"""
from __future__ import annotations

import fnmatch
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Iterable

import trio

from ossfuse.store.base import (ListPage, NoSuchKey, ObjectInfo, ObjectStore, PreconditionFailed, StoreError,
                                StoreUnavailable)
from ossfuse.store.indoubt import DELETED

OPS = ("head", "get_range", "get_range_with_info", "put_file", "put_bytes", "create_multipart", "upload_part", "complete_multipart",
       "abort_multipart", "list", "list_multipart_uploads", "copy", "delete", "delete_many")

ErrorSpec = str | type | Callable[[str, str], BaseException]
Hook = Callable[[ObjectStore, str, tuple[str, ...]], Awaitable[Any]]


@dataclass
class Rule:
    """One armed fault (see the module docstring); ``hits`` counts the calls it acted on."""

    kind: str  # "fail" | "lose" | "delay" | "hook"
    ops: frozenset[str] | None  # None: every operation
    key: str
    count: int | None
    error: ErrorSpec | None = None
    seconds: float = 0.0
    fn: Hook | None = None
    when: str = "before"
    hits: int = 0
    active: bool = field(default=True, repr=False)

    def matches(self, op: str, keys: tuple[str, ...]) -> bool:
        if not self.active or (self.count is not None and self.hits >= self.count):
            return False
        if self.ops is not None and op not in self.ops:
            return False
        return self.key == "*" or any(fnmatch.fnmatchcase(k, self.key) for k in keys)


def _ops(op: str | Iterable[str]) -> frozenset[str] | None:
    names = (op,) if isinstance(op, str) else tuple(op)
    if "*" in names:
        return None
    unknown = [n for n in names if n not in OPS]
    if unknown:
        raise ValueError(f"unknown store operation(s) {unknown}; known: {', '.join(OPS)}")
    return frozenset(names)


_KINDS = ("temporary", "busy", "permanent", "no_such_key", "precondition")


def _check_spec(spec: ErrorSpec) -> ErrorSpec:
    if isinstance(spec, str) and spec not in _KINDS:
        raise ValueError(f"unknown error kind {spec!r}; known: {', '.join(_KINDS)}")
    return spec


def _make_error(spec: ErrorSpec, op: str, key: str) -> BaseException:
    what = f"injected fault: {op} {key!r}"
    if callable(spec) and not isinstance(spec, type):
        return spec(op, key)
    if isinstance(spec, type):
        return spec(what, key=key)
    if spec == "temporary":
        return StoreUnavailable(f"{what}: temporary failure", key=key, code="InjectedTemporary")
    if spec == "busy":
        return StoreUnavailable(f"{what}: HTTP 503 ServiceUnavailable: Please reduce your request rate.", key=key,
                                code="ServiceUnavailable", answered=True)
    if spec == "permanent":
        return StoreError(f"{what}: permanent failure", key=key, code="InjectedPermanent", temporary=False)
    if spec == "no_such_key":
        return NoSuchKey(f"{what}: no such key", key=key, code="NoSuchKey")
    if spec == "precondition":
        return PreconditionFailed(f"{what}: precondition failed", key=key, code="PreconditionFailed")
    raise ValueError(f"unknown error kind {spec!r}")


_WRITES = frozenset({"put_bytes", "put_file", "copy", "delete", "delete_many", "complete_multipart"})

class FaultStore(ObjectStore):
    """``inner`` with armed faults; see the module docstring."""

    def __init__(self, inner: ObjectStore):
        self.inner = inner
        # the wrapped store's capabilities, so callers take the same paths
        self.min_part_size = inner.min_part_size
        self.max_parts = inner.max_parts
        self.max_copy_size = inner.max_copy_size
        self.listing_has_metadata = inner.listing_has_metadata
        self.local_disk = inner.local_disk
        self.checks_replaces = inner.checks_replaces
        self.rules: list[Rule] = []
        self.in_doubt: set[str] = set()  # keys may_still_land says yes for (set by a test)
        self._on_written: Callable[[str, str, ObjectInfo | None], None] = lambda key, result, info: None
        self.counts: Counter[str] = Counter()
        self.calls: list[tuple[str, tuple[str, ...]]] = []
        self.injected: list[tuple[str, str, tuple[str, ...]]] = []

    def capacity(self) -> tuple[int, int, int] | None:
        return self.inner.capacity()

    def may_still_land(self, key: str) -> bool:
        """The inner store's answer, or True for a key in ``in_doubt`` (a test's unanswered write)."""
        return key in self.in_doubt or self.inner.may_still_land(key)

    def landed_over_ours(self, key: str, info: ObjectInfo) -> bool:
        return self.inner.landed_over_ours(key, info)

    def landed_late(self, key: str, etag: str) -> None:
        self.inner.landed_late(key, etag)

    def sent_before_a_crash(self, key: str, wrapped: str) -> None:
        self.inner.sent_before_a_crash(key, wrapped)

    def vacated(self, key: str) -> None:
        self.inner.vacated(key)

    def on_write_after_doubt(self, fn: Callable[[str, str, ObjectInfo | None], None]) -> None:
        self._on_written = fn
        self.inner.on_write_after_doubt(fn)

    def given_up_earlier(self, op: str, key: str, effect: str, until: float) -> None:
        """As the inner store, and ``key`` joins ``in_doubt`` (its writes are reported)."""
        self.in_doubt.add(key)
        self.inner.given_up_earlier(op, key, effect, until)

    # -- arming -------------------------------------------------------------------------------
    def _arm(self, rule: Rule) -> Rule:
        self.rules.append(rule)
        return rule

    def fail(self, op: str | Iterable[str], key: str = "*", error: ErrorSpec = "temporary",
             count: int | None = 1) -> Rule:
        """Raise ``error`` instead of making the call (nothing reaches ``inner``)."""
        return self._arm(Rule("fail", _ops(op), key, count, error=_check_spec(error)))

    def lose_response(self, op: str | Iterable[str], key: str = "*", error: ErrorSpec = "temporary",
                      count: int | None = 1) -> Rule:
        """Make the call, then raise ``error`` as if its answer was lost."""
        return self._arm(Rule("lose", _ops(op), key, count, error=_check_spec(error)))

    def delay(self, op: str | Iterable[str], seconds: float, key: str = "*", count: int | None = None) -> Rule:
        """Sleep ``seconds`` (trio time) before each matching call."""
        return self._arm(Rule("delay", _ops(op), key, count, seconds=seconds))

    def hook(self, op: str | Iterable[str], fn: Hook, key: str = "*", when: str = "before",
             count: int | None = None) -> Rule:
        """``await fn(inner, op, keys)`` before, or after a successful, matching call."""
        if when not in ("before", "after"):
            raise ValueError("when must be 'before' or 'after'")
        return self._arm(Rule("hook", _ops(op), key, count, fn=fn, when=when))

    def replace(self, key: str, data: bytes | None = None, metadata: dict[str, str] | None = None, *,
                before: str | Iterable[str] = "*", count: int | None = 1) -> Rule:
        """A foreign writer: before the next matching ``before`` call, object ``key`` is
        rewritten in ``inner`` (new ETag) with ``data``/``metadata`` (None: keep the current)."""

        async def rewrite(inner: ObjectStore, op: str, keys: tuple[str, ...]) -> None:
            cur = await inner.head(key)
            body = data
            if body is None:
                body = await inner.get_range(key, 0, cur.size) if cur is not None else b""
            meta = metadata if metadata is not None else (dict(cur.metadata) if cur is not None else {})
            if data is not None:  # another client's edit carries no ossfuse integrity tags
                meta.pop("ossfuse-integrity", None)
            await inner.put_bytes(key, body, meta)
            self.injected.append(("replace", op, (key,)))

        return self._arm(Rule("hook", _ops(before), key, count, fn=rewrite, when="before"))

    def clear(self) -> None:
        """Disarm every rule (counters stay)."""
        for r in self.rules:
            r.active = False
        self.rules.clear()

    def reset_counts(self) -> None:
        self.counts.clear()
        self.calls.clear()

    # -- the interception ---------------------------------------------------------------------
    async def _run(self, op: str, keys: tuple[str, ...], call: Callable[[], Awaitable[Any]]) -> Any:
        self.counts[op] += 1
        self.calls.append((op, keys))
        key = keys[0] if keys else ""
        matched = [r for r in self.rules if r.matches(op, keys)]
        # every delay and hook applies; of the error rules only the first armed one acts
        error_rule = next((r for r in matched if r.kind in ("fail", "lose")), None)
        acting = [r for r in matched if r.kind in ("delay", "hook") or r is error_rule]
        for r in acting:
            r.hits += 1
        pause = sum(r.seconds for r in acting if r.kind == "delay")
        if pause:
            self.injected.append(("delay", op, keys))
            await trio.sleep(pause)
        for r in acting:
            if r.kind == "hook" and r.when == "before":
                await r.fn(self.inner, op, keys)
        if error_rule is not None and error_rule.kind == "fail":
            self.injected.append(("fail", op, keys))
            raise _make_error(error_rule.error, op, key)
        result = await call()
        if op in _WRITES:  # (the destination: a copy's second key)
            info = result if isinstance(result, ObjectInfo) else None
            for k in (keys[1:] if op == "copy" else keys):
                if k in self.in_doubt:  # (a write after a test's unanswered one: as OssStore tells)
                    self._on_written(k, info.etag if info is not None else DELETED, info)
        if error_rule is not None and error_rule.kind == "lose":
            self.injected.append(("lose", op, keys))
            raise _make_error(error_rule.error, op, key)
        for r in acting:
            if r.kind == "hook" and r.when == "after":
                await r.fn(self.inner, op, keys)
        return result

    # -- ObjectStore --------------------------------------------------------------------------
    async def head(self, key: str) -> ObjectInfo | None:
        return await self._run("head", (key,), lambda: self.inner.head(key))

    async def get_range(self, key: str, start: int, end: int, *, if_match: str | None = None) -> bytes:
        return await self._run("get_range", (key,), lambda: self.inner.get_range(key, start, end, if_match=if_match))

    async def get_range_with_info(self, key: str, start: int, end: int, *,
                                  if_match: str | None = None) -> tuple[ObjectInfo, bytes]:
        return await self._run("get_range_with_info", (key,),
                               lambda: self.inner.get_range_with_info(key, start, end, if_match=if_match))

    async def put_file(self, key: str, path: str, metadata: dict[str, str], *, may_link: bool = False,
                       if_absent: bool = False, replaces: str | None = None) -> ObjectInfo:
        return await self._run("put_file", (key,),
                               lambda: self.inner.put_file(key, path, metadata, may_link=may_link, if_absent=if_absent,
                                                           replaces=replaces))

    async def put_bytes(self, key: str, data: bytes, metadata: dict[str, str], *,
                        if_absent: bool = False, replaces: str | None = None) -> ObjectInfo:
        return await self._run("put_bytes", (key,), lambda: self.inner.put_bytes(key, data, metadata,
                                                                                   if_absent=if_absent,
                                                                                   replaces=replaces))

    async def create_multipart(self, key: str, metadata: dict[str, str]) -> str:
        return await self._run("create_multipart", (key,), lambda: self.inner.create_multipart(key, metadata))

    async def upload_part(self, key: str, upload_id: str, part_number: int, data: bytes,
                          metadata: dict[str, str]) -> str:
        return await self._run("upload_part", (key,),
                               lambda: self.inner.upload_part(key, upload_id, part_number, data, metadata))

    async def complete_multipart(self, key: str, upload_id: str, parts: list[tuple[int, str]], *,
                                 if_absent: bool = False, replaces: str | None = None) -> ObjectInfo:
        return await self._run("complete_multipart", (key,),
                               lambda: self.inner.complete_multipart(key, upload_id, parts, if_absent=if_absent,
                                                                     replaces=replaces))

    async def abort_multipart(self, key: str, upload_id: str) -> None:
        return await self._run("abort_multipart", (key,), lambda: self.inner.abort_multipart(key, upload_id))

    async def list(self, prefix: str, *, delimiter: str | None = "/", marker: str | None = None,
                   max_keys: int = 1000) -> ListPage:
        return await self._run("list", (prefix,), lambda: self.inner.list(prefix, delimiter=delimiter, marker=marker,
                                                                          max_keys=max_keys))

    async def list_multipart_uploads(self, prefix: str = "") -> list[tuple[str, str, float]]:
        return await self._run("list_multipart_uploads", (prefix,), lambda: self.inner.list_multipart_uploads(prefix))

    async def copy(self, src: str, dst: str, metadata: dict[str, str] | None = None, *,
                   if_match: str | None = None, if_absent: bool = False, replaces: str | None = None,
                   source: ObjectInfo | None = None) -> ObjectInfo:
        return await self._run("copy", (src, dst), lambda: self.inner.copy(src, dst, metadata, if_match=if_match,
                                                                           if_absent=if_absent, replaces=replaces,
                                                                           source=source))

    async def delete(self, key: str, *, version: str | None = None) -> None:
        return await self._run("delete", (key,), lambda: self.inner.delete(key, version=version))

    async def delete_many(self, keys, versions=None):
        return await self._run("delete_many", tuple(keys), lambda: self.inner.delete_many(keys[:], versions))

    async def aclose(self) -> None:
        await self.inner.aclose()


__all__ = ["FaultStore", "Rule", "OPS"]
