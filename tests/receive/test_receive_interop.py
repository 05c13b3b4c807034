"""The DICOM node against real peers: DCMTK, pynetdicom, compressed inputs, deflate,
negotiation and allowlist rejections, duplicates and conflicts."""

from __future__ import annotations

import copy
import io
import zlib
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, build_context
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from agent.config import PeerRule
from agent.dicom.status import STATUS_OUT_OF_RESOURCES
from agent.errors import StorageError
from tests.helpers.receive import AE_TITLE, LOOPBACK, ct_files, dcmtk, node, rejected, wait_for

needs_dcmtk = pytest.mark.peer("storescu", "echoscu")


def stored_bytes(n) -> list[bytes]:  # type: ignore[no-untyped-def]
    out = []
    for sid in [s.id for s in n.studies()]:
        study = n.inbox.study(sid)
        out += [n.inbox.read(study, i) for i in study.instances]
    return out


def dataset_bytes(part10: bytes) -> bytes:
    """The data set after the file meta (what travels on the wire)."""
    fp = io.BytesIO(part10)
    pydicom.filereader.read_preamble(fp, False)
    pydicom.filereader._read_file_meta_info(fp)
    return fp.read()


@needs_dcmtk
def test_storescu_and_echoscu_round_trip_bytes(tmp_path: Path) -> None:
    files = ct_files(tmp_path / "in", 3)
    with node(tmp_path) as n:
        echo = dcmtk("echoscu", "-aet", "MOD", "-aec", AE_TITLE, "127.0.0.1", str(n.port))
        assert echo.returncode == 0, echo.stderr
        r = dcmtk("storescu", "-aet", "MOD", "-aec", AE_TITLE, "127.0.0.1", str(n.port),
                  *map(str, files))
        assert r.returncode == 0, r.stderr
        got = sorted(dataset_bytes(b) for b in stored_bytes(n))
    want = sorted(dataset_bytes(p.read_bytes()) for p in files)
    assert got == want  # byte-exact, decrypted from the sealed inbox


@needs_dcmtk
@pytest.mark.parametrize(("tool", "args", "propose", "ts"), [
    ("dcmcjpeg", ("+eb",), "-xy", "1.2.840.10008.1.2.4.50"),
    ("dcmcjpeg", ("+ee",), "-xx", "1.2.840.10008.1.2.4.51"),
    ("dcmcjpeg", ("+el",), "", "1.2.840.10008.1.2.4.57"),
    ("dcmcjpeg", ("+e1",), "-xs", "1.2.840.10008.1.2.4.70"),
    ("dcmcjpls", ("+el",), "-xt", "1.2.840.10008.1.2.4.80"),
    ("dcmcrle", (), "-xr", "1.2.840.10008.1.2.5"),
])
def test_compressed_inputs_are_stored_in_their_syntax(
        tmp_path: Path, tool: str, args: tuple[str, ...], propose: str, ts: str) -> None:
    """DCMTK compresses; DCMTK storescu sends (pynetdicom where storescu has no
    proposal flag for the syntax); the node keeps the syntax as sent."""
    src = ct_files(tmp_path / "in", 1)[0]
    dst = tmp_path / "c.dcm"
    conv = dcmtk(tool, *args, str(src), str(dst))
    assert conv.returncode == 0, conv.stderr
    with node(tmp_path) as n:
        if propose:
            r = dcmtk("storescu", propose, "-aet", "MOD", "-aec", AE_TITLE, "127.0.0.1",
                      str(n.port), str(dst))
            assert r.returncode == 0, r.stderr
        else:
            _, assoc = _scu(n.port, ts)
            assert assoc.send_c_store(dst).Status == 0  # type: ignore[attr-defined]
            assoc.release()  # type: ignore[attr-defined]
        (blob,) = stored_bytes(n)
        study = n.inbox.study(n.studies()[0].id)
    assert study.instances[0].transfer_syntax == ts
    ds = pydicom.dcmread(io.BytesIO(blob))
    assert ds.file_meta.TransferSyntaxUID == ts
    assert dataset_bytes(blob) == dataset_bytes(dst.read_bytes())


