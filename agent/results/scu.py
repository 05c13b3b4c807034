"""The C-STORE / Storage Commitment SCU towards one PACS destination.

pynetdicom's AE as requestor, public API only.  What this module decides:

* **what a DIMSE status means for the object** (``classify``): Success and the
  Warning statuses (0xB000, 0xB006, 0xB007, 0x0001) mean stored; "Refused: Out of
  Resources" (0xA7xx) and Processing Failure (0x0110) are transient and retried with
  backoff; "Error: Data Set does not match SOP Class" (0xA9xx), "Error: Cannot
  understand" (0xCxxx), "SOP Class not supported" (0x0122) and "Not authorized"
  (0x0124) say that this object will never be taken as it is: it is dead-lettered at
  once, with an alert, instead of being sent again for days.  Anything else is retried.
* **TCP_NODELAY** on the socket (pynetdicom sends a PDU in several writes; with
  Nagle each C-STORE of a small object waits ~40 ms for an ACK).
* **Storage Commitment push model** (PS3.4 J): N-ACTION (action type 1) on the
  well-known instance with a transaction UID the queue stored first; the report
  (N-EVENT-REPORT) is taken on this association when the PACS sends it here, and
  otherwise arrives on a new association to our AE (the acceptor calls
  ``agent.results.delivery.commitment_result``).

Nothing here raises into pynetdicom: handlers return a status.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import StorageCommitmentPushModel  # type: ignore[attr-defined]

from agent.config import ResultDestination

log = logging.getLogger(__name__)

# The well-known SOP Instance of the Storage Commitment Push Model SOP Class (PS3.4 J.3.5).
COMMITMENT_INSTANCE = UID("1.2.840.10008.1.20.1.1")
MAX_PDU = 1048576  # pynetdicom's 16 KiB default costs throughput (DESIGN.md field notes)

Verdict = Literal["stored", "retry", "refused"]


def classify(status: int) -> Verdict:
    """What a C-STORE status means for the object (see the module doc)."""
    if status in (0x0000, 0x0001, 0x0107, 0x0116) or 0xB000 <= status <= 0xBFFF:
        return "stored"
    if 0xA900 <= status <= 0xA9FF or 0xC000 <= status <= 0xCFFF or status in (0x0122, 0x0124):
        return "refused"
    return "retry"  # 0xA7xx out of resources, 0x0110 processing failure, anything unknown


def status_words(status: int) -> str:
    """Our own words for a status (the peer's error comment is never kept)."""
    if status == 0:
        return "success"
    if 0xA700 <= status <= 0xA7FF:
        return f"refused: out of resources (0x{status:04X})"
    if 0xA900 <= status <= 0xA9FF:
        return f"error: data set does not match SOP class (0x{status:04X})"
    if 0xC000 <= status <= 0xCFFF:
        return f"error: cannot understand (0x{status:04X})"
    if 0xB000 <= status <= 0xBFFF:
        return f"warning (0x{status:04X})"
    if status == 0x0122:
        return "refused: SOP class not supported (0x0122)"
    if status == 0x0124:
        return "refused: not authorized (0x0124)"
    if status == 0x0110:
        return "processing failure (0x0110)"
    return f"status 0x{status:04X}"


@dataclass(frozen=True)
class StoreOutcome:
    status: int | None  # None: no answer (aborted, timed out, connection lost)
    verdict: Verdict
    words: str


ReportFn = Callable[[str, list[str], list[str]], object]


def _nodelay(event: evt.Event) -> None:
    try:
        sock = event.assoc.dul.socket
        raw = getattr(sock, "socket", None)
        if isinstance(raw, socket.socket):
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):
        pass  # a slower send, not a failure


def tls_context(dest: ResultDestination) -> ssl.SSLContext | None:
    """Client context for DICOM TLS: the configured CA only, our certificate."""
    t = dest.tls
    if not t.enabled or t.ca is None or t.cert is None or t.key is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(t.ca))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(t.cert), str(t.key))
    return ctx


