"""DIMSE on the P-DATA stream (agent/dicom/dimse.py): its codec against
pynetdicom's, the stored bytes against what was sent, and peers that split,
merge or break messages."""

from __future__ import annotations

import io
import random
import socket
import struct
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, dimse_messages
from pynetdicom.dimse_messages import C_ECHO_RQ, C_STORE_RQ, C_STORE_RSP
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from agent.dicom.dimse import (
    StoreRequest,
    command_pdus,
    decode_store_rq,
    encode_response,
    encode_store_rsp,
    iter_pdvs,
)
from tests.helpers.receive import AE_TITLE, ct_files, dcmtk, node, wait_for
from tests.receive.test_receive_limits import read_pdu

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


def pynetdicom_pdus(msg: Any, context_id: int, max_pdu: int) -> list[bytes]:
    out = []
    for p in msg.encode_msg(context_id, max_pdu):
        pdu = P_DATA_TF()
        pdu.from_primitive(p)
        out.append(pdu.encode())
    return out


@pytest.mark.parametrize("status", [0x0000, 0xA700, 0xA900, 0xC210, 0xC211, 0xB007])
@pytest.mark.parametrize("max_pdu", [0, 16384, 64])
def test_store_response_is_byte_identical_to_pynetdicoms(status: int, max_pdu: int) -> None:
    for sop_instance in ("1.2.3.4", "1.2.3.45", generate_uid()):
        for message_id in (1, 7, 65535):
            rsp = C_STORE()
            rsp.MessageIDBeingRespondedTo = message_id
            rsp.AffectedSOPClassUID = CT
            rsp.AffectedSOPInstanceUID = sop_instance
            rsp.Status = status
            msg = C_STORE_RSP()
            msg.primitive_to_message(rsp)
            req = StoreRequest(3, message_id, CT, sop_instance, True)
            assert command_pdus(3, encode_store_rsp(req, status), max_pdu) == \
                pynetdicom_pdus(msg, 3, max_pdu)


def store_rq_command(message_id: int, sop_instance: str, *, sop_class: str = CT,
                     move_ae: str | None = None) -> bytes:
    req = C_STORE()
    req.MessageID = message_id
    req.AffectedSOPClassUID = sop_class
    req.AffectedSOPInstanceUID = sop_instance
    req.Priority = 2
    req.DataSet = io.BytesIO(b"\0" * 8)  # a data set follows: CommandDataSetType 0x0000
    if move_ae is not None:
        req.MoveOriginatorApplicationEntityTitle = move_ae
        req.MoveOriginatorMessageID = 9
    msg = C_STORE_RQ()
    msg.primitive_to_message(req)
    return bytes(dimse_messages.encode(msg.command_set, True, True))


def test_echo_response_is_byte_identical_to_pynetdicoms() -> None:
    from pynetdicom.dimse_messages import C_ECHO_RSP

    for status in (0x0000, 0x0211):
        rsp = C_ECHO()
        rsp.MessageIDBeingRespondedTo = 9
        rsp.AffectedSOPClassUID = Verification
        rsp.Status = status
        msg = C_ECHO_RSP()
        msg.primitive_to_message(rsp)
        ours = encode_response(0x8030, 9, status, sop_class=str(Verification))
        assert command_pdus(1, ours, 16384) == pynetdicom_pdus(msg, 1, 16384)


def echo_rq_command(message_id: int) -> bytes:
    req = C_ECHO()
    req.MessageID = message_id
    req.AffectedSOPClassUID = Verification
    msg = C_ECHO_RQ()
    msg.primitive_to_message(req)
    return bytes(dimse_messages.encode(msg.command_set, True, True))


def test_store_request_decoding_agrees_with_pynetdicom_and_refuses_the_rest() -> None:
    uid = generate_uid()
    for move in (None, "MOVER"):
        got = decode_store_rq(5, store_rq_command(42, uid, move_ae=move))
        assert got == StoreRequest(5, 42, CT, uid, True)
    assert decode_store_rq(1, echo_rq_command(3)) is None
    good = store_rq_command(42, uid)
    for cut in range(len(good)):
        assert decode_store_rq(1, good[:cut]) is None or cut == len(good)
    rng = random.Random(11)
    for _ in range(3000):  # mutations: never an exception, only None or a request
        raw = bytearray(good)
        for _ in range(rng.randint(1, 6)):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
        got = decode_store_rq(1, bytes(raw))
        assert got is None or isinstance(got, StoreRequest)


