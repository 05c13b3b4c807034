"""IHE ATNA Record Audit Event (ITI-20): the audit log, record by record, to the
hospital's audit repository over RFC 5425 syslog with mutual TLS.

The audit store already holds every record durably, encrypted and in order,
so it is this sender's outbox: a durable cursor (``<state_dir>/atna/cursor.json``,
the last seq the collector took) walks it.  A collector that is down loses
nothing: records wait in the audit log, and the cursor resumes after a restart
or a kill -9.  Order is the log's seq order.

TCP syslog has no application acknowledgement.  The cursor moves only after a
batch was written, flushed and acknowledged by the collector's TCP stack (the
socket's send queue drained, ``TIOCOUTQ`` = 0), never on a mere ``send``.  A
collector that dies with acknowledged bytes still unread in its socket would
lose them, so after any broken connection the batches of the last
``REPLAY_SECONDS`` are sent again: delivery is at least once, and every
message carries the record's seq and a stable uuid (``RecordRef``) for the
repository to dedupe on.  Duplicates are counted (``resent``).

PHI goes into these messages by design (the complete local record); where it
may go is decided by agent/uplink/egresspolicy.py, and the sender connects to nothing
else.  Nothing of a record's content is ever logged here.
"""

from __future__ import annotations

import fcntl
import json
import logging
import random
import select
import socket
import sqlite3
import ssl
import struct
import termios
import threading
import time
import xml.etree.ElementTree as ET
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from agent.config import Config
from agent.crypto import KeyEncryptionKey, write_file_atomic
from agent.errors import AuditError, EdgeAgentError, TransportError
from agent.ops.liveness import Beat, no_beat
from agent.uplink import egresspolicy

from . import fhir, syslog
from .export import RecordRef, atna_message
from .store import Row, Store, connect, iso, open_record

log = logging.getLogger(__name__)

BATCH = 200  # records per write
BATCH_BYTES = 1 << 20
BACKOFF_MIN = 0.5
BACKOFF_MAX = 30.0
# After the handshake, how long to watch for a collector that hangs up on our
# certificate (under TLS 1.3 it judges the client certificate after our side is done).
SETTLE_SECONDS = 1.0
SEND_TIMEOUT = 30.0
ACK_TIMEOUT = 30.0
REPLAY_SECONDS = 2.0
IDLE_WAIT = 1.0

Audit = Callable[..., None]


