"""One association, one thread: the acceptor side of the DICOM upper layer (PS3.8 9.2).

Owns the acceptor's states and what moves it between them:

* awaiting the A-ASSOCIATE-RQ (Sta2), bounded by the ARTIM timer
  (``[dicom] acse_timeout``): the whole PDU must be in before it expires, or the
  transport is closed (AA-2);  anything but an A-ASSOCIATE-RQ is answered with
  an A-ABORT (AA-1), an A-ABORT by closing;
* the request is decoded by pynetdicom's public PDU classes and checked
  (protocol version, application context, called AE title, then the owner's
  rules: allowlist, TLS subject, shutdown, holds, rates and bounds) and
  rejected with the PS3.8 result, source and reason, or negotiated
  (agent.dicom.negotiation) and accepted with our maximum PDU length and
  implementation UID; extended negotiation and user identity items are
  ignored (not answered), the asynchronous operations window is not granted:
  one operation at a time;
* data transfer (Sta6): each PDU must be whole within ``[dicom] pdu_timeout``
  of its first byte, and one must begin within ``[dicom] network_timeout``;
  P-DATA-TF goes to the DIMSE layer (agent.dicom.dimse); A-RELEASE-RQ is
  answered with A-RELEASE-RP, after which the requestor closes (Sta13, bounded
  by ARTIM); an A-ABORT closes; any other PDU aborts (AA-8), as does a P-DATA-TF
  over the maximum length we announced, a DIMSE breach or a missed deadline.

Memory per association: one PDU buffer of the announced maximum length.  May
import pynetdicom.pdu and pynetdicom.pdu_primitives (public), and
agent.dicom.transport, negotiation and dimse.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from cryptography import x509
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ, A_RELEASE_RP
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)

from agent.dicom import transport as tp
from agent.dicom.dimse import Breach, DimseLayer, HandlerRegistry, StoreService
from agent.dicom.negotiation import negotiate

log = logging.getLogger(__name__)

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
# Ours, under the 2.25 (UUID) root: what the A-ASSOCIATE-AC and the stored
# instances' file meta name as the implementation.
IMPLEMENTATION_UID = "2.25." + str(uuid.uuid5(uuid.NAMESPACE_URL, "urn:edge-agent:dicom").int)
IMPLEMENTATION_VERSION = "EDGE_AGENT_1"


@dataclass(frozen=True)
class AcceptorSettings:
    ae_title: str
    max_pdu: int
    artim: float  # [dicom] acse_timeout
    pdu_timeout: float
    idle_timeout: float  # [dicom] network_timeout


@dataclass(frozen=True)
class AssociationRequest:
    """Who asks, as far as the node's rules need to know."""

    calling_ae: str
    called_ae: str
    address: str
    port: int
    subject: x509.Name | None  # verified client certificate (DICOM TLS), or None
    tls: bool


@dataclass(frozen=True)
class Rejection:
    """A-ASSOCIATE-RJ parameters (PS3.8 9.3.4) and why, for the audit record."""

    result: int  # 1 permanent, 2 transient
    source: int  # 1 service user, 2 provider (ACSE), 3 provider (presentation)
    reason: int
    why: str


class Owner(Protocol):
    """What the node decides for its associations (agent.dicom.scp)."""

    def admit(self, rq: AssociationRequest) -> Rejection | None:
        """None: accepted, and counted until ``ended``; else the rejection."""
        ...

    def rejected(self, rq: AssociationRequest, rejection: Rejection) -> None:
        """Count and audit a rejection (ours or the owner's) before it is sent."""
        ...

    def store_service(self, rq: AssociationRequest) -> StoreService: ...

    def ended(self, rq: AssociationRequest, *, admitted: bool) -> None:
        """The association is over, however it ended (called once)."""
        ...

    def refused_connection(self, address: str, why: str) -> None:
        """A connection closed before any association (stalled, not DICOM)."""
        ...