def pdv(cid: int, mch: int, data: bytes) -> bytes:
    return struct.pack(">LBB", len(data) + 2, cid, mch) + data


def pdata(*items: bytes) -> bytes:
    body = b"".join(items)
    return struct.pack(">BBL", 4, 0, len(body)) + body


def test_malformed_pdata_pdus_are_recognised() -> None:
    good = pdata(pdv(1, 3, b"ab"), pdv(1, 2, b"c"))
    pdvs = iter_pdvs(memoryview(good))
    assert pdvs is not None
    assert [(c, m, good[s:e]) for c, m, s, e in pdvs] == [(1, 3, b"ab"), (1, 2, b"c")]
    bad = [
        pdata(),  # no PDV
        good[:-1],  # shorter than its length
        pdata(struct.pack(">LBB", 1, 1, 3)),  # item shorter than its header
        pdata(pdv(1, 3, b"ab"))[:-1] + b"",  # truncated item
        pdata(pdv(1, 0x13, b"ab")),  # reserved control header bits
        pdata(pdv(1, 3, b"ab") + b"\0\0"),  # trailing bytes that are no item
        b"\x05\x00" + good[2:],  # not a P-DATA-TF
    ]
    for raw in bad:
        assert iter_pdvs(memoryview(raw)) is None, raw


def stored_bytes(n: Any) -> list[bytes]:
    out = []
    for s in n.studies():
        study = n.inbox.study(s.id)
        out += [n.inbox.read(study, i) for i in study.instances]
    return sorted(out)


def send_with_pynetdicom(port: int, files: list[Path], *, max_pdu: int) -> list[int]:
    ae = AE(ae_title="MOD")
    ae.add_requested_context(CTImageStorage, [EXPLICIT_LE])
    ae.add_requested_context(Verification)
    ae.maximum_pdu_size = max_pdu
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    assoc = ae.associate("127.0.0.1", port, ae_title=AE_TITLE, max_pdu=max_pdu)
    assert assoc.is_established
    statuses = []
    for i, f in enumerate(files):
        statuses.append(int(assoc.send_c_store(pydicom.dcmread(f)).Status))
        if i == 1:  # a C-ECHO between C-STOREs goes to pynetdicom
            assert int(assoc.send_c_echo().Status) == 0
    assoc.release()
    return statuses


@pytest.mark.parametrize("max_pdu", [4096, 1 << 20], ids=["fragmented", "one-pdu"])
def test_stored_bytes_are_the_data_sets_sent(tmp_path: Path, max_pdu: int) -> None:
    files = ct_files(tmp_path / "in", 4)
    with node(tmp_path / "n", max_pdu=max_pdu) as n:
        assert send_with_pynetdicom(n.port, files, max_pdu=max_pdu) == [0] * 4
        stored = stored_bytes(n)
        assert len(n.audited("instance.received")) == 4
    sent = {str(pydicom.dcmread(f).SOPInstanceUID): dataset_bytes(f)[1] for f in files}
    assert len(stored) == 4
    for raw in stored:
        ds = pydicom.dcmread(io.BytesIO(raw))
        # The data set after the file meta is byte for byte the one sent.
        meta_end = 132 + 12 + int.from_bytes(raw[140:144], "little")
        assert raw[meta_end:] == sent[str(ds.SOPInstanceUID)]
        assert ds.file_meta.TransferSyntaxUID == EXPLICIT_LE


def test_dcmtk_storescu_is_served(tmp_path: Path) -> None:
    files = ct_files(tmp_path / "in", 3)
    with node(tmp_path) as n:
        r = dcmtk("storescu", "-aet", "MOD", "-aec", AE_TITLE, "127.0.0.1", str(n.port),
                  *map(str, files))
        assert r.returncode == 0, r.stderr
        assert sorted(pydicom.dcmread(io.BytesIO(b)).SOPInstanceUID for b in stored_bytes(n)) \
            == sorted(pydicom.dcmread(f).SOPInstanceUID for f in files)