class LinkError(TransportError):
    """The collector link failed; ``code`` is a token for audit records and telemetry."""

    def __init__(self, message: str, code: str, *, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.code = code


# -- the durable cursor -------------------------------------------------------------


@dataclass(frozen=True)
class CursorState:
    genesis: str  # hex of the audit log's genesis key: a new log starts from seq 0
    seq: int  # every record up to here was taken by the collector


class Cursor:
    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> CursorState | None:
        try:
            data = json.loads(self.path.read_text())
            return CursorState(str(data["genesis"]), int(data["seq"]))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # Sending again from the start is the safe side: the repository dedupes.
            log.error("ATNA cursor %s is unreadable (%s); records are sent again from the "
                      "start of the audit log", self.path, exc)
            return None

    def save(self, state: CursorState) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_file_atomic(self.path, json.dumps(asdict(state)).encode(), 0o600)


# -- reading the audit log ----------------------------------------------------------------


class Reader:
    """Decrypted records after a seq, from the audit database (its own connection)."""

    def __init__(self, db_path: Path, kek: KeyEncryptionKey) -> None:
        self.db_path = db_path
        self._kek = kek
        self._conn: sqlite3.Connection | None = None
        self._store: Store | None = None

    def _s(self) -> Store:
        if self._store is None:
            self._conn = connect(self.db_path, readonly=True)
            self._store = Store(self._conn)
        return self._store

    def genesis(self) -> str:
        return self._s().meta("genesis_public_key") or ""

    def head(self) -> int:
        h = self._s().head()
        return h[0] if h is not None else self.floor()

    def floor(self) -> int:
        """The last seq crypto-shredded by retention (0 when none was)."""
        return self._s().floor()[0]

    def rows(self, after: int, limit: int) -> list[Row]:
        return list(self._s().rows(after + 1, after + limit))

    def open(self, row: Row) -> dict[str, Any] | None:
        """The record, or None when its day was crypto-shredded; raises AuditError if
        it cannot be decrypted."""
        s = self._s()
        key = s.day_key(row.day, self._kek, create=False)
        return None if key is None else open_record(key, row)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._conn = self._store = None


# -- the TLS link -------------------------------------------------------------------------


_VERIFY = {
    10: ("collector certificate has expired", "collector-cert-expired"),
    9: ("collector certificate is not valid yet (check the box's clock)",
        "collector-cert-not-yet-valid"),
    18: ("collector certificate is self-signed, not issued by the CA in [atna] ca_file",
         "collector-cert-untrusted"),
    19: ("collector certificate is not issued by the CA in [atna] ca_file",
         "collector-cert-untrusted"),
    20: ("collector certificate is not issued by the CA in [atna] ca_file",
         "collector-cert-untrusted"),
    21: ("collector certificate is not issued by the CA in [atna] ca_file",
         "collector-cert-untrusted"),
    62: ("collector certificate does not name the configured host", "collector-name-mismatch"),
    64: ("collector certificate does not name the configured address",
         "collector-name-mismatch"),
}
_ALERTS = {
    "CERTIFICATE_EXPIRED": ("collector refused our client certificate: it has expired",
                            "client-cert-refused"),
    "UNKNOWN_CA": ("collector refused our client certificate: not issued by a CA it trusts",
                   "client-cert-refused"),
    "CERTIFICATE_REQUIRED": ("collector requires a client certificate", "client-cert-refused"),
    "BAD_CERTIFICATE": ("collector refused our client certificate", "client-cert-refused"),
    "WRONG_VERSION_NUMBER": ("the collector port does not speak TLS (plain syslog?)",
                             "not-tls"),
    "PROTOCOL_VERSION": ("the collector does not speak TLS 1.2 or newer", "tls-version"),
}


def describe(exc: BaseException, name: str) -> LinkError:
    """A connect or send failure as an operator sentence and a reason token."""
    if isinstance(exc, LinkError):
        return exc
    if isinstance(exc, ssl.SSLCertVerificationError):
        text, code = _VERIFY.get(int(exc.verify_code or 0),
                                 (f"collector certificate rejected: {exc.verify_message}",
                                  "collector-cert-rejected"))
        if code == "collector-name-mismatch":
            text = f"collector certificate does not name {name!r} ([atna] host / server_name)"
        return LinkError(text, code, hint="the collector needs a certificate for this name "
                         "from the CA in [atna] ca_file")
    if isinstance(exc, ssl.SSLError):
        reason = str(exc.reason or exc).upper()
        for key, (text, code) in _ALERTS.items():
            if key in reason:
                return LinkError(text, code)
        return LinkError(f"TLS with the collector failed ({exc.reason or exc})", "tls")
    if isinstance(exc, ConnectionRefusedError):
        return LinkError("collector refused the TCP connection (not listening?)", "refused")
    if isinstance(exc, TimeoutError):
        return LinkError("collector did not answer in time", "timeout")
    if isinstance(exc, socket.gaierror):
        return LinkError(f"cannot resolve the collector host name ({exc.strerror})", "dns")
    if isinstance(exc, ConnectionError | BrokenPipeError):
        return LinkError("the collector closed the connection", "closed")
    if isinstance(exc, OSError):
        return LinkError(f"collector connection failed ({exc.strerror or exc})", "network")
    return LinkError(f"{type(exc).__name__}: {exc}", "error")


def tls_context(ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    """TLS 1.2+, only the configured CA trusted, host name verified, our client certificate."""
    try:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.check_hostname = True
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cafile=str(ca))
        ctx.load_cert_chain(str(cert), str(key))
    except FileNotFoundError as exc:
        raise LinkError(f"ATNA TLS file missing: {exc.filename}", "config",
                        hint="check [atna] ca_file, cert_file and key_file") from None
    except (ssl.SSLError, OSError) as exc:
        raise LinkError(f"ATNA TLS files unusable: {getattr(exc, 'reason', None) or exc}",
                        "config", hint="[atna] cert_file and key_file must be a matching PEM "
                        "certificate and key; ca_file PEM CA certificate(s)") from None
    return ctx


class Link:
    """One mutual-TLS connection to the collector."""

    def __init__(self, sock: ssl.SSLSocket) -> None:
        self.sock = sock

    @classmethod
    def open(cls, ctx: ssl.SSLContext, host: str, port: int, server_name: str,
             timeout: float) -> Link:
        raw = socket.create_connection((host, port), timeout=timeout)
        try:
            tls = ctx.wrap_socket(raw, server_hostname=server_name)
        except BaseException:
            raw.close()
            raise
        tls.settimeout(SEND_TIMEOUT)
        link = cls(tls)
        if link.peer_closed(SETTLE_SECONDS):
            link.close()
            raise LinkError("the collector closed the connection right after the TLS "
                            "handshake: it refused our client certificate", "client-cert-refused",
                            hint="the collector must trust the CA of [atna] cert_file; see its log")
        return link

    @property
    def version(self) -> str:
        return str(self.sock.version() or "TLS")

    def peer_closed(self, wait: float) -> bool:
        """Whether the collector hung up (it never sends anything on a syslog stream).

        TLS 1.3 session tickets make the socket readable without application data;
        they are consumed here and the wait goes on.
        """
        deadline = time.monotonic() + wait
        while True:
            left = max(0.0, deadline - time.monotonic())
            try:
                ready, _, _ = select.select([self.sock], [], [], left)
            except (OSError, ValueError):
                return True
            if not ready and not self.sock.pending():
                return False
            try:
                self.sock.setblocking(False)
                data = self.sock.recv(4096)
            except ssl.SSLWantReadError:
                data = None
            except (ssl.SSLError, OSError):
                return True
            finally:
                try:
                    self.sock.settimeout(SEND_TIMEOUT)
                except OSError:
                    return True
            if data == b"":
                return True
            if time.monotonic() >= deadline:
                return False

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def wait_acked(self, timeout: float) -> None:
        """Until the collector's TCP stack acknowledged every byte we wrote."""
        deadline = time.monotonic() + timeout
        pause = 0.001
        while True:
            try:
                buf = fcntl.ioctl(self.sock.fileno(), termios.TIOCOUTQ, struct.pack("i", 0))
                queued = int(struct.unpack("i", buf)[0])
            except OSError:
                return  # no send-queue query on this platform: written and flushed is all
            if queued == 0:
                # Drained by an ACK, or purged by a reset: only a live peer means taken.
                if self.peer_closed(0):
                    raise LinkError("the collector closed the connection while taking the "
                                    "records", "closed")
                return
            if self.peer_closed(0):
                raise LinkError("the collector closed the connection before it took the "
                                "records", "closed")
            if time.monotonic() >= deadline:
                raise LinkError(f"the collector did not take {queued} bytes within "
                                f"{timeout:.0f} s", "stalled")
            time.sleep(pause)
            pause = min(pause * 2, 0.05)

    def close(self) -> None:
        try:
            self.sock.settimeout(1.0)
            self.sock.unwrap()  # close_notify: the collector logs no "non-properly terminated"
        except (OSError, ValueError, ssl.SSLError):
            pass
        try:
            self.sock.close()
        except OSError:
            pass


def probe(cfg: Config) -> tuple[bool, str, str]:
    """One mutual-TLS connect to the collector, nothing sent (for ``edge-agent doctor``):
    (ok, what happened, fix).  A second connection does not disturb the daemon's."""
    try:
        dest = egresspolicy.destination(cfg, "atna")
        a = cfg.atna
        assert a.cert_file is not None and a.key_file is not None
        ctx = tls_context(dest.ca_file, a.cert_file, a.key_file)
        link = Link.open(ctx, dest.host, dest.port, dest.server_name,
                         a.connect_timeout_seconds)
    except EdgeAgentError as exc:
        err = exc if isinstance(exc, LinkError) else LinkError(str(exc.args[0]), "config",
                                                               hint=exc.hint)
        return False, f"{cfg.atna.host}:{cfg.atna.port}: {err.args[0]}", err.hint or ""
    except Exception as exc:  # noqa: BLE001 - described for the operator
        err = describe(exc, cfg.atna.server_name or cfg.atna.host)
        return False, f"{cfg.atna.host}:{cfg.atna.port}: {err.args[0]}", err.hint or ""
    version = link.version
    link.close()
    return True, (f"audit repository {dest.host}:{dest.port} accepts the box with mutual "
                  f"TLS ({version}), format {cfg.atna.format}"), ""


# -- the sender ---------------------------------------------------------------------------


@dataclass
class AtnaState:
    """What status and telemetry show about the ATNA link (no record content)."""

    collector: str
    format: str
    connected: bool = False
    since: float = 0.0
    cursor: int = 0
    head: int = 0
    backlog: int = 0
    sent: int = 0
    resent: int = 0
    skipped: int = 0
    unreadable: int = 0
    connects: int = 0
    failures: int = 0
    tls_failures: int = 0
    last_error: str | None = None
    last_error_code: str | None = None
    last_error_at: float | None = None
    last_sent_at: float | None = None
    next_retry_s: float | None = None

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


_TLS_CODES = frozenset({"collector-cert-expired", "collector-cert-not-yet-valid",
                        "collector-cert-untrusted", "collector-name-mismatch",
                        "collector-cert-rejected", "client-cert-refused", "not-tls",
                        "tls-version", "tls"})


def render(fmt: str, rec: Mapping[str, Any], ref: RecordRef) -> str:
    """The MSG of one record in the configured format."""
    if fmt == "fhir-json":
        return fhir.encode(fhir.audit_event(dict(rec), ref))
    return ET.tostring(atna_message(dict(rec), ref), encoding="unicode")


def unreadable_record(row: Row, box: str) -> dict[str, Any]:
    """What is sent for a record that cannot be decrypted: the gap, as a security alert."""
    return {"v": 1, "box": box, "event": "security.alert", "event_id": "110113",
            "event_type": None, "action": "E", "outcome": "major_failure", "outcome_code": 12,
            "user": None, "source": None, "seq": row.seq, "time": iso(row.ts_us),
            "details": {"what": "audit_record_unreadable", "seq": row.seq}, "phi": {}}


class AtnaSender:
    """The thread that walks the audit log and sends it to the collector."""

    def __init__(self, cfg: Config, db_path: Path, kek: KeyEncryptionKey, *,
                 appended: threading.Event, audit: Audit, beat: Beat = no_beat) -> None:
        # The egress policy names the one destination PHI may go to; nothing else is dialled.
        self.dest = egresspolicy.destination(cfg, "atna")
        a = cfg.atna
        assert a.cert_file is not None and a.key_file is not None
        self._cfg = cfg
        self._ctx = tls_context(self.dest.ca_file, a.cert_file, a.key_file)
        self._fmt = a.format
        self._header = syslog.Header.for_box(a.facility, a.app_name, a.format)
        self._timeout = a.connect_timeout_seconds
        self._box = f"{cfg.site}/{cfg.device}"
        self._reader = Reader(db_path, kek)
        self._cursor_file = Cursor(cfg.state_dir / "atna" / "cursor.json")
        self._appended = appended
        self._audit = audit
        self._beat = beat
        self._lock = threading.Lock()
        self.state = AtnaState(collector=f"{self.dest.host}:{self.dest.port}", format=a.format)
        self._link: Link | None = None
        self._genesis = ""
        self._genesis_key = b""
        self._seq = 0
        self._max_sent = 0  # highest seq ever sent, to count re-sends
        self._recent: deque[tuple[float, int]] = deque()  # (monotonic, first seq) on this link
        self._took_any = False  # whether the current link took a batch
        self._retry_at = 0.0
        self._backoff = BACKOFF_MIN
        self._alerted: str | None = None  # reason code of the failure already alerted
        self._stop = threading.Event()
        self._drain_until = 0.0
        self._thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="atna", daemon=True)
        self._thread.start()

    def stop(self, drain_timeout: float = 5.0) -> None:
        """Send what the collector can take within ``drain_timeout``, then close."""
        self._drain_until = time.monotonic() + drain_timeout
        self._stop.set()
        self._appended.set()
        if self._thread is not None:
            self._thread.join(drain_timeout + SEND_TIMEOUT + ACK_TIMEOUT)
            if self._thread.is_alive():
                return  # stuck in a send: it is a daemon thread, the process exit ends it
        self._reader.close()

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return self.state.as_json()

    # -- the loop ---------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            self._beat(doing="sending audit records to the ATNA collector")
            try:
                if self._stop.is_set():
                    # Draining: only over a link that works, only until the deadline.
                    if self._link is None or time.monotonic() >= self._drain_until:
                        break
                    self._refresh()
                    if self._caught_up():
                        break
                self._cycle()
            except Exception as exc:  # noqa: BLE001 - the sender must outlive any failure
                log.error("ATNA sender cycle failed (%s: %s); retrying", type(exc).__name__, exc)
                self._drop()
                self._reader.close()
                self._stop.wait(1.0)
        self._drop()
        if self.state.backlog:
            log.warning("ATNA: %d audit record(s) not yet sent to %s; they are sent after "
                        "the next start", self.state.backlog, self.dest.describe())

    def _caught_up(self) -> bool:
        return self._seq >= self.state.head

    def _cycle(self) -> None:
        self._appended.clear()  # before reading: a record appended meanwhile wakes the wait
        self._refresh()
        if self._caught_up():
            self._beat(progress=True, doing="idle: every audit record sent")
            if self._link is not None and self._link.peer_closed(0):
                self._closed_by_peer()
            if not self._stop.is_set():
                self._appended.wait(IDLE_WAIT)
            return
        if self._link is None:
            if self._stop.is_set():
                return
            wait = self._retry_at - time.monotonic()
            if wait > 0:
                self._set(next_retry_s=round(wait, 1))
                self._stop.wait(min(wait, IDLE_WAIT))
                return
            if not self._connect():
                return
        assert self._link is not None
        if self._link.peer_closed(0):
            self._closed_by_peer()  # the next cycle dials again at once
            return
        self._send_batch(self._link)

    def _refresh(self) -> None:
        """Read the log's identity and head; align the cursor with them."""
        genesis = self._reader.genesis()
        if genesis != self._genesis:
            saved = self._cursor_file.load()
            if saved is not None and saved.genesis == genesis:
                self._seq = saved.seq
            else:
                if saved is not None:
                    log.warning("ATNA: the audit log was replaced (new genesis key); sending "
                                "the new log from its first record")
                # First enabled (or a new log): from the oldest record the log still holds;
                # what retention shredded before was never this sender's to send.
                self._seq = self._reader.floor()
            self._genesis, self._genesis_key = genesis, bytes.fromhex(genesis)
            self._max_sent = max(self._max_sent, self._seq)
        head = self._reader.head()
        if self._seq > head:
            log.error("ATNA: the cursor (seq %d) is past the end of the audit log (seq %d): "
                      "the log was rolled back; sending from its end", self._seq, head)
            self._seq = head
            self._save()
        self._set(head=head, cursor=self._seq, backlog=max(0, head - self._seq))

    def _connect(self) -> bool:
        d = self.dest
        if not egresspolicy.may_send_phi(self._cfg, "atna", d.host, d.port):
            raise AuditError(f"egress policy: {d.describe()} may not receive PHI")
        try:
            self._link = Link.open(self._ctx, d.host, d.port, d.server_name, self._timeout)
        except Exception as exc:  # noqa: BLE001 - every failure is described and retried
            self._failed(describe(exc, d.server_name))
            return False
        self._recent.clear()
        self._took_any = False
        with self._lock:
            self.state.connected = True
            self.state.since = time.time()
            self.state.connects += 1
            self.state.next_retry_s = None
        log.info("ATNA: connected to %s (mutual TLS, %s); %d audit record(s) to send",
                 d.describe(), self._link.version, self.state.backlog)
        if self._alerted is not None:
            self._alerted = None
            self._audit("security.alert", details={"what": "atna_collector_reachable",
                                                   "backlog": self.state.backlog})
        return True

    def _send_batch(self, link: Link) -> None:
        rows = self._reader.rows(self._seq, BATCH)
        if not rows:
            return
        frames: list[bytes] = []
        size = 0
        last = self._seq
        resent = 0
        for row in rows:
            if row.seq != last + 1:
                self._gap(last + 1, row.seq - 1)
            rec = self._record(row)
            last = row.seq
            if rec is None:
                self._gap(row.seq, row.seq)
                continue
            ref = RecordRef.of(self._genesis_key, self._box, row.seq)
            msg = syslog.message(self._header, time=rec.get("time"),
                                 outcome_code=rec.get("outcome_code"),
                                 msg=render(self._fmt, rec, ref))
            frames.append(syslog.frame(msg))
            resent += int(row.seq <= self._max_sent)
            size += len(frames[-1])
            if size >= BATCH_BYTES:
                break
        first = self._seq + 1
        try:
            link.send(b"".join(frames))
            link.wait_acked(ACK_TIMEOUT)
        except Exception as exc:  # noqa: BLE001 - described; the batch is sent again
            self._failed(describe(exc, self.dest.server_name))
            return
        now = time.monotonic()
        self._backoff = BACKOFF_MIN  # only a link that takes records resets the backoff
        self._took_any = True
        self._recent.append((now, first))
        while self._recent and now - self._recent[0][0] > REPLAY_SECONDS:
            self._recent.popleft()
        self._seq = last
        self._max_sent = max(self._max_sent, last)
        self._save()
        with self._lock:
            self.state.sent += len(frames)
            self.state.resent += resent
            self.state.cursor = last
            self.state.backlog = max(0, self.state.head - last)
            self.state.last_sent_at = time.time()
        self._beat(progress=True, doing="sending audit records to the ATNA collector")

    def _record(self, row: Row) -> dict[str, Any] | None:
        try:
            return self._reader.open(row)
        except EdgeAgentError as exc:
            with self._lock:
                self.state.unreadable += 1
            log.error("ATNA: audit record seq %d cannot be decrypted (%s); a security alert "
                      "is sent in its place", row.seq, exc.args[0])
            return unreadable_record(row, self._box)

    def _gap(self, first: int, last: int) -> None:
        n = last - first + 1
        with self._lock:
            self.state.skipped += n
        log.critical("SECURITY: ATNA: audit records seq %d..%d (%d) are gone from the audit "
                     "log (crypto-shredded by retention, or deleted) before they were sent",
                     first, last, n)
        self._audit("security.alert", outcome="serious_failure",
                    details={"what": "atna_records_not_sent", "first_seq": first,
                             "last_seq": last, "count": n})

    def _save(self) -> None:
        self._cursor_file.save(CursorState(self._genesis, self._seq))

    def _rewind(self) -> None:
        """A link that broke: acknowledged by TCP is not read by the collector, so the
        batches of the last REPLAY_SECONDS are sent again (the repository dedupes)."""
        now = time.monotonic()
        recent = [first for at, first in self._recent if now - at <= REPLAY_SECONDS]
        self._recent.clear()
        if recent and min(recent) - 1 < self._seq:
            self._seq = min(recent) - 1
            self._save()

    def _closed_by_peer(self) -> None:
        """The collector hung up (an idle timeout, a restart): not yet a failure; the
        next record reconnects, and a failure to do so is reported then.  A link that
        is closed before it took anything is a failure (backoff, alert): otherwise a
        collector that always hangs up would be redialled in a tight loop."""
        if not self._took_any:
            self._failed(LinkError("the collector closed the connection before it took any "
                                   "record", "closed"))
            return
        log.info("ATNA: %s closed the connection; reconnecting when there is a record to "
                 "send", self.dest.describe())
        self._drop()
        self._rewind()
        with self._lock:
            self.state.cursor = self._seq
            self.state.backlog = max(0, self.state.head - self._seq)

    def _failed(self, err: LinkError) -> None:
        self._drop()
        self._rewind()
        delay = self._backoff * random.uniform(0.5, 1.0)
        self._backoff = min(self._backoff * 2, BACKOFF_MAX)
        self._retry_at = time.monotonic() + delay
        with self._lock:
            s = self.state
            s.failures += 1
            s.tls_failures += int(err.code in _TLS_CODES)
            s.last_error, s.last_error_code, s.last_error_at = str(err.args[0]), err.code, \
                time.time()
            s.next_retry_s = round(delay, 1)
            s.cursor = self._seq
            s.backlog = max(0, s.head - self._seq)
        if self._alerted != err.code:
            self._alerted = err.code
            log.error("ATNA: cannot send audit records to %s: %s%s; %d record(s) wait in the "
                      "audit log, retrying", self.dest.describe(), err.args[0],
                      f" (fix: {err.hint})" if err.hint else "", self.state.backlog)
            self._audit("security.alert", outcome="serious_failure",
                        details={"what": "atna_collector_unavailable", "reason": err.code})
        else:
            log.debug("ATNA: still failing: %s", err.args[0])

    def _drop(self) -> None:
        if self._link is not None:
            self._link.close()
            self._link = None
            with self._lock:
                self.state.connected = False
                self.state.since = time.time()

    def _set(self, **kw: Any) -> None:
        with self._lock:
            for k, v in kw.items():
                setattr(self.state, k, v)