def _scu(port: int, ts: str = ExplicitVRLittleEndian, *, aet: str = "MOD",
         aec: str = AE_TITLE) -> tuple[AE, object]:
    ae = AE(ae_title=aet)
    ae.requested_contexts = [build_context(CTImageStorage, [ts]), build_context(Verification)]
    assoc = ae.associate("127.0.0.1", port, ae_title=aec)
    return ae, assoc


def test_pynetdicom_deflate_is_stored_and_deflate_bomb_refused(tmp_path: Path) -> None:
    (src,) = ct_files(tmp_path / "in", 1)
    ds = pydicom.dcmread(src)
    with node(tmp_path, max_instance_bytes=2 * 1024**2) as n:
        _, assoc = _scu(n.port, DeflatedExplicitVRLittleEndian)
        assert assoc.is_established  # type: ignore[attr-defined]
        st = assoc.send_c_store(ds)  # type: ignore[attr-defined]
        assert st.Status == 0x0000
        # 64 MiB of zeros deflate to ~64 KiB: the wire size is small, the
        # inflated size is over the 2 MiB bound and must be refused.
        bomb = copy.deepcopy(ds)
        bomb.SOPInstanceUID = generate_uid()
        bomb.add_new(0x00091010, "OB", b"\0" * (64 * 1024**2))
        bomb.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
        st2 = assoc.send_c_store(bomb)  # type: ignore[attr-defined]
        assert st2.Status == STATUS_OUT_OF_RESOURCES
        assoc.release()  # type: ignore[attr-defined]
        assert n.stored() == 1
        (blob,) = stored_bytes(n)
    stored = pydicom.dcmread(io.BytesIO(blob))
    assert stored.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
    assert stored.SOPInstanceUID == ds.SOPInstanceUID
    assert zlib  # deflate really travelled: the stored stream is smaller than inflated
    assert len(blob) < len(src.read_bytes())


def test_declared_pixel_geometry_bomb_is_refused(tmp_path: Path) -> None:
    (src,) = ct_files(tmp_path / "in", 1)
    ds = pydicom.dcmread(src)
    ds.NumberOfFrames = 100000  # 100k frames of 128x128x16 bit: 3.2 GB once decoded
    with node(tmp_path, max_instance_bytes=1024**3) as n:
        _, assoc = _scu(n.port)
        st = assoc.send_c_store(ds)  # type: ignore[attr-defined]
        assoc.release()  # type: ignore[attr-defined]
        assert st.Status == STATUS_OUT_OF_RESOURCES
        assert n.stored() == 0


def test_malformed_and_mismatched_data_sets_get_failure_statuses(tmp_path: Path) -> None:
    (src,) = ct_files(tmp_path / "in", 1)
    ds = pydicom.dcmread(src)
    with node(tmp_path) as n:
        _, assoc = _scu(n.port)
        no_study = copy.deepcopy(ds)
        del no_study.StudyInstanceUID
        no_study.SOPInstanceUID = generate_uid()
        assert assoc.send_c_store(no_study).Status == 0xC210  # type: ignore[attr-defined]
        wrong_class = copy.deepcopy(ds)
        wrong_class.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"  # MR in a CT context
        wrong_class.SOPInstanceUID = generate_uid()
        # pynetdicom's SCU refuses to send a mismatching SOP class itself, so
        # put the data set on the CT context by hand.
        from pynetdicom.dimse_primitives import C_STORE
        req = C_STORE()
        req.MessageID = 7
        req.AffectedSOPClassUID = CTImageStorage
        req.AffectedSOPInstanceUID = wrong_class.SOPInstanceUID
        req.Priority = 2
        buf = pydicom.filebase.DicomBytesIO()
        buf.is_little_endian, buf.is_implicit_VR = True, False
        pydicom.filewriter.write_dataset(buf, wrong_class)
        req.DataSet = io.BytesIO(buf.getvalue())
        cx = assoc.accepted_contexts[0]  # type: ignore[attr-defined]
        assoc.dimse.send_msg(req, cx.context_id)  # type: ignore[attr-defined]
        # pynetdicom's own reactor consumes the unsolicited response, so read
        # the status the node answered from its audit trail.
        wait_for(lambda: len(n.audited("instance.received")) == 2, 30, "two C-STORE answers")
        assoc.release()  # type: ignore[attr-defined]
        assert n.stored() == 0
        statuses = [e["details"]["status"] for e in n.audited("instance.received")]
    assert statuses == ["0xC210", "0xA900"]


