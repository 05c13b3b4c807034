"""Inbox streaming writes, the rate limiter's window, and an instance cut off
mid-transfer by its peer."""

from __future__ import annotations

import io
import os
import random
import socket
import struct
from pathlib import Path

import pydicom
import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import create_file_meta
from pynetdicom.pdu import P_DATA_TF

from agent.config import InboxSettings, StudySettings
from agent.crypto import CHUNK_BYTES, KeyEncryptionKey, StreamWriter, open_stream, random_key
from agent.dicom.admission import Admitted, AuditThrottle, PeerLimiter, PeerLimits
from agent.dicom.sink import MetaFields
from agent.errors import CryptoError
from agent.store.inbox import Inbox
from tests.helpers.receive import AE_TITLE, ct_files, node, wait_for


def make_inbox(root: Path) -> Inbox:
    return Inbox(root, KeyEncryptionKey(random_key()), random_key(),
                 InboxSettings(max_bytes=10**12, min_free_bytes=0), StudySettings())


def test_instance_of_a_study_completed_while_streaming_goes_to_a_follow_up(tmp_path: Path) -> None:
    ib = make_inbox(tmp_path / "inbox")
    first = ib.begin("1.2.3.4")
    first.write(b"A" * 1000)
    r1 = ib.commit(first, sop_uid="1.2.3.4.1", sop_class="x", transfer_syntax="ts",
                   calling_ae="MOD", peer="127.0.0.1")
    late = ib.begin("1.2.3.4")  # streaming starts while version 1 is open...
    late.write(b"B" * (3 << 20))
    assert ib.complete_all() == [1]  # ...and version 1 completes
    r2 = ib.commit(late, sop_uid="1.2.3.4.2", sop_class="x", transfer_syntax="ts",
                   calling_ae="MOD", peer="127.0.0.1")
    assert (r1.study_version, r2.study_version) == (1, 2)
    v1, v2 = ib.study(1), ib.study(2)
    assert [ib.read(v1, i) for i in v1.instances] == [b"A" * 1000]
    assert [ib.read(v2, i) for i in v2.instances] == [b"B" * (3 << 20)]
    ib.close()


def test_a_refused_write_leaves_no_empty_study_version(tmp_path: Path) -> None:
    ib = make_inbox(tmp_path / "inbox")
    refused = ib.begin("1.2.3")  # opens the study's first version
    refused.write(b"refused")
    refused.abort()
    assert ib.counts()["open"] == 0
    # Two writes into one new version; one is refused while the other streams:
    # the version goes with the refusal, the other instance lands in a new one.
    a, b = ib.begin("1.2.4"), ib.begin("1.2.4")
    b.write(b"kept")
    a.abort()
    assert ib.counts()["open"] == 0
    receipt = ib.commit(b, sop_uid="1.2.4.1", sop_class="x", transfer_syntax="ts",
                        calling_ae="MOD", peer="p")
    assert ib.counts()["open"] == 1
    rows = ib._db.execute("SELECT id FROM studies").fetchall()
    study = ib.study(int(rows[0][0]))
    assert [ib.read(study, i) for i in study.instances] == [b"kept"]
    assert receipt.outcome == "stored"
    # A version left empty by a process that died is gone after a restart.
    crashed = ib.begin("1.2.5")
    crashed._fh.flush()  # type: ignore[union-attr]
    ib._db.close()  # no abort: as if killed
    again = Inbox(tmp_path / "inbox", ib._kek, ib._pkey, ib.settings, ib.study_settings)
    assert again.counts()["open"] == 1  # only the kept study
    again.close()


def test_unacknowledged_slots_are_emptied_and_reused_after_a_crash(tmp_path: Path) -> None:
    ib = make_inbox(tmp_path / "inbox")
    kept = ib.begin("1.2.3")
    kept.write(b"kept")
    receipt = ib.commit(kept, sop_uid="1.2.3.1", sop_class="x", transfer_syntax="ts",
                        calling_ae="MOD", peer="p")
    crashed = ib.begin("1.2.3")
    crashed.write(b"never acknowledged" * 1000)
    crashed._fh.flush()  # type: ignore[union-attr]  # as if the process died here
    partial = crashed.path
    ib._db.close()  # no abort: simulate kill -9
    again = Inbox(tmp_path / "inbox", ib._kek, ib._pkey, ib.settings, ib.study_settings)
    assert partial.stat().st_size == 0 and partial in again._free
    assert receipt.instance.path not in again._free
    study = again.study(1)
    assert [again.read(study, i) for i in study.instances] == [b"kept"]
    again.close()


