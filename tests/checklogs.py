"""A test fails on any WARNING, ERROR or CRITICAL log line it did not declare (the model is
s3ql's ``tests/pytest_checklogs.py``): a warning nobody expected is a bug nobody looked at.

Two sources are checked:

* log records of this test process (the ``logging`` module, through pytest's ``caplog``): the
  in-process tests of the filesystem, stores, KMS client, ...;
* the log file of every real mount's daemon (``<cache>/ossfuse.log``), read by
  ``conftest.Mount.cleanup`` (and before ``Mount.remount`` clears the cache) and handed to
  :func:`daemon_log`.

A test that expects such lines declares them, by regular expression (``re.search``) on the
line ``"LEVEL logger: message"`` (for the daemon's file: the line without its timestamp)::

    @pytest.mark.expect_log(r"upload of '.*' failed")
    def test_x(...): ...

    def test_y(expect_log):
        expect_log(r"WARNING .*could not be kept readable")

A declared pattern need not appear (a test parametrized over two stores may log it on one).
Registered from ``conftest.py`` with ``pytest_plugins = ["checklogs"]``.
"""
from __future__ import annotations

import logging
import re

import pytest

LEVEL = logging.WARNING  # this level and above must be declared
# "2026-12-02 12:00:00,123 WARNING ossfuse.fs.files: message" (ossfuse.cli._LOG_FORMAT)
_DAEMON_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (?P<rest>(?P<level>[A-Z]+) .*)$")

_current: pytest.Item | None = None  # the test running now (daemon logs are charged to it)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "expect_log(*patterns): log lines (regular expressions on "
                                       "'LEVEL logger: message') this test may emit at WARNING or above")


def _patterns(item: pytest.Item) -> list[re.Pattern[str]]:
    pats = [re.compile(p) for mark in item.iter_markers("expect_log") for p in mark.args]
    return pats + getattr(item, "_expected_logs", [])


def _unexpected(item: pytest.Item, lines: list[str]) -> list[str]:
    pats = _patterns(item)
    return [line for line in lines if not any(p.search(line) for p in pats)]


def daemon_log(text: str, source: str) -> None:
    """Check a daemon's log file ``text`` (from ``source``, for the message) against the current
    test's declarations; what is not declared fails the test at its teardown."""
    if _current is None:
        return  # a session-wide mount, outside any one test
    lines = []
    for line in text.splitlines():
        m = _DAEMON_LINE.match(line)
        if m and logging.getLevelName(m["level"]) in (logging.WARNING, logging.ERROR, logging.CRITICAL):
            lines.append(m["rest"])
    bad = _unexpected(_current, lines)
    if bad:
        _current.__dict__.setdefault("_daemon_log_lines", []).extend(f"{source}: {b}" for b in bad)


@pytest.fixture
def expect_log(request: pytest.FixtureRequest):
    """``expect_log(pattern, ...)``: this test may log lines matching these expressions."""
    def declare(*patterns: str) -> None:
        request.node.__dict__.setdefault("_expected_logs", []).extend(re.compile(p) for p in patterns)
    return declare


@pytest.fixture(autouse=True)
def check_logs(request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture):
    """Fails the test (at teardown: autouse fixtures are set up first and torn down last, so the
    other fixtures' teardown logs are seen) on an undeclared line at WARNING or above."""
    global _current
    _current = request.node
    try:
        yield
    finally:
        _current = None
    item = request.node
    records = [r for when in ("setup", "call", "teardown") for r in caplog.get_records(when)]
    lines = [f"{r.levelname} {r.name}: {r.getMessage()}" for r in records if r.levelno >= LEVEL]
    bad = _unexpected(item, lines) + item.__dict__.pop("_daemon_log_lines", [])
    if bad:
        shown = "\n  ".join(line[:500] for line in bad[:20])
        pytest.fail(f"{len(bad)} undeclared log line(s) at WARNING or above (declare expected ones with "
                    f"@pytest.mark.expect_log(pattern) or the expect_log fixture):\n  {shown}", pytrace=False)