# -- a scripted peer ----------------------------------------------------------------


def associate_ct_rq() -> bytes:
    """A-ASSOCIATE-RQ: CT Image Storage (context 1) and Verification (context 3)."""
    def item(kind: int, body: bytes) -> bytes:
        return struct.pack(">BBH", kind, 0, len(body)) + body
    app = item(0x10, b"1.2.840.10008.3.1.1.1")
    pcs = (item(0x20, bytes([1, 0, 0, 0]) + item(0x30, CT.encode()) + item(0x40, EXPLICIT_LE.encode()))
           + item(0x20, bytes([3, 0, 0, 0]) + item(0x30, b"1.2.840.10008.1.1")
                  + item(0x40, b"1.2.840.10008.1.2")))
    user = item(0x50, item(0x51, struct.pack(">I", 65536)) + item(0x52, b"1.2.3.4"))
    body = (struct.pack(">HH", 1, 0) + AE_TITLE.ljust(16).encode() + b"MOD".ljust(16)
            + b"\0" * 32 + app + pcs + user)
    return struct.pack(">BBL", 1, 0, len(body)) + body


def dataset_bytes(path: Path) -> tuple[str, bytes]:
    ds = pydicom.dcmread(path)
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_dataset(buf, ds)
    return str(ds.SOPInstanceUID), buf.getvalue()


def response_status(body: bytes) -> tuple[int, int]:
    """(command field, status) of a one-PDV command PDU body."""
    cmd = body[6:]
    found = {}
    pos = 0
    while pos < len(cmd):
        _g, e, n = struct.unpack_from("<HHI", cmd, pos)
        found[e] = cmd[pos + 8:pos + 8 + n]
        pos += 8 + n
    return struct.unpack("<H", found[0x0100])[0], struct.unpack("<H", found[0x0900])[0]


def ct_association(port: int) -> socket.socket:
    """A raw connection with an accepted CT + Verification association."""
    s = socket.create_connection(("127.0.0.1", port))
    s.settimeout(20)
    s.sendall(associate_ct_rq())
    assert read_pdu(s)[0] == 0x02
    return s


def test_a_pdu_ending_one_message_and_starting_another_is_split(tmp_path: Path) -> None:
    files = ct_files(tmp_path / "in", 1)
    uid, data = dataset_bytes(files[0])
    with node(tmp_path) as n, ct_association(n.port) as s:
        # One PDU: the whole C-STORE (command, data set in two fragments) and then
        # a C-ECHO-RQ: two messages, two responses.
        half = len(data) // 2
        s.sendall(pdata(pdv(1, 3, store_rq_command(1, uid)), pdv(1, 0, data[:half]),
                        pdv(1, 2, data[half:]), pdv(3, 3, echo_rq_command(2))))
        answers = [read_pdu(s) for _ in range(2)]
        assert all(k == 0x04 for k, _ in answers)
        assert sorted(response_status(b) for _, b in answers) == [(0x8001, 0), (0x8030, 0)]
        s.sendall(b"\x05\x00" + struct.pack(">L", 4) + b"\0" * 4)  # A-RELEASE-RQ
        assert read_pdu(s)[0] == 0x06
        assert n.stored() == 1


