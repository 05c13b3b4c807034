"""What the running daemon holds in memory while it receives (issue 19 section 5:
peak RSS summed over the daemon and its receive workers).  Checked in the real
daemon, by what it loaded and how it is set up, never by timing or by an RSS
figure (which depends on the machine)."""

from __future__ import annotations

import re

import pytest

from tests.helpers import Box, Daemon, set_config
from tests.helpers.delivery import add_destination


def imported_by_daemon(log: str) -> set[str]:
    """Module names from Python's import-time report (PYTHONPROFILEIMPORTTIME) in the
    daemon's log: one line per module its processes imported."""
    return {m.group(1) for m in re.finditer(r"^import time:\s+\d+ \|\s+\d+ \|\s+(\S+)$", log,
                                           re.MULTILINE)}


@pytest.mark.parametrize("destinations", [False, True], ids=["no-destinations", "destinations"])
def test_the_result_object_builders_load_only_on_a_box_that_sends_results(
        box: Box, monkeypatch: pytest.MonkeyPatch, destinations: bool) -> None:
    """The result objects (SR, GSPS, key image, SEG) are built with highdicom, whose
    import (with pydicom's SR concept tables) is about 21 MiB of the daemon's memory:
    a box without [[results.destinations]] (the default) never builds one and must
    not pay for it; one with destinations loads them at start."""
    monkeypatch.setenv("PYTHONPROFILEIMPORTTIME", "1")  # inherited by the daemon
    set_config(box, "dicom", "workers", "2")
    if destinations:
        set_config(box, "results", "enabled", "true")
        add_destination(box, "pacs", "NOWHERE", 9)  # never reached: no study completes
    d = Daemon(box)
    d.start()  # returns once the DICOM port accepts: the daemon is set up
    try:
        modules = imported_by_daemon(d.log_text())
        assert "agent.daemon" in modules and "onnxruntime" in modules  # the report works
        assert ("highdicom" in modules) is destinations
        assert ("agent.results.delivery" in modules) is destinations
    finally:
        assert d.stop() == 0


def test_imported_by_daemon_reads_the_import_report() -> None:
    log = ("import time: self [us] | cumulative | imported package\n"
           "import time:       391 |     128640 |     highdicom\n"
           "import time:      1461 |     130100 |   agent.results.common\n"
           "2026-12-07 daemon: listening\n")
    assert imported_by_daemon(log) == {"highdicom", "agent.results.common"}
