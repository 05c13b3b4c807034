"""Under systemd the daemon's stderr is a journal stream: each line carries its
syslog priority (`<3>` error, `<4>` warning, `<6>` info) for journald to read, so
`journalctl -u edge-agent -p warning` and a syslog forwarder see the levels, and
no timestamp of its own (the journal stamps every line).  Elsewhere (a terminal, a
file, a stream that is not the one JOURNAL_STREAM names) lines stay as they were.
tests/system/test_under_systemd.py checks the same through a real journald."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from agent import logs
from tests.helpers import Box, Daemon, wait_for


def test_daemon_lines_carry_their_priority_on_a_journal_stream(
        box: Box, monkeypatch: pytest.MonkeyPatch) -> None:
    log = box.root / "daemon.log"
    log.touch()
    st = log.stat()
    # what systemd sets for a unit whose stderr is the journal: that stream's dev:inode
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    d = Daemon(box)  # no broker: the publisher warns that it cannot connect
    d.start()
    try:
        wait_for(lambda: re.search(r"^<4>WARNING agent\.uplink\.publish: mqtt .* unavailable",
                                   d.log_text(), re.M), 60, "the broker warning")
    finally:
        assert d.stop() == 0
    lines = d.log_text().splitlines()
    assert any(re.fullmatch(r"<6>INFO agent\.daemon: edge-agent \S+ running \(.*\)", line)
               for line in lines), lines[-20:]
    assert lines and all(re.match(r"<[2-7]>[A-Z]+ \S+: ", line) for line in lines), lines[-20:]


def test_a_stderr_that_is_not_the_named_stream_keeps_timestamps(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    assert not logs.stderr_is_journal()
    # a child whose stderr was redirected inherits the variable, not the stream
    other = tmp_path / "other"
    other.touch()
    st = os.stat(other)
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    assert not logs.stderr_is_journal()