class Acceptor:
    """Serves one connection (already handshaken when TLS) from its first PDU to its close."""

    def __init__(self, channel: tp.PduChannel, address: tuple[str, int], settings: AcceptorSettings,
                 owner: Owner, registry: HandlerRegistry, offered: frozenset[str], *,
                 subject: x509.Name | None = None, tls: bool = False) -> None:
        self.ch = channel
        self.address = address
        self.s = settings
        self.owner = owner
        self.registry = registry
        self.offered = offered
        self.subject = subject
        self.tls = tls
        self.dimse: DimseLayer | None = None

    @property
    def peer(self) -> str:
        return self.address[0]

    def run(self) -> None:
        """Never raises; the connection is closed when it returns."""
        rq: AssociationRequest | None = None
        admitted = False
        try:
            got = self._await_request()
            if got is not None:
                rq, pdu = got
                admitted = self._establish(rq, pdu)
                if admitted:
                    try:
                        self._serve()
                    finally:
                        if self.dimse is not None:
                            self.dimse.finished()  # reports it never answered go elsewhere
        except Exception:  # noqa: BLE001 - one association's failure is its own
            log.exception("association with %s failed; aborting", self.peer)
            if self.dimse is not None:
                self.dimse.interrupted("internal error")
            self.ch.abort(tp.SOURCE_PROVIDER, tp.REASON_NOT_SPECIFIED)
        finally:
            self.ch.close()
            if rq is not None:
                try:
                    self.owner.ended(rq, admitted=admitted)
                except Exception:  # noqa: BLE001
                    log.exception("association close bookkeeping failed")

    # -- Sta2: awaiting the A-ASSOCIATE-RQ ---------------------------------------------

    def _await_request(self) -> tuple[AssociationRequest, A_ASSOCIATE_RQ] | None:
        artim = time.monotonic() + self.s.artim
        try:
            kind, raw = self.ch.read(artim, artim)
        except tp.PeerClosed:
            return None  # AA-5
        except tp.Stalled as exc:
            # ARTIM expired (AA-2): close, no A-ABORT.
            self._refused("no A-ASSOCIATE-RQ before the ARTIM timer (acse_timeout) expired"
                          if exc.idle else "incomplete PDU when the ARTIM timer "
                                           "(acse_timeout) expired")
            return None
        except tp.Oversized as exc:
            log.warning("peer %s sent %s before an association; aborting", self.peer, exc)
            self._refused(f"sent {exc}; aborted")
            self.ch.abort(tp.SOURCE_USER, tp.REASON_NOT_SPECIFIED)
            return None
        if kind == tp.A_ABORT:
            return None  # AA-2
        if kind != tp.A_ASSOCIATE_RQ:
            # AA-1: A-ABORT (service-user source), then close.
            what = "unrecognised PDU type" if kind not in tp.KNOWN_PDU_TYPES else "PDU type"
            self._refused(f"{what} 0x{kind:02X} before an association")
            self.ch.abort(tp.SOURCE_USER, tp.REASON_NOT_SPECIFIED)
            return None
        pdu = A_ASSOCIATE_RQ()
        try:
            pdu.decode(bytes(raw))
            calling, called = str(pdu.calling_ae_title).strip(), str(pdu.called_ae_title).strip()
        except Exception:  # noqa: BLE001 - pynetdicom raises many kinds on bad input
            self._refused("undecodable A-ASSOCIATE-RQ; aborted")
            self.ch.abort(tp.SOURCE_USER, tp.REASON_NOT_SPECIFIED)
            return None
        rq = AssociationRequest(calling, called, self.address[0], int(self.address[1]),
                                self.subject, self.tls)
        return rq, pdu

    def _refused(self, why: str) -> None:
        self.owner.refused_connection(self.peer, why)

    # -- negotiation -------------------------------------------------------------------

    def _establish(self, rq: AssociationRequest, pdu: A_ASSOCIATE_RQ) -> bool:
        if not int(pdu.protocol_version) & 0x01:
            return self._reject(rq, Rejection(1, 2, 2, "protocol version not supported"))
        if str(pdu.application_context_name) != APPLICATION_CONTEXT:
            return self._reject(rq, Rejection(1, 1, 2, "application context not supported"))
        if rq.called_ae != self.s.ae_title:
            return self._reject(rq, Rejection(1, 1, 7, "called AE title not recognised"))
        rejection = self.owner.admit(rq)
        if rejection is not None:
            return self._reject(rq, rejection)
        try:
            prim = pdu.to_primitive()
            proposed = prim.presentation_context_definition_list
            user = prim.user_information
            roles = [i for i in user if isinstance(i, SCP_SCU_RoleSelectionNegotiation)]
            peer_max = next((int(i.maximum_length_received or 0) for i in user
                             if isinstance(i, MaximumLengthNotification)), 0)
            result = negotiate(proposed, self.offered | self.registry.sop_classes(), roles,
                               requestor_scp=self.registry.requestor_scp_classes(),
                requestor_either=self.registry.requestor_either_classes())
        except Exception:  # noqa: BLE001 - a request pynetdicom cannot turn into contexts
            log.warning("peer %s (%s) sent presentation contexts that cannot be read; aborting",
                        self.peer, rq.calling_ae)
            self.ch.abort(tp.SOURCE_PROVIDER, tp.REASON_INVALID_PARAMETER)
            return True  # admitted: ``ended`` releases it
        unknown = sorted({str(cx.abstract_syntax) for cx in result.results if cx.result == 0x03})
        if unknown:
            log.info("peer %s (%s) proposed abstract syntaxes this node does not offer: %s",
                     self.peer, rq.calling_ae, ", ".join(unknown[:8]))
        try:
            self.ch.send(self._accept_pdu(prim, result.results, result.roles))
        except OSError:
            return True
        self.dimse = DimseLayer(result.accepted, self.owner.store_service(rq), self.registry,
                                lambda pdus: self.ch.send(*pdus), peer_max)
        return True

    def _reject(self, rq: AssociationRequest, rejection: Rejection) -> bool:
        # Audited before the peer hears of it: the record never trails the rejection.
        self.owner.rejected(rq, rejection)
        self._send_reject(rejection)
        return False

    def _send_reject(self, r: Rejection) -> None:
        pdu = A_ASSOCIATE_RJ()
        pdu.result, pdu.source, pdu.reason_diagnostic = r.result, r.source, r.reason
        try:
            self.ch.send(pdu.encode())
        except OSError:
            return
        # The requestor closes on A-ASSOCIATE-RJ (Sta13, ARTIM).
        self.ch.close(drain=min(self.s.artim, 2.0))

    def _accept_pdu(self, rq: A_ASSOCIATE, results: Sequence[object],
                    roles: Sequence[SCP_SCU_RoleSelectionNegotiation]) -> bytes:
        prim = A_ASSOCIATE()
        prim.application_context_name = APPLICATION_CONTEXT
        prim.calling_ae_title = rq.calling_ae_title
        prim.called_ae_title = rq.called_ae_title
        prim.result = 0x00
        prim.presentation_context_definition_results_list = list(results)  # type: ignore[arg-type]
        max_len = MaximumLengthNotification()
        max_len.maximum_length_received = self.s.max_pdu
        impl = ImplementationClassUIDNotification()
        impl.implementation_class_uid = IMPLEMENTATION_UID
        version = ImplementationVersionNameNotification()
        version.implementation_version_name = IMPLEMENTATION_VERSION
        prim.user_information = [max_len, impl, version, *roles]
        ac = A_ASSOCIATE_AC()
        ac.from_primitive(prim)
        return bytes(ac.encode())

    # -- Sta6: data transfer -----------------------------------------------------------

    def _serve(self) -> None:
        dimse = self.dimse
        if dimse is None:
            return
        while True:
            try:
                kind, pdu = self.ch.read(time.monotonic() + self.s.idle_timeout)
            except tp.PeerClosed:
                dimse.interrupted("connection closed by the peer")  # AA-4
                return
            except tp.Stalled as exc:
                why = ("no PDU within network_timeout" if exc.idle
                       else "incomplete PDU when pdu_timeout expired")
                log.warning("peer %s: %s; aborting the association", self.peer, why)
                dimse.interrupted(why)
                self.ch.abort(tp.SOURCE_PROVIDER, tp.REASON_NOT_SPECIFIED)
                return
            except tp.Oversized as exc:
                log.warning("peer %s sent %s; aborting", self.peer, exc)
                dimse.interrupted(str(exc))
                self.ch.abort(tp.SOURCE_PROVIDER, tp.REASON_INVALID_PARAMETER)
                return
            if kind == tp.P_DATA_TF:
                try:
                    dimse.receive(pdu)
                except Breach as exc:
                    log.warning("peer %s broke the DIMSE protocol (%s); aborting the "
                                "association", self.peer, exc)
                    dimse.interrupted(str(exc))
                    self.ch.abort(tp.SOURCE_PROVIDER, tp.REASON_INVALID_PARAMETER)
                    return
                except OSError:
                    dimse.interrupted("connection lost while answering")
                    return
            elif kind == tp.A_RELEASE_RQ:
                self._release(dimse)
                return
            elif kind == tp.A_ABORT:
                dimse.interrupted("aborted by the peer")  # AA-3
                return
            else:
                unknown = kind not in tp.KNOWN_PDU_TYPES
                log.warning("peer %s sent %s PDU type 0x%02X in an association; aborting",
                            self.peer, "an unrecognised" if unknown else "an unexpected", kind)
                dimse.interrupted(f"unexpected PDU type 0x{kind:02X}")
                self.ch.abort(tp.SOURCE_PROVIDER, tp.REASON_UNRECOGNIZED_PDU if unknown
                              else tp.REASON_UNEXPECTED_PDU)  # AA-8
                return

    def _release(self, dimse: DimseLayer) -> None:
        if dimse.busy:
            dimse.interrupted("released in the middle of a message")
        try:
            self.ch.send(bytes(A_RELEASE_RP().encode()))
        except OSError:
            return
        # Sta13: the requestor closes the transport; what it sends meanwhile is
        # ignored (AA-6), and ARTIM bounds the wait.  Our side is shut at once, so a
        # requestor that waits for the acceptor to close first is not held up.
        self.ch.close(drain=self.s.artim)