def test_rate_limit_window_slides() -> None:
    now = [1000.0]
    lim = PeerLimiter(PeerLimits(max_connections_per_peer=2, max_connections=3,
                                 associations_per_minute_per_peer=2), clock=lambda: now[0])
    assert [lim.allow_association("a") for _ in range(3)] == [True, True, False]
    assert lim.allow_association("b")  # per peer
    now[0] += 59.0
    assert not lim.allow_association("a")
    now[0] += 1.0
    assert lim.allow_association("a")
    assert [lim.admit("a", i).ok for i in range(3)] == [True, True, False]  # per peer
    assert lim.admit("b", 0).ok
    # Full: "c" takes the slot of the oldest connection of "a", which holds two more.
    assert lim.admit("c", 0) == Admitted(True, ("a", 0))
    assert lim.admit("d", 0) == Admitted(False)  # nobody holds two more than "d"
    lim.release("b", 0)
    assert lim.admit("d", 0).ok


def test_a_full_listener_takes_a_slot_from_the_heaviest_peer_never_an_association() -> None:
    lim = PeerLimiter(PeerLimits(max_connections_per_peer=6, max_connections=8,
                                 associations_per_minute_per_peer=100))
    for i in range(4):
        assert lim.admit("a", i).ok and lim.admit("b", i).ok
    lim.associated("a", 0)
    # Full.  "c" holds nothing: the heaviest peer gives up its oldest connection
    # without an association (a0 has one, so a1).
    assert lim.admit("c", 0) == Admitted(True, ("a", 1))
    assert lim.connections("a") == 3 and lim.connections() == 8
    assert lim.admit("c", 1) == Admitted(True, ("b", 0))
    # "c" now holds 2, "a" and "b" 3: no peer is heavier by two, nobody is displaced.
    assert lim.admit("c", 2) == Admitted(False)
    assert lim.admit("a", 9) == Admitted(False)
    # An evicted connection closing later releases nothing twice.
    lim.release("a", 1)
    assert lim.connections() == 8
    # Connections that carry associations are kept, whoever holds them.
    for peer, keys in (("a", (0, 2, 3)), ("b", (1, 2, 3)), ("c", (0, 1))):
        for key in keys:
            lim.associated(peer, key)
    assert lim.admit("d", 0) == Admitted(False)


def _associate_rq_ct() -> bytes:
    def item(kind: int, body: bytes) -> bytes:
        return struct.pack(">BBH", kind, 0, len(body)) + body
    pc = item(0x20, bytes([1, 0, 0, 0]) + item(0x30, b"1.2.840.10008.5.1.4.1.1.2")
              + item(0x40, ExplicitVRLittleEndian.encode()))
    body = (struct.pack(">HH", 1, 0) + AE_TITLE.ljust(16).encode() + b"MOD".ljust(16)
            + b"\0" * 32 + item(0x10, b"1.2.840.10008.3.1.1.1") + pc
            + item(0x50, item(0x51, struct.pack(">I", 16384)) + item(0x52, b"1.2.3.4")))
    return struct.pack(">BBL", 1, 0, len(body)) + body


def test_peer_vanishing_mid_instance_leaves_nothing_behind(tmp_path: Path) -> None:
    (src,) = ct_files(tmp_path / "in", 1)
    ds = pydicom.dcmread(src)
    ds.SOPInstanceUID = generate_uid()
    ds.Rows = ds.Columns = 1024  # 2 MiB of pixels: the sink opens a sealed write early
    ds.PixelData = b"\x01\x02" * (1024 * 1024)
    buf = pydicom.filebase.DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    pydicom.filewriter.write_dataset(buf, ds)
    req = C_STORE()
    req.MessageID, req.Priority = 1, 2
    req.AffectedSOPClassUID = ds.SOPClassUID
    req.AffectedSOPInstanceUID = ds.SOPInstanceUID
    req.DataSet = io.BytesIO(buf.getvalue())
    msg = C_STORE_RQ()
    msg.primitive_to_message(req)
    pdus = []
    for prim in msg.encode_msg(1, 16384):
        pdu = P_DATA_TF()
        pdu.from_primitive(prim)
        pdus.append(pdu.encode())
    assert len(pdus) > 2
    with node(tmp_path, network_timeout=5) as n:
        with socket.create_connection(("127.0.0.1", n.port)) as s:
            s.sendall(_associate_rq_ct())
            assert s.recv(1) == b"\x02"  # A-ASSOCIATE-AC
            for pdu in pdus[:-1]:  # everything but the last fragment
                s.sendall(pdu)
            wait_for(lambda: len(n.scp.counters.by_peer) == 1, 10, "association")
            wait_for(lambda: any(p.stat().st_size > (1 << 20) for p in n.inbox.slots.iterdir()),
                     20, "the partial instance to stream in")
        # Peer gone: the partial instance is dropped and its slot freed.
        wait_for(lambda: n.scp.counters.active == 0, 30, "association to end")
        assert n.stored() == 0
        wait_for(lambda: all(p.stat().st_size == 0 for p in n.inbox.slots.iterdir()), 10,
                 "slots to be emptied")
        assert n.scp.counters.instances_stored == 0


