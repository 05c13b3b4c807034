"""A request the node sends after a response (Storage Commitment's N-EVENT-REPORT,
agent/dicom/dimse.py ``EventReport``): it follows the response on the association,
the peer's answer is matched by Message ID, and a report the peer never answered
(it released at once) is handed on to be sent elsewhere."""

from __future__ import annotations

import threading
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset

import tests.helpers.parrot as parrot
from agent.dicom.dimse import (
    DimseReply,
    DimseRequest,
    EventReport,
    default_registry,
    encode_response,
)
from tests.helpers.receive import AE_TITLE, node

STORAGE_COMMITMENT = "1.2.840.10008.1.20.1"
WELL_KNOWN = "1.2.840.10008.1.20.1.1"


def _data(ds: Dataset) -> bytes:
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, True
    write_dataset(buf, ds)
    return buf.getvalue()


def _run(tmp_path: Path, *, answer: bool) -> tuple[list[int], threading.Event, bytes]:
    answered: list[int] = []
    undelivered = threading.Event()

    def commit(req: DimseRequest) -> DimseReply:
        info = Dataset()
        info.TransactionUID = "1.2.3.4"
        return DimseReply(0x0000, sop_instance=WELL_KNOWN, follow_up=EventReport(
            STORAGE_COMMITMENT, WELL_KNOWN, 1, info, undelivered.set, answered.append))

    registry = default_registry()
    registry.register(0x0130, STORAGE_COMMITMENT, commit)
    contexts = (*parrot.CT_AND_ECHO, (5, STORAGE_COMMITMENT, (parrot.IMPLICIT_LE,)))
    action = Dataset()
    action.TransactionUID = "1.2.3.4"
    with node(tmp_path, registry=registry) as n, parrot.Parrot(n.port) as p:
        assert p.associate(AE_TITLE, contexts=contexts).context_results()[5] == 0
        p.send(parrot.pdata(parrot.pdv(5, 0x03, parrot.command(0x0130, 7, STORAGE_COMMITMENT,
                                                               has_data=True))),
               parrot.pdata(parrot.pdv(5, 0x02, _data(action))))
        assert p.read().command_and_status() == (0x8130, 0x0000)
        cmd = p.read().dimse()  # the N-EVENT-REPORT-RQ command
        event_data = p.read().body  # its event information
        if answer:
            message_id = int.from_bytes(cmd[0x0110], "little")
            p.send(parrot.pdata(parrot.pdv(5, 0x03, encode_response(
                0x8100, message_id, 0x0000, sop_class=STORAGE_COMMITMENT,
                sop_instance=WELL_KNOWN))))
            # Answered: the association goes on.
            p.send(parrot.pdata(parrot.pdv(3, 0x03, parrot.echo_rq(8))))
            assert p.read().command_and_status() == (0x8030, 0x0000)
        p.send(parrot.release_rq())
        assert p.read().kind == parrot.RELEASE_RP
    assert int.from_bytes(cmd[0x0100], "little") == 0x0100
    assert int.from_bytes(cmd[0x1002], "little") == 1
    return answered, undelivered, event_data


def test_an_answered_report_is_recorded_and_not_sent_again(tmp_path: Path) -> None:
    answered, undelivered, data = _run(tmp_path, answer=True)
    assert b"1.2.3.4" in data
    assert answered == [0x0000]
    assert not undelivered.wait(1)


def test_a_report_the_peer_released_under_is_handed_on(tmp_path: Path) -> None:
    answered, undelivered, _ = _run(tmp_path, answer=False)
    assert answered == []
    assert undelivered.wait(10)
