"""The ListObjects (v1) answer read without oss2's parser.

A big directory over OSS is a LIST page of 1000 keys per 1000 entries; oss2's
``xml_utils.parse_list_objects`` spent ~19 ms of client CPU per page (an XPath ``find`` per field,
a ``strptime``-free but per-key ISO 8601 conversion, ``unquote`` per key), 3x ElementTree's own
parse. :func:`parse_list_objects` walks the tree once and gives the same values
(``tests/test_oss_store.py`` compares both on the test server's answers).

Format (``shared/spec/oss-rest-api.md`` §3.7): ``<ListBucketResult>`` with ``EncodingType``
(``url``: Key, Prefix and NextMarker are percent-encoded), ``IsTruncated`` (``true``/``false``),
``NextMarker`` (only read when truncated, as oss2), ``Contents`` (Key, LastModified as
``2012-02-24T06:07:48.000Z``, ETag in quotes, Size) and ``CommonPrefixes/Prefix``.
"""
from __future__ import annotations

import xml.etree.ElementTree as ElementTree
from urllib.parse import unquote

import oss2.utils

from .base import ObjectInfo

# LastModified text -> epoch seconds (whole seconds, as oss2.utils.iso8601_to_unixtime reads it):
# the keys of one page mostly share a few seconds
_ISO_TIMES: dict[str, float] = {}


class ListAnswerError(ValueError):
    """The answer is no ListBucketResult oss2 could read (bad XML, a field missing or invalid)."""


def _iso_time(text: str) -> float:
    t = _ISO_TIMES.get(text)
    if t is None:
        try:
            t = float(oss2.utils.iso8601_to_unixtime(text))
        except ValueError as e:
            raise ListAnswerError(f"LastModified {text!r}: {e}") from None
        if len(_ISO_TIMES) >= 4096:
            _ISO_TIMES.clear()
        _ISO_TIMES[text] = t
    return t


def parse_list_objects(body: bytes) -> tuple[list[ObjectInfo], list[str], bool, str]:
    """``(objects, common prefixes, is_truncated, next_marker)`` of a ListObjects answer, in the
    answer's order; objects carry key, size (bytes), ETag without quotes and Last-Modified in
    epoch seconds (no metadata). ``next_marker`` is "" when absent or not truncated (oss2's
    ``ListObjectsResult.next_marker``). Percent-decoded (UTF-8) when ``EncodingType`` is
    ``url``. Raises :class:`ListAnswerError` where oss2 would fail (bad XML, no IsTruncated,
    a Contents without Key, LastModified, ETag or Size, a Size that is no integer)."""
    try:
        root = ElementTree.fromstring(body)
    except ElementTree.ParseError as e:
        raise ListAnswerError(f"not XML: {e}") from None
    url = False
    truncated: bool | None = None
    next_marker = ""
    contents: list[ElementTree.Element] = []
    prefixes: list[str] = []
    for el in root:
        tag = el.tag
        if tag == "Contents":
            contents.append(el)
        elif tag == "CommonPrefixes":
            p = el.find("Prefix")
            if p is None:
                raise ListAnswerError("a CommonPrefixes without Prefix")
            prefixes.append(p.text or "")
        elif tag == "IsTruncated":
            if el.text not in ("true", "false"):
                raise ListAnswerError(f"IsTruncated is {el.text!r}")
            if truncated is None:  # the first one counts (ElementTree's find)
                truncated = el.text == "true"
        elif tag == "EncodingType":
            url = url or el.text == "url"  # oss2 reads the first; OSS sends at most one
        elif tag == "NextMarker" and not next_marker:
            next_marker = el.text or ""
    if truncated is None:
        raise ListAnswerError("no IsTruncated")

    def dec(s: str) -> str:
        if not url or "%" not in s:
            return s  # unquote of a text without % is itself
        # The keys of a listing share their directories: the part up to the last encoded "/" is
        # decoded once per page (exact: an ASCII "/" ends any UTF-8 sequence on either side)
        i = s.rfind("%2F") + 3
        if i < 3:
            return unquote(s)
        head = heads.get(s[:i])
        if head is None:
            head = heads[s[:i]] = unquote(s[:i])
        tail = s[i:]
        return head + unquote(tail) if "%" in tail else head + tail
    heads: dict[str, str] = {}

    objects = []
    for el in contents:
        key = lm = etag = size = None
        for c in el:  # the first of each tag counts, as ElementTree's find
            t = c.tag
            if t == "Key":
                key = key if key is not None else c.text or ""
            elif t == "LastModified":
                lm = lm if lm is not None else c.text or ""
            elif t == "ETag":
                etag = etag if etag is not None else c.text or ""
            elif t == "Size":
                size = size if size is not None else c.text or ""
        if key is None or lm is None or etag is None or size is None:
            raise ListAnswerError("a Contents without Key, LastModified, ETag or Size")
        try:
            n = int(size)
        except ValueError:
            raise ListAnswerError(f"Size {size!r} of {key!r}") from None
        objects.append(ObjectInfo(dec(key), n, etag.strip('"'), _iso_time(lm), metadata_unknown=True))
    return objects, [dec(p) for p in prefixes], truncated, dec(next_marker) if truncated else ""