@pytest.mark.parametrize("breach", ["command-mid-data-set", "other-context", "malformed"])
def test_a_peer_breaking_a_message_is_aborted_and_nothing_is_kept(
        tmp_path: Path, breach: str) -> None:
    files = ct_files(tmp_path / "in", 2)
    uid, data = dataset_bytes(files[0])
    with node(tmp_path) as n, ct_association(n.port) as s:
        s.sendall(pdata(pdv(1, 3, store_rq_command(1, uid)), pdv(1, 0, data[:1000])))
        if breach == "command-mid-data-set":
            s.sendall(pdata(pdv(1, 3, store_rq_command(2, uid))))
        elif breach == "other-context":
            s.sendall(pdata(pdv(3, 2, data[1000:])))
        else:
            s.sendall(pdata(struct.pack(">LBB", 1, 1, 2)))
        kind, body = read_pdu(s)
        assert kind in (0x07, -2)
        if kind == 0x07:
            assert body[2:4] == bytes([2, 6])
        assert read_pdu(s)[0] in (-1, -2)
        # Audited as a failed receipt, with what was wrong.
        failed = wait_for(lambda: [d for d in n.audited("instance.received")
                                   if d.get("outcome") == "minor_failure"], 10, "the audit")
        assert failed[0]["details"]["reason"].startswith("association aborted: ")
        # Nothing of the broken message was kept; the node serves the next peer.
        assert send_with_pynetdicom(n.port, files[1:], max_pdu=16384) == [0]
        wait_for(lambda: n.stored() == 1, 10, "the next instance")
        # Slots are emptied when released: only the stored instance's holds data.
        used = [p for p in (n.inbox.root / "files" / "slots").rglob("*")
                if p.is_file() and p.stat().st_size > 0]
        assert len(used) == 1


# -- the registry of other services ------------------------------------------------------

STORAGE_COMMITMENT = "1.2.840.10008.1.20.1"


def test_a_registered_handler_gets_its_request_and_data_set_and_its_reply_goes_back(
        tmp_path: Path) -> None:
    """The extension point for services beyond C-STORE/C-ECHO (here an N-ACTION on
    Storage Commitment, as later work would add): offered at negotiation, the
    request and its data set reach the handler, its status and reply data set
    reach the peer; a handler that fails is answered 0x0110 and the association
    goes on."""
    from pydicom.dataset import Dataset

    import tests.helpers.parrot as parrot
    from agent.dicom.dimse import DimseReply, DimseRequest, default_registry

    seen: list[tuple[int, str, str]] = []

    def commit(req: DimseRequest) -> DimseReply:
        assert req.data_set is not None
        if req.data_set.TransactionUID == "1.2.3.999":
            raise RuntimeError("handler bug")
        seen.append((req.command_field, req.context.abstract_syntax, req.data_set.TransactionUID))
        reply = Dataset()
        reply.TransactionUID = req.data_set.TransactionUID
        return DimseReply(0x0000, reply, sop_instance="1.2.840.10008.1.20.1.1")

    registry = default_registry()
    registry.register(0x0130, STORAGE_COMMITMENT, commit)

    def n_action(message_id: int, transaction: str) -> list[bytes]:
        ds = Dataset()
        ds.TransactionUID = transaction
        cmd = parrot.command(0x0130, message_id, STORAGE_COMMITMENT, has_data=True)
        return [parrot.pdata(parrot.pdv(5, 0x03, cmd)),
                parrot.pdata(parrot.pdv(5, 0x02, parrot_data(ds)))]

    def parrot_data(ds: Dataset) -> bytes:
        buf = DicomBytesIO()
        buf.is_little_endian, buf.is_implicit_VR = True, True
        write_dataset(buf, ds)
        return buf.getvalue()

    contexts = (*parrot.CT_AND_ECHO, (5, STORAGE_COMMITMENT, (parrot.IMPLICIT_LE,)))
    with node(tmp_path, registry=registry) as n, parrot.Parrot(n.port) as p:
        ac = p.associate(AE_TITLE, contexts=contexts)
        assert ac.context_results() == {1: 0, 3: 0, 5: 0}
        p.send(*n_action(1, "1.2.3.4"))
        rsp = p.read()
        assert rsp.command_and_status() == (0x8130, 0x0000)
        assert rsp.dimse()[0x0800] != b"\x01\x01"  # a data set follows
        data = p.read()
        assert data.kind == parrot.P_DATA_TF and data.body[5] == 0x02  # last data fragment
        assert b"1.2.3.4" in data.body
        p.send(*n_action(2, "1.2.3.999"))
        assert p.read().command_and_status() == (0x8130, 0x0110)
        p.send(parrot.pdata(parrot.pdv(3, 0x03, parrot.echo_rq(3))))
        assert p.read().command_and_status() == (0x8030, 0x0000)
        p.send(parrot.release_rq())
        assert p.read().kind == parrot.RELEASE_RP
    assert seen == [(0x0130, STORAGE_COMMITMENT, "1.2.3.4")]