class Link:
    """One association to a destination, for a batch of objects (and commitment)."""

    def __init__(self, dest: ResultDestination, calling_ae: str, sop_classes: set[str], *,
                 commitment: bool, connect_timeout: float, dimse_timeout: float,
                 on_report: ReportFn | None = None) -> None:
        self.dest = dest
        self._on_report = on_report
        self._reported = threading.Event()
        ae = AE(ae_title=calling_ae)
        ae.connection_timeout = connect_timeout
        ae.acse_timeout = connect_timeout
        ae.dimse_timeout = dimse_timeout
        ae.network_timeout = dimse_timeout
        ae.maximum_pdu_size = MAX_PDU
        for uid in sorted(sop_classes):
            ae.add_requested_context(uid, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        if commitment:
            # Default roles: we are the SCU, the PACS the SCP, and an SCP may send its
            # N-EVENT-REPORT on this association (PS3.4 J.3.3) without role selection.
            # (A report on a NEW association is proposed by the PACS with the SCP role.)
            ae.add_requested_context(StorageCommitmentPushModel,
                                     [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        self._ae = ae
        self.assoc: Association | None = None
        self.error = ""

    def open(self) -> bool:
        dest = self.dest
        tls = None
        try:
            ctx = tls_context(dest)
        except (OSError, ssl.SSLError) as exc:
            self.error = f"TLS files of the destination not usable ({type(exc).__name__})"
            return False
        if ctx is not None:
            tls = (ctx, dest.tls.server_name or dest.host)
        handlers: list[Any] = [(evt.EVT_CONN_OPEN, _nodelay),
                               (evt.EVT_N_EVENT_REPORT, self._report),
                               (evt.EVT_DIMSE_SENT, self._sent)]
        try:
            assoc = self._ae.associate(dest.host, dest.port, ae_title=dest.ae_title,
                                       tls_args=tls, evt_handlers=handlers)
        except (OSError, ValueError, RuntimeError) as exc:
            self.error = f"cannot connect ({type(exc).__name__})"
            return False
        if not assoc.is_established:
            if assoc.is_rejected:
                self.error = "association rejected by the destination (check its AE title " \
                             "and that it knows this box's AE title and address)"
            elif dest.tls.enabled:
                # pynetdicom reports a failed handshake as an abort or a failed connect.
                self.error = ("destination not reachable, or the TLS handshake failed (its "
                              "certificate not signed by tls.ca or not naming tls.server_name/"
                              "host, or our client certificate refused)")
            elif assoc.is_aborted:
                self.error = "association aborted by the destination"
            else:
                self.error = "destination not reachable (connection refused or timed out)"
            return False
        self.assoc = assoc
        return True

    def accepts(self, sop_class: str) -> bool:
        assert self.assoc is not None
        return any(cx.abstract_syntax == sop_class and cx.result == 0
                   for cx in self.assoc.accepted_contexts)

    def alive(self) -> bool:
        return self.assoc is not None and self.assoc.is_established

    def store(self, ds: Dataset) -> StoreOutcome:
        assert self.assoc is not None
        try:
            rsp = self.assoc.send_c_store(ds)
        except (OSError, ValueError, RuntimeError, AttributeError) as exc:
            return StoreOutcome(None, "retry", f"send failed ({type(exc).__name__})")
        status = rsp.get("Status") if rsp is not None else None
        if status is None:
            why = ("association aborted" if self.assoc.is_aborted else
                   "no answer within the DIMSE timeout")
            return StoreOutcome(None, "retry", why)
        code = int(status)
        return StoreOutcome(code, classify(code), status_words(code))

    def request_commitment(self, transaction_uid: str,
                           refs: list[tuple[str, str]]) -> tuple[int | None, str]:
        """N-ACTION-RQ (Request Storage Commitment); (status, words)."""
        assert self.assoc is not None
        if not self.accepts(str(StorageCommitmentPushModel)):
            return None, "the destination does not offer storage commitment"
        ds = Dataset()
        ds.TransactionUID = transaction_uid
        seq = []
        for sop_class, sop_uid in refs:
            item = Dataset()
            item.ReferencedSOPClassUID = sop_class
            item.ReferencedSOPInstanceUID = sop_uid
            seq.append(item)
        ds.ReferencedSOPSequence = seq
        try:
            status, _reply = self.assoc.send_n_action(ds, 1, StorageCommitmentPushModel,
                                                      COMMITMENT_INSTANCE)
        except (OSError, ValueError, RuntimeError, AttributeError) as exc:
            return None, f"commitment request failed ({type(exc).__name__})"
        code = status.get("Status") if status is not None else None
        if code is None:
            return None, "no answer to the commitment request"
        return int(code), status_words(int(code))

    def wait_report(self, seconds: float) -> bool:
        """Keep the association open up to ``seconds`` for a report on it."""
        if seconds <= 0:
            return False
        return self._reported.wait(seconds)

    def _report(self, event: evt.Event) -> tuple[int, None]:
        """N-EVENT-REPORT on our association: hand it over, answer Success (pynetdicom
        takes (status, Event Reply) from this handler)."""
        try:
            report = event.event_information
            if not isinstance(report, Dataset):
                return 0x0110, None
            tx, ok, failed = parse_report(report)
            if self._on_report is not None and tx:
                self._on_report(tx, ok, failed)
            return 0x0000, None
        except Exception:  # noqa: BLE001 - never raise into pynetdicom
            log.exception("storage commitment report on the send association not handled")
            return 0x0110, None

    def _sent(self, event: evt.Event) -> None:
        """Our answer to a report has gone out: now the association may be released
        (releasing earlier would leave the PACS without its N-EVENT-REPORT-RSP)."""
        if type(event.message).__name__ == "N_EVENT_REPORT_RSP":
            self._reported.set()

    def close(self) -> None:
        if self.assoc is not None:
            try:
                if self.assoc.is_established:
                    self.assoc.release()
            except Exception:  # noqa: BLE001 - closing a broken association
                self.assoc.abort()
            self.assoc = None


def parse_report(ds: Dataset) -> tuple[str, list[str], list[str]]:
    """(transaction UID, committed SOP Instance UIDs, failed ones) of a report's
    Event Information (PS3.4 J.3.3)."""
    tx = str(ds.get("TransactionUID", "") or "")
    ok = [str(i.ReferencedSOPInstanceUID) for i in ds.get("ReferencedSOPSequence", []) or []
          if "ReferencedSOPInstanceUID" in i]
    failed = [str(i.ReferencedSOPInstanceUID) for i in ds.get("FailedSOPSequence", []) or []
              if "ReferencedSOPInstanceUID" in i]
    return tx, ok, failed


def new_transaction_uid() -> str:
    return str(generate_uid(prefix="2.25."))