@pytest.mark.parametrize("total", [0, 1, CHUNK_BYTES - 1, CHUNK_BYTES, CHUNK_BYTES + 1,
                                   3 * CHUNK_BYTES, 3 * CHUNK_BYTES + 12345])
def test_stream_writer_round_trips_any_write_pattern(total: int) -> None:
    """The sealed stream decrypts to the input whatever the write sizes (zero-copy path)."""
    key = os.urandom(32)
    data = os.urandom(total)
    rng = random.Random(total)
    for _ in range(4):
        out = io.BytesIO()
        w = StreamWriter(key, out, b"ctx")
        i = 0
        while i < total:
            k = rng.choice([1, 100, CHUNK_BYTES // 3, CHUNK_BYTES, 2 * CHUNK_BYTES + 5])
            w.write(memoryview(data)[i:i + k] if rng.random() < 0.5 else data[i:i + k])
            i += k
        w.close()
        blob = out.getvalue()
        assert open_stream(key, io.BytesIO(blob), b"ctx") == data
        # Every chunk but the last is exactly CHUNK_BYTES of plaintext.
        assert len(blob) == 11 + max(1, -(-total // CHUNK_BYTES)) * (4 + 16) + total
        with pytest.raises(CryptoError):
            open_stream(key, io.BytesIO(blob[:-1]), b"ctx")


@pytest.mark.parametrize(("sop", "version"), [("1.2.3.4", "EDGE_AGENT_1"),
                                              ("1.2.3.45", "ODD_VERSION"),
                                              ("1.2.840.10008.5.1.4.1.1.2.1", "V")])
def test_our_file_meta_bytes_are_pydicoms(sop: str, version: str) -> None:
    """The file meta the sink writes directly is byte for byte what pydicom writes."""
    fields = MetaFields("1.2.840.10008.5.1.4.1.1.2", sop, "1.2.840.10008.1.2.4.50",
                        "1.2.826.0.1.3680043.9.3811.3.0.4", version)
    fp = DicomBytesIO()
    write_file_meta_info(fp, create_file_meta(
        sop_class_uid=UID(fields.sop_class_uid), sop_instance_uid=UID(sop),
        transfer_syntax=UID(fields.transfer_syntax),
        implementation_uid=UID(fields.implementation_uid), implementation_version=version))
    assert fields.encode() == fp.getvalue()


def test_refusal_audits_are_throttled_per_peer_and_reason() -> None:
    now = [100.0]
    t = AuditThrottle(10.0, clock=lambda: now[0], max_keys=3)
    assert t.due("10.0.0.1", "too many")
    assert not t.due("10.0.0.1", "too many")
    assert t.due("10.0.0.1", "TLS handshake failed")  # another reason
    assert t.due("10.0.0.2", "too many")  # another peer
    now[0] += 10.0
    assert t.due("10.0.0.1", "too many")
    for i in range(10):  # a scan of many addresses does not grow the map without bound
        t.due(f"10.1.0.{i}", "x")
    assert len(t._last) <= 3


def test_content_digests_are_taken_only_when_a_uid_repeats(tmp_path: Path) -> None:
    ib = make_inbox(tmp_path / "inbox")
    seen = [False]

    def put(uid: str, body: bytes, announced: bool = True) -> str:
        # announced: the SOP Instance UID is known when streaming starts (as from
        # a C-STORE request), so a re-send is hashed as it streams; otherwise
        # the file is read back at commit.
        p = ib.begin("1.2.9", sop_uid=uid if announced else None)
        assert (p.content_digest() is not None) == (announced and uid == "1.2.9.1"
                                                    and seen[0])
        seen[0] = seen[0] or uid == "1.2.9.1"
        p.write(body)
        return ib.commit(p, sop_uid=uid, sop_class="x", transfer_syntax="ts",
                         calling_ae="MOD", peer="127.0.0.1").outcome

    assert put("1.2.9.1", b"A" * 5000) == "stored"
    assert put("1.2.9.2", b"B" * 5000) == "stored"
    digests = dict(ib._db.execute(
        "SELECT instance_key, sha256 FROM instances").fetchall())
    assert set(digests.values()) == {""}  # nothing repeated: nothing hashed
    assert put("1.2.9.1", b"A" * 5000) == "duplicate"
    assert put("1.2.9.1", b"C" * 5000) == "conflict"
    assert put("1.2.9.1", b"C" * 5000, announced=False) == "duplicate"  # as the conflict
    assert put("1.2.9.1", b"A" * 5000) == "duplicate"
    assert put("1.2.9.1", b"D" * 5000, announced=False) == "conflict"
    rows = ib._db.execute("SELECT instance_key, sha256 FROM instances ORDER BY id").fetchall()
    key1 = ib.instance_key("1.2.9.1")
    assert [bool(sha) for k, sha in rows if k == key1] == [True, True, True]
    assert [sha for k, sha in rows if k != key1] == [""]
    ib.close()


def test_requestor_order_decides_the_transfer_syntax_and_roles_are_answered() -> None:
    from pynetdicom.pdu_primitives import SCP_SCU_RoleSelectionNegotiation
    from pynetdicom.presentation import PresentationContext

    from agent.dicom.negotiation import negotiate, storage_sop_classes

    ct, mr = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4"

    def proposed(cid: int, abstract: str, syntaxes: list[str]) -> PresentationContext:
        pc = PresentationContext()
        pc.context_id, pc.abstract_syntax, pc.transfer_syntax = cid, abstract, syntaxes
        return pc

    offered = storage_sop_classes()
    got = negotiate([proposed(1, ct, ["1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2"]),
                     proposed(3, mr, ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1"]),
                     proposed(5, "1.2.3.4", ["1.2.840.10008.1.2"]),
                     proposed(7, ct, ["9.9.9"])], offered)
    # The requestor's first choice wins; unknown abstract or transfer syntaxes are refused.
    assert {c: (a.transfer_syntax) for c, a in got.accepted.items()} == {
        1: "1.2.840.10008.1.2.4.50", 3: "1.2.840.10008.1.2"}
    assert {int(c.context_id): c.result for c in got.results} == {1: 0, 3: 0, 5: 3, 7: 4}
    assert got.roles == []
    # Role selection: the requestor stays SCU; proposing to be SCP only is refused.
    role_ct, role_mr = SCP_SCU_RoleSelectionNegotiation(), SCP_SCU_RoleSelectionNegotiation()
    role_ct.sop_class_uid, role_ct.scu_role, role_ct.scp_role = ct, True, True
    role_mr.sop_class_uid, role_mr.scu_role, role_mr.scp_role = mr, False, True
    got = negotiate([proposed(1, ct, ["1.2.840.10008.1.2"]),
                     proposed(3, mr, ["1.2.840.10008.1.2"])], offered, [role_ct, role_mr])
    assert {int(c.context_id): c.result for c in got.results} == {1: 0, 3: 1}
    assert [(str(r.sop_class_uid), r.scu_role, r.scp_role) for r in got.roles] == [
        (ct, True, False)]


def test_next_due_is_the_end_of_the_earliest_quiet_period(tmp_path: Path) -> None:
    ib = Inbox(tmp_path / "inbox", KeyEncryptionKey(random_key()), random_key(),
               InboxSettings(max_bytes=10**12, min_free_bytes=0),
               StudySettings(quiet_seconds=5.0, max_age_seconds=100.0))
    assert ib.next_due() is None
    for study in ("1.2.7", "1.2.8"):
        p = ib.begin(study)
        p.write(b"x" * 100)
        ib.commit(p, sop_uid=study + ".1", sop_class="x", transfer_syntax="ts",
                  calling_ae="MOD", peer="127.0.0.1")
    lasts = [r[0] for r in ib._db.execute("SELECT last_at FROM studies ORDER BY id")]
    assert ib.next_due() == pytest.approx(min(lasts) + 5.0)
    assert ib.complete_due(now=max(lasts) + 5.0) == [1, 2]
    assert ib.next_due() is None
    ib.close()