def test_unknown_sop_class_rejected_at_negotiation(tmp_path: Path) -> None:
    with node(tmp_path) as n:
        ae = AE(ae_title="MOD")
        ae.add_requested_context("1.2.826.0.1.3680043.9.9999.1")  # private SOP class
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", n.port, ae_title=AE_TITLE)
        assert assoc.is_established
        accepted = {str(c.abstract_syntax) for c in assoc.accepted_contexts}
        assoc.release()
    assert accepted == {Verification}


def test_allowlist_and_called_ae_rejections_are_permanent_and_audited(tmp_path: Path) -> None:
    with node(tmp_path, peers=(PeerRule("CT1", LOOPBACK),)) as n:
        _, bad_calling = _scu(n.port, aet="INTRUDER")
        assert rejected(bad_calling)
        _, bad_called = _scu(n.port, aet="CT1", aec="SOMEONE_ELSE")
        assert rejected(bad_called)
        _, ok = _scu(n.port, aet="CT1")
        assert ok.is_established  # type: ignore[attr-defined]
        ok.release()  # type: ignore[attr-defined]
        audited = n.audited("association.rejected")
    assert [(r["details"]["result"], r["details"]["diagnostic"]) for r in audited] == [
        (1, 3), (1, 7)]
    assert all(r["outcome"] == "minor_failure" for r in audited)


def test_resend_is_idempotent_and_changed_content_is_flagged(tmp_path: Path) -> None:
    (src,) = ct_files(tmp_path / "in", 1)
    ds = pydicom.dcmread(src)
    with node(tmp_path) as n:
        _, assoc = _scu(n.port)
        assert assoc.send_c_store(ds).Status == 0  # type: ignore[attr-defined]
        assert assoc.send_c_store(ds).Status == 0  # type: ignore[attr-defined]
        changed = copy.deepcopy(ds)
        changed.SeriesDescription = "edited"
        assert assoc.send_c_store(changed).Status == 0  # type: ignore[attr-defined]
        assoc.release()  # type: ignore[attr-defined]
        flags = n.inbox._db.execute("SELECT flag FROM instances ORDER BY id").fetchall()
        names = [e for e, _ in n.events if e.startswith("instance.")]
    assert [f[0] for f in flags] == [None, "conflict"]
    assert names == ["instance.received", "instance.duplicate", "instance.conflict"]
    assert n.scp.counters.instances_duplicate == 1


def test_inbox_streams_back_what_it_stored(tmp_path: Path) -> None:
    files = ct_files(tmp_path / "in", 2)
    with node(tmp_path) as n:
        _, assoc = _scu(n.port)
        for f in files:
            assert assoc.send_c_store(pydicom.dcmread(f)).Status == 0  # type: ignore[attr-defined]
        assoc.release()  # type: ignore[attr-defined]
        study = n.inbox.study(n.studies()[0].id)
        for inst in study.instances:
            assert b"".join(n.inbox.iter_read(study, inst)) == n.inbox.read(study, inst)
        # Tampering with a sealed file is detected, never returned as data.
        victim = study.instances[0].path
        raw = bytearray(victim.read_bytes())
        raw[len(raw) // 2] ^= 1
        victim.write_bytes(bytes(raw))
        with pytest.raises(StorageError):
            n.inbox.read(study, study.instances[0])


@pytest.mark.parametrize("proposed", [
    ["1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2"],
    ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2.4.50"],
    ["1.2.840.10008.1.2", "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.1"],
])
def test_the_requestors_transfer_syntax_order_wins(tmp_path: Path, proposed: list[str]) -> None:
    with node(tmp_path) as n:
        ae = AE(ae_title="MOD")
        ae.add_requested_context(CTImageStorage, proposed)
        assoc = ae.associate("127.0.0.1", n.port, ae_title=AE_TITLE)
        assert assoc.is_established
        (cx,) = assoc.accepted_contexts
        assoc.release()
    assert cx.transfer_syntax[0] == proposed[0]
