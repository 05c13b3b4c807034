"""The DICOM node against a scripted misbehaving peer (tests/receive/parrot.py): PDUs
out of order in every state of the acceptor, half PDUs and silence, oversized
lengths, negotiation items it does not implement, services it does not offer.
Each case checks the PS3.8 reaction on the wire (A-ASSOCIATE-RJ with its reason,
A-ABORT, release, a DIMSE status) and that the node then still serves a modality.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

import tests.helpers.parrot as parrot
from tests.helpers.parrot import Parrot, Reply
from tests.helpers.receive import AE_TITLE, Node, association_threads, node, wait_for

TIMEOUTS = {"acse_timeout": 3.0, "pdu_timeout": 3.0, "network_timeout": 3.0}


@pytest.fixture(scope="module", params=[1, 2], ids=["in-process", "2-workers"])
def n(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    with node(tmp_path_factory.mktemp("parrot"), workers=request.param, max_pdu=65536,
              associations_per_minute_per_peer=10_000, max_associations=64,
              max_associations_per_peer=16, **TIMEOUTS) as running:
        yield running


def still_serving(n: Node) -> None:
    """A well-behaved peer right after: associate, C-ECHO, release."""
    with Parrot(n.port) as p:
        p.associate(AE_TITLE)
        p.send(parrot.pdata(parrot.pdv(3, 0x03, parrot.echo_rq(7))))
        assert p.read().command_and_status() == (0x8030, 0x0000)
        p.send(parrot.release_rq())
        assert p.read().kind == parrot.RELEASE_RP
        assert p.ended()
    wait_for(lambda: n.scp.counters.active == 0, 20, "no association left open")


def assert_provider_abort(r: Reply, *reasons: int) -> None:
    """An A-ABORT from the service provider (or the reset that may overtake it)."""
    if r.kind == parrot.ABORT:
        source, reason = r.abort_source_reason
        assert source == 2 and reason in reasons, (source, reason)


# -- before the association (Sta2: awaiting the A-ASSOCIATE-RQ) -------------------------

UNEXPECTED_FIRST = {
    "p-data": parrot.pdata(parrot.pdv(1, 0x03, parrot.echo_rq(1))),
    "release-rq": parrot.release_rq(),
    "release-rp": parrot.release_rp(),
    "associate-ac": parrot.associate_ac_like(),
    "associate-rj": parrot.associate_rj(),
    "unknown-type": parrot.pdu(0x09, b"\0" * 8),
    "http": b"GET / HTTP/1.1\r\nHost: box\r\n\r\n",
}


@pytest.mark.parametrize("what", sorted(UNEXPECTED_FIRST))
def test_unexpected_first_pdu_is_aborted(n: Node, what: str) -> None:
    # PS3.8 9.2 state table, Sta2 + Evt3/4/10/12/13/19: AA-1 (A-ABORT, then close).
    with Parrot(n.port) as p:
        p.send(UNEXPECTED_FIRST[what])
        p.aborted()
    still_serving(n)


def test_abort_before_association_just_closes(n: Node) -> None:
    # Sta2 + Evt16: AA-2, close without answering.
    with Parrot(n.port) as p:
        p.send(parrot.abort())
        assert p.read().kind in (parrot.CLOSED, parrot.RESET)
    still_serving(n)


def test_unsupported_protocol_version_is_rejected_permanently(n: Node) -> None:
    with Parrot(n.port) as p:
        p.send(parrot.associate_rq(AE_TITLE, version=2))
        r = p.read()
        assert r.kind == parrot.ASSOCIATE_RJ
        # result: rejected-permanent; source: service-provider (ACSE); reason:
        # protocol-version-not-supported (PS3.8 9.3.4).
        assert tuple(r.body[1:4]) == (1, 2, 2)
        assert p.ended()
    still_serving(n)


def test_another_application_context_is_rejected_permanently(n: Node) -> None:
    with Parrot(n.port) as p:
        p.send(parrot.associate_rq(AE_TITLE, app_context="1.2.3.4.5"))
        r = p.read()
        assert r.kind == parrot.ASSOCIATE_RJ
        # rejected-permanent; service user; application-context-name-not-supported.
        assert tuple(r.body[1:4]) == (1, 1, 2)
        assert p.ended()
    still_serving(n)


def test_half_associate_rq_then_silence_is_closed_at_artim(n: Node) -> None:
    threads = threading.active_count()
    with Parrot(n.port) as p:
        p.send(parrot.associate_rq(AE_TITLE)[:30])
        # ARTIM expiry before an association: AA-2, the transport is closed.
        r = p.read(timeout=30)
        assert r.kind in (parrot.CLOSED, parrot.RESET), r
    still_serving(n)
    wait_for(lambda: threading.active_count() <= threads, 20, "the connection's thread to end")


def test_oversized_associate_rq_is_refused_before_it_is_read(n: Node) -> None:
    with Parrot(n.port) as p:
        p.send(struct.pack(">BBL", parrot.ASSOCIATE_RQ, 0, 64 << 20) + b"\0" * 64)
        r = p.read()
        assert r.kind in (parrot.ABORT, parrot.RESET, parrot.CLOSED), r
        assert p.ended()
    still_serving(n)


# -- inside the association (Sta6: data transfer) ----------------------------------------

UNEXPECTED_IN_ASSOCIATION = {
    "associate-rq": (parrot.associate_rq(AE_TITLE), (0, 2)),
    "associate-ac": (parrot.associate_ac_like(), (0, 2)),
    "associate-rj": (parrot.associate_rj(), (0, 2)),
    "release-rp": (parrot.release_rp(), (0, 2)),
    "unknown-type": (parrot.pdu(0x09, b"\0" * 8), (0, 1, 6)),
    "garbage": (b"\xff" * 100, (0, 1, 6)),
}


@pytest.mark.parametrize("what", sorted(UNEXPECTED_IN_ASSOCIATION))
def test_unexpected_pdu_after_the_association_is_aborted(n: Node, what: str) -> None:
    # Sta6 + Evt3/4/6/13/19: AA-8, A-ABORT from the service provider.
    raw, reasons = UNEXPECTED_IN_ASSOCIATION[what]
    with Parrot(n.port) as p:
        p.associate(AE_TITLE)
        p.send(raw)
        assert_provider_abort(p.aborted(), *reasons)
    still_serving(n)


def test_peer_abort_in_association_closes(n: Node) -> None:
    with Parrot(n.port) as p:
        p.associate(AE_TITLE)
        p.send(parrot.abort())
        assert p.read().kind in (parrot.CLOSED, parrot.RESET)
    still_serving(n)


@pytest.mark.parametrize("what", ["associate-rq", "release-rp", "unknown-type"])
def test_unexpected_pdu_during_a_c_store_is_aborted_and_nothing_is_kept(n: Node,
                                                                        what: str) -> None:
    before = n.stored()
    with Parrot(n.port) as p:
        p.associate(AE_TITLE)
        p.send(parrot.pdata(parrot.pdv(1, 0x03, parrot.store_rq(1, generate_uid()))),
               parrot.pdata(parrot.pdv(1, 0x00, b"\x08\x00\x16\x00UI\x1a\x00")))
        p.send(UNEXPECTED_IN_ASSOCIATION[what][0])
        assert_provider_abort(p.aborted(), *UNEXPECTED_IN_ASSOCIATION[what][1])
    still_serving(n)
    assert n.stored() == before


def test_half_pdata_then_silence_is_aborted_at_the_pdu_deadline(n: Node) -> None:
    threads = threading.active_count()
    with Parrot(n.port) as p:
        p.associate(AE_TITLE)
        p.send(parrot.pdata(parrot.pdv(1, 0x03, parrot.store_rq(1, generate_uid())))[:20])
        assert_provider_abort(p.aborted(), 0)
    still_serving(n)
    wait_for(lambda: threading.active_count() <= threads, 20, "the connection's thread to end")


def test_oversized_pdata_is_aborted_before_it_is_read(n: Node) -> None:
    with Parrot(n.port) as p:
        p.associate(AE_TITLE)
        p.send(struct.pack(">BBL", parrot.P_DATA_TF, 0, 1 << 30) + b"\0" * 1024)
        # PS3.8 9.3.5: longer than the maximum length we announced: invalid PDU parameter.
        assert_provider_abort(p.aborted(), 6)
    still_serving(n)


def test_pdata_on_a_context_that_was_not_accepted_is_aborted(n: Node) -> None:
    with Parrot(n.port) as p:
        p.associate(AE_TITLE)
        p.send(parrot.pdata(parrot.pdv(9, 0x03, parrot.echo_rq(1))))
        assert_provider_abort(p.aborted(), 0, 6)
    still_serving(n)


# -- release -----------------------------------------------------------------------------


@pytest.mark.parametrize("then", ["p-data", "associate-rq", "release-rq"])
def test_after_a_release_request_the_node_answers_and_closes(n: Node, then: str) -> None:
    follow = {"p-data": parrot.pdata(parrot.pdv(3, 0x03, parrot.echo_rq(2))),
              "associate-rq": parrot.associate_rq(AE_TITLE),
              "release-rq": parrot.release_rq()}[then]
    with Parrot(n.port) as p:
        p.associate(AE_TITLE)
        p.send(parrot.release_rq(), follow)
        r = p.read()
        # Answered at once (Sta13: what follows is ignored, AA-6, or aborted, AA-7),
        # or, by a node still awaiting its local release response (Sta8), the PDU
        # that follows aborts the association (AA-8).  The connection ends either way.
        assert r.kind in (parrot.RELEASE_RP, parrot.ABORT), r
        assert p.ended()
    still_serving(n)


# -- negotiation items we do not implement -----------------------------------------------


def test_role_selection_user_identity_and_async_window_are_answered_politely(n: Node) -> None:
    extra = (parrot.role_selection(parrot.CT, 1, 0) + parrot.async_window(5, 5)
             + parrot.user_identity("radiographer", "secret"))
    with Parrot(n.port) as p:
        ac = p.associate(AE_TITLE, extra_user_items=extra)
        items = ac.user_items()
        # No user identity server response: we do not authenticate users that way.
        assert 0x59 not in items
        # One operation at a time: no window item, or 1/1.
        assert items.get(0x53, [struct.pack(">HH", 1, 1)]) == [struct.pack(">HH", 1, 1)]
        # The requestor stays SCU of CT storage (we are its SCP).
        for role in items.get(0x54, []):
            n_uid = struct.unpack(">H", role[:2])[0]
            assert role[2:2 + n_uid].rstrip(b"\0").decode() == parrot.CT
            assert tuple(role[2 + n_uid:]) == (1, 0)
        assert ac.context_results() == {1: 0, 3: 0}
        p.send(parrot.pdata(parrot.pdv(3, 0x03, parrot.echo_rq(1))))
        assert p.read().command_and_status() == (0x8030, 0x0000)
        p.send(parrot.release_rq())
        assert p.read().kind == parrot.RELEASE_RP
    still_serving(n)


# -- services we do not offer ------------------------------------------------------------


def test_query_retrieve_contexts_are_refused_at_negotiation(n: Node) -> None:
    contexts = (*parrot.CT_AND_ECHO, (5, parrot.STUDY_ROOT_FIND, (parrot.IMPLICIT_LE,)),
                (7, parrot.STUDY_ROOT_MOVE, (parrot.IMPLICIT_LE,)))
    with Parrot(n.port) as p:
        ac = p.associate(AE_TITLE, contexts=contexts)
        # 3: abstract syntax not supported (PS3.8 9.3.3.2).
        assert ac.context_results() == {1: 0, 3: 0, 5: 3, 7: 3}
        p.send(parrot.release_rq())
        assert p.read().kind == parrot.RELEASE_RP


@pytest.mark.parametrize("request_kind", ["c-find", "c-move"])
def test_a_request_we_do_not_serve_gets_0211_and_the_association_goes_on(
        n: Node, request_kind: str) -> None:
    rq, rsp = ((parrot.find_rq(1, parrot.CT), 0x8020) if request_kind == "c-find"
               else (parrot.move_rq(1, parrot.CT), 0x8021))
    with Parrot(n.port) as p:
        p.associate(AE_TITLE)
        p.send(parrot.pdata(parrot.pdv(1, 0x03, rq)),
               parrot.pdata(parrot.pdv(1, 0x02, parrot.query_identifier())))
        r = p.read()
        if r.kind == parrot.P_DATA_TF:
            assert r.command_and_status() == (rsp, 0x0211)  # unrecognised operation
            p.send(parrot.pdata(parrot.pdv(3, 0x03, parrot.echo_rq(2))))
            assert p.read().command_and_status() == (0x8030, 0x0000)
            p.send(parrot.release_rq())
            assert p.read().kind == parrot.RELEASE_RP
        else:  # a node that cannot frame a response aborts instead
            assert_provider_abort(r, 0, 2)
    still_serving(n)


def test_the_node_held_no_association_after_the_suite(n: Node, tmp_path: Path) -> None:
    try:
        wait_for(lambda: n.scp.counters.active == 0, 20, "no association left open")
        wait_for(lambda: n.scp.limiter.connections() == 0, 20, "no connection left open")
    except TimeoutError as exc:
        # Seen once under heavy load (in-process): say what the node still waits for.
        raise AssertionError(f"{exc}: {n.scp.counters.active} association(s), "
                             f"{n.scp.limiter.connections()} connection(s) counted\n"
                             f"{association_threads()}") from None


# -- roles enforced per message (PS3.7 D.3.3.4) --------------------------------------------

COMMITMENT = "1.2.840.10008.1.20.1"
COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"


def _event_report(message_id: int) -> bytes:
    # The command of parrot.command plus Event Type ID (0000,1002) after (0000,1000).
    body = parrot.command(0x0100, message_id, COMMITMENT, has_data=True,
                          sop_instance=COMMITMENT_INSTANCE)[12:]
    body += struct.pack("<HHIH", 0, 0x1002, 2, 1)
    return struct.pack("<HHII", 0, 0, 4, len(body)) + body


def _event_information(tx: str) -> bytes:
    """Transaction UID + one Referenced SOP Sequence item, Implicit VR Little Endian."""
    def ui(group: int, elem: int, uid: str) -> bytes:
        raw = uid.encode() + (b"\0" if len(uid) % 2 else b"")
        return struct.pack("<HHI", group, elem, len(raw)) + raw
    inner = ui(0x0008, 0x1150, parrot.CT) + ui(0x0008, 0x1155, generate_uid())
    item_ = struct.pack("<HHI", 0xFFFE, 0xE000, len(inner)) + inner
    return ui(0x0008, 0x1195, tx) + struct.pack("<HHI", 0x0008, 0x1199, len(item_)) + item_


@pytest.fixture(scope="module", params=[1, 2], ids=["in-process", "2-workers"])
def reporting(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
              ) -> Iterator[tuple[Node, list[str]]]:
    """A node whose own commitment SCU takes reports (every report is recorded)."""
    taken: list[str] = []

    def in_process(tx: str, ok: list[str], failed: list[str]) -> bool:
        taken.append(tx)
        return True

    def later(tx: str, ok: list[str], failed: list[str], answer: object) -> None:
        taken.append(tx)
        answer(True)  # type: ignore[operator]

    with node(tmp_path_factory.mktemp("roles"), workers=request.param,
              on_commitment=in_process if request.param == 1 else later,
              associations_per_minute_per_peer=10_000, **TIMEOUTS) as running:
        yield running, taken


@pytest.mark.parametrize("scu, scp, expected", [(1, 0, 0x0211), (0, 1, 0x0000), (1, 1, 0x0000)],
                         ids=["scu-only", "scp-only", "both"])
def test_an_event_report_needs_the_scp_role_on_its_context(
        reporting: tuple[Node, list[str]], scu: int, scp: int, expected: int) -> None:
    """An N-EVENT-REPORT is the SCP's message (PS3.7 10.1.1): from a peer that
    negotiated only the SCU role of Storage Commitment (a modality asking us to
    commit) it is answered 0x0211 and never reaches our commitment SCU's report
    handler; the association goes on.  The SCP role (a PACS reporting) is served."""
    n, taken = reporting
    tx = generate_uid()
    with Parrot(n.port) as p:
        ac = p.associate(AE_TITLE, contexts=((1, COMMITMENT, (parrot.IMPLICIT_LE,)),
                                             (3, parrot.VERIFICATION, (parrot.IMPLICIT_LE,))),
                         extra_user_items=parrot.role_selection(COMMITMENT, scu, scp))
        assert ac.context_results() == {1: 0, 3: 0}
        p.send(parrot.pdata(parrot.pdv(1, 0x03, _event_report(5))),
               parrot.pdata(parrot.pdv(1, 0x02, _event_information(tx))))
        assert p.read().command_and_status() == (0x8100, expected)
        p.send(parrot.pdata(parrot.pdv(3, 0x03, parrot.echo_rq(6))))
        assert p.read().command_and_status() == (0x8030, 0x0000)
        p.send(parrot.release_rq())
        assert p.read().kind == parrot.RELEASE_RP
    assert (tx in taken) == (expected == 0x0000)
