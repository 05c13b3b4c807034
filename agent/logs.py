"""Logging set-up: one format, every record passes the PHI scrubber, and every
record is exactly one line.

A peer controls text that ends up in log records (AE titles, UIDs, exception
messages that quote them, pynetdicom's own "Invalid 'Calling AE Title' value
'...'" lines): a newline in it would let the peer write a line of its own into
the log (``X\\nCRITICAL ...``).  So the formatter escapes every control
character of the whole rendered record, exception text and stack included, and
uncaught thread exceptions go through logging too instead of straight to stderr.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from types import TracebackType

from agent.uplink.egress import ScrubFilter

# C0 controls, DEL, C1 controls and the Unicode line/paragraph separators (some
# viewers break lines on them).
_ESCAPES: dict[int, str] = {c: f"\\x{c:02x}" for c in [*range(0x20), *range(0x7F, 0xA0)]}
_ESCAPES.update({0x09: "\\t", 0x0A: "\\n", 0x0D: "\\r", 0x2028: "\\u2028", 0x2029: "\\u2029"})


def escape_controls(text: str) -> str:
    """``text`` with every control character written as an escape sequence."""
    return text.translate(_ESCAPES)


class OneLineFormatter(logging.Formatter):
    """Renders a record (message, exception, stack) as one line, controls escaped."""

    def format(self, record: logging.LogRecord) -> str:
        return escape_controls(super().format(record))


# syslog priorities (sd-daemon.h SD_CRIT ... SD_DEBUG) for the journal's line prefix
_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6,
             logging.DEBUG: 7}


class JournalFormatter(OneLineFormatter):
    """One line with a ``<N>`` priority prefix, which journald reads off a stream line
    (so ``journalctl -p err`` and a syslog forwarder see the level); no timestamp,
    the journal stamps every line itself."""

    def format(self, record: logging.LogRecord) -> str:
        level = record.levelno
        prio = next((p for lv, p in sorted(_PRIORITY.items(), reverse=True) if level >= lv), 7)
        return f"<{prio}>{super().format(record)}"


def stderr_is_journal() -> bool:
    """systemd connected stderr to the journal: ``JOURNAL_STREAM`` names the device and
    inode of that stream (a redirected stderr of a child keeps the variable, not the
    stream, hence the comparison)."""
    want = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return bool(want) and want == f"{st.st_dev}:{st.st_ino}"


def _thread_exception(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else "?"
    exc = (args.exc_type, args.exc_value, args.exc_traceback)
    logging.getLogger(__name__).error("thread %s stopped by an uncaught exception", name,
                                          exc_info=exc)  # type: ignore[arg-type]


def _process_exception(exc_type: type[BaseException], exc: BaseException,
                       tb: TracebackType | None) -> None:
    logging.getLogger(__name__).critical("uncaught exception", exc_info=(exc_type, exc, tb))


def setup(level: str = "INFO", process: str = "") -> None:
    """``process`` tags every line of a helper process (``recv-w0``) in the shared log."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    tag = f"[{process}]" if process else ""
    if stderr_is_journal():
        handler.setFormatter(JournalFormatter(f"%(levelname)s %(name)s{tag}: %(message)s"))
    else:
        handler.setFormatter(
            OneLineFormatter(f"%(asctime)s %(levelname)s %(name)s{tag}: %(message)s"))
    handler.addFilter(ScrubFilter())
    root.addHandler(handler)
    root.setLevel(level)
    # Third-party chatter at INFO can carry identifiers (pynetdicom dumps PDUs).
    for noisy in ("pynetdicom", "pydicom"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Python prints these straight to stderr otherwise: unescaped, unscrubbed
    # (pydicom warns about invalid values, quoting them).
    logging.captureWarnings(True)
    threading.excepthook = _thread_exception
    sys.excepthook = _process_exception
