"""Presentation context negotiation for the acceptor.

Owns: the abstract syntaxes the node offers (every storage SOP class pynetdicom
knows, Verification, and whatever the DIMSE registry adds), the transfer
syntaxes it decodes, and the choice among them: pynetdicom's public
``negotiate_as_acceptor`` decides, fed with contexts whose transfer syntax
order is the requestor's (a modality proposes the syntax its data is in first;
choosing another would force it to transcode, which lossy data cannot do), and
with the SCP/SCU role selection items it proposed.  May import
pynetdicom.presentation, pynetdicom.pdu_primitives and agent.dicom.sink.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pynetdicom.pdu_primitives import SCP_SCU_RoleSelectionNegotiation
from pynetdicom.presentation import (
    AllStoragePresentationContexts,
    PresentationContext,
    negotiate_as_acceptor,
)

from agent.dicom.sink import TRANSFER_SYNTAXES

VERIFICATION = "1.2.840.10008.1.1"
# Storage Commitment Push Model (PS3.4 J.3): a PACS sends its N-EVENT-REPORT on an
# association it requests, in the SCP role of the class (PS3.7 D.3.3.4).  The
# classes whose requests reach us from their SCP (the registry's N-EVENT-REPORT
# handlers) are accepted with the requestor as SCP, and only when it asked for
# that role through SCP/SCU role selection.
STORAGE_COMMITMENT_PUSH = "1.2.840.10008.1.20.1"


def storage_sop_classes() -> frozenset[str]:
    """Every storage SOP class pynetdicom knows."""
    return frozenset(str(cx.abstract_syntax) for cx in AllStoragePresentationContexts)


@dataclass(frozen=True)
class Accepted:
    """An accepted presentation context."""

    context_id: int
    abstract_syntax: str
    transfer_syntax: str
    # The roles the requestor negotiated on this context (PS3.7 D.3.3.4): as SCU it
    # may send the class's requests (C-STORE, C-ECHO, N-ACTION, N-CREATE, N-SET), as
    # SCP its notifications (N-EVENT-REPORT).  Without role selection: SCU only.
    peer_scu: bool = True
    peer_scp: bool = False


@dataclass(frozen=True)
class Negotiated:
    results: list[PresentationContext]  # every proposed context with its result
    roles: list[SCP_SCU_RoleSelectionNegotiation]  # role selection replies
    accepted: dict[int, Accepted]


def requestor_order(proposed: Iterable[PresentationContext]) -> dict[str, list[str]]:
    """Per abstract syntax, the transfer syntaxes the requestor proposed, in its order
    (over all the contexts that propose that abstract syntax)."""
    wanted: dict[str, list[str]] = {}
    for cx in proposed:
        order = wanted.setdefault(str(cx.abstract_syntax), [])
        order += [str(t) for t in cx.transfer_syntax if str(t) not in order]
    return wanted


def negotiate(proposed: Sequence[PresentationContext], offered: frozenset[str],
              roles: Sequence[SCP_SCU_RoleSelectionNegotiation] = (),
              syntaxes: Sequence[str] = TRANSFER_SYNTAXES,
              requestor_scp: frozenset[str] = frozenset(),
              requestor_either: frozenset[str] = frozenset()) -> Negotiated:
    """Negotiate the requestor's contexts against the abstract syntaxes we offer.

    Our contexts are built for the proposed abstract syntaxes only, each listing
    the requestor's syntaxes that we decode, in the requestor's order.  The
    requestor may be SCU of each, never SCP (we send no requests): a context it
    proposes only as SCP is rejected, and its role selection items are answered.
    The exception is ``requestor_scp`` (Storage Commitment Push Model, whose
    reports reach us as requests of its SCP): there the requestor may be SCP and never SCU, and the
    context is accepted only when its role selection item proposed the SCP role.
    A class in ``requestor_either`` too (we are Storage Commitment SCP for
    modalities and SCU towards a PACS) is accepted in whichever role is asked.
    """
    ours = frozenset(syntaxes)
    contexts: list[PresentationContext] = []
    for abstract, order in requestor_order(proposed).items():
        if abstract not in offered:
            continue
        pc = PresentationContext()
        pc.abstract_syntax = abstract
        pc.transfer_syntax = [t for t in order if t in ours]
        reported = abstract in requestor_scp
        either = abstract in requestor_either
        pc.scu_role = not reported or either  # the requestor may act as SCU ...
        pc.scp_role = reported  # ... never as SCP, but for commitment reports
        contexts.append(pc)
    proposed_roles = {
        r.sop_class_uid: (r.scu_role, r.scp_role) for r in roles if r.sop_class_uid is not None}
    results, replies = negotiate_as_acceptor(list(proposed), contexts, proposed_roles or None)
    as_scp = {str(uid): bool(r[1]) for uid, r in proposed_roles.items()}
    for cx in results:
        if (cx.result == 0x00 and str(cx.abstract_syntax) in requestor_scp
                and str(cx.abstract_syntax) not in requestor_either
                and not as_scp.get(str(cx.abstract_syntax))):
            cx.result = 0x01  # user rejection: a commitment peer that is no SCP of it
    kept = {str(cx.abstract_syntax) for cx in results if cx.result == 0x00}
    replies = [r for r in replies if str(r.sop_class_uid) in kept]
    accepted = {
        # pynetdicom's as_scu/as_scp are the acceptor's (our) roles: the requestor
        # is SCU where we are SCP and the other way round.
        int(cx.context_id): Accepted(int(cx.context_id), str(cx.abstract_syntax),
                                     str(cx.transfer_syntax[0]),
                                     peer_scu=bool(cx.as_scp), peer_scp=bool(cx.as_scu))
        for cx in results if cx.result == 0x00 and cx.context_id is not None
    }
    return Negotiated(results, list(replies), accepted)
