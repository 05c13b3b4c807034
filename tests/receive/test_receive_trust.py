"""The DICOM node of the real daemon against a peer that tries to confuse it (issue 14,
"Trust defects"): C-STOREs on contexts that were never proposed or accepted for
another SOP class, decompression bombs, control characters in what it logs, refused
instances that leave study rows behind, and a pynetdicom whose patches would not take."""

from __future__ import annotations

import ast
import sqlite3
import struct
import tomllib
import zlib

import psutil
import pydicom
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

import tests.helpers.rx_peer as rx_peer
from tests.helpers import EDGE_AGENT, REPO, Box, Broker, Daemon, set_config, wait_for
from tests.helpers.rx_peer import CT, DEFLATED, EXPLICIT_LE, MR, RLE, VERIFICATION

MiB = 1024**2


def index_rows(box: Box) -> list[tuple[str, int]]:
    """(state, instances) of every study version in the daemon's inbox index."""
    with sqlite3.connect(box.state / "inbox" / "index.db") as db:
        return [(str(r[0]), int(r[1])) for r in
                db.execute("SELECT state, n_instances FROM studies ORDER BY id")]


def ct_dataset(sop_class: str = CT) -> tuple[str, bytes]:
    """(SOP Instance UID, Explicit VR Little Endian data set) of a small CT instance."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    return str(ds.SOPInstanceUID), rx_peer.dataset_bytes(ds)


def start(box: Box, **dicom: str) -> Daemon:
    # Processing is not what these tests look at (and must not start on a bomb
    # the unfixed node would have acknowledged).
    set_config(box, "study", "quiet_seconds", "3600")
    for key, value in dicom.items():
        set_config(box, "dicom", key, value)
    d = Daemon(box)
    d.start()
    return d


def test_store_on_a_context_never_proposed_is_aborted_and_frees_the_slot(
        box: Box, broker: Broker) -> None:
    # One process receives: pynetdicom's association count is the one that leaked.
    d = start(box, workers="1")
    try:
        uid, data = ct_dataset()
        # More than max_associations_per_peer (4) of them from one address.
        for _ in range(6):
            s = rx_peer.associate(box.dicom_port, box.ae_title)
            kind, status = rx_peer.store(s, 5, CT, uid, data)  # context 5 was never proposed
            assert (kind, status) in ((0x07, -1), (-1, -1), (-2, -1))  # A-ABORT, then closed
            s.settimeout(30)
            assert rx_peer.closed_by_peer(s)
            s.close()
        # The address is not locked out: its next association stores normally.
        s = rx_peer.associate(box.dicom_port, box.ae_title)
        assert rx_peer.store(s, 1, CT, uid, data) == (0x04, 0x0000)
        assert rx_peer.release(s) == 0x06
        s.close()
    finally:
        assert d.stop() == 0
    log = d.log_text()
    assert "Traceback" not in log and "Exception in thread" not in log
    assert log.count("P-DATA-TF on presentation context 5, which was not accepted") == 6


def test_a_sop_class_on_another_class_context_is_refused_0122_and_nothing_is_kept(
        box: Box, broker: Broker) -> None:
    d = start(box)
    try:
        s = rx_peer.associate(box.dicom_port, box.ae_title, contexts=(
            (1, CT, (EXPLICIT_LE,)), (3, VERIFICATION, (EXPLICIT_LE,))))
        mr_uid, mr = ct_dataset(MR)
        assert rx_peer.store(s, 1, MR, mr_uid, mr) == (0x04, 0x0122)  # MR on the CT context
        ct_uid, ct = ct_dataset()
        assert rx_peer.store(s, 3, CT, ct_uid, ct, message_id=2) == (0x04, 0x0122)
        # A data set whose own SOP class differs from the request's: 0xA900.
        odd_uid, odd = ct_dataset(MR)
        assert rx_peer.store(s, 1, CT, odd_uid, odd, message_id=3) == (0x04, 0xA900)
        good_uid, good = ct_dataset()
        assert rx_peer.store(s, 1, CT, good_uid, good, message_id=4) == (0x04, 0x0000)
        assert rx_peer.release(s) == 0x06
        s.close()
    finally:
        assert d.stop() == 0
    # Only the accepted instance's study is in the index: the refused ones left
    # no open study version behind.
    assert index_rows(box) == [("open", 1)]


# -- decompression bombs ----------------------------------------------------------------


def _element(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
    if vr in (b"OB", b"OW", b"UN"):
        return struct.pack("<HH2sHI", group, elem, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", group, elem, vr, len(value)) + value


def deflate_bomb(inflated: int) -> tuple[str, bytes]:
    """A CT data set of about 1 MB whose deflated stream inflates to ``inflated`` bytes
    (a private OB element of zeros after the header elements)."""
    ds = Dataset()
    ds.SOPClassUID = CT
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "CT"
    ds.add_new(0x00290010, "LO", "BOMB")
    head = rx_peer.dataset_bytes(ds) + struct.pack("<HH2sHI", 0x0029, 0x1010, b"OB", 0, inflated)
    # Blocks compressed after a full flush are independent: one block of zeros,
    # repeated, is a valid stream (and takes milliseconds, not seconds, to build).
    c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    start = c.compress(head) + c.flush(zlib.Z_FULL_FLUSH)
    block = c.compress(bytes(MiB)) + c.flush(zlib.Z_FULL_FLUSH)
    data = start + block * (inflated // MiB) + c.flush()
    return str(ds.SOPInstanceUID), data


def rle_bomb(declared_frames: int = 4) -> tuple[str, bytes]:
    """An RLE Lossless CT data set whose 200-byte fragment declares 16384 x 16384 x 8 bit
    per frame (1 GiB for four frames)."""
    ds = Dataset()
    ds.SOPClassUID = CT
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "CT"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.NumberOfFrames = declared_frames
    ds.Rows = ds.Columns = 16384
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    # RLE header: one segment at offset 64; then replicate runs (0x81 = 128 bytes of 0).
    fragment = struct.pack("<16I", 1, 64, *([0] * 14)) + b"\x81\x00" * 68
    item = struct.pack("<HHI", 0xFFFE, 0xE000, len(fragment)) + fragment
    pixels = (struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, 0xFFFFFFFF)
              + struct.pack("<HHI", 0xFFFE, 0xE000, 0) + item
              + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0))
    return str(ds.SOPInstanceUID), rx_peer.dataset_bytes(ds) + pixels


def test_decompression_bombs_are_refused_before_they_are_acknowledged(
        box: Box, broker: Broker) -> None:
    uid, deflated = deflate_bomb(1024 * MiB)
    assert len(deflated) < 2 * MiB
    assert len(zlib.decompressobj(-zlib.MAX_WBITS).decompress(deflated, 4 * MiB)) == 4 * MiB
    rle_uid, rle = rle_bomb()
    assert len(rle) < 2000
    d = start(box)
    try:
        s = rx_peer.associate(box.dicom_port, box.ae_title, contexts=(
            (1, CT, (DEFLATED,)), (3, CT, (RLE,)), (5, CT, (EXPLICIT_LE,))))
        # 1 MB inflating to 1 GiB: processing would hold ~3 copies of it, over
        # [study] max_process_instance_bytes (2 GiB): out of resources, at receive.
        assert rx_peer.store(s, 1, CT, uid, deflated, fragment=60000) == (0x04, 0xA700)
        # 200 bytes of RLE declaring 1 GiB: RLE cannot expand more than 64-fold.
        assert rx_peer.store(s, 3, CT, rle_uid, rle, message_id=2) == (0x04, 0xC210)
        # A geometry beyond the processing bound, whatever its encoding.
        huge = rle_bomb(declared_frames=12)[1]  # 3 GiB declared
        assert rx_peer.store(s, 3, CT, generate_uid(), huge, message_id=3) == (0x04, 0xA700)
        ok_uid, ok = ct_dataset()
        assert rx_peer.store(s, 5, CT, ok_uid, ok, message_id=4) == (0x04, 0x0000)
        assert rx_peer.release(s) == 0x06
        s.close()
        # Nothing was inflated into memory (the daemon and its receive workers).
        assert d.proc is not None
        daemon = psutil.Process(d.proc.pid)
        procs = [daemon, *daemon.children(recursive=True)]
        assert sum(p.memory_info().rss for p in procs) < 1024 * MiB
    finally:
        assert d.stop() == 0
    assert index_rows(box) == [("open", 1)]
    log = d.log_text()
    assert "inflates beyond" in log and "cannot decode to the" in log


# -- log lines ------------------------------------------------------------------------------


def test_control_characters_from_a_peer_cannot_forge_log_lines(box: Box, broker: Broker) -> None:
    d = start(box)
    try:
        # An AE title and a UID with a newline and a forged record after it.
        s = rx_peer.connect(box.dicom_port)
        s.sendall(rx_peer.associate_rq(box.ae_title, b"X\nCRITICAL fake"))
        s.settimeout(30)
        assert rx_peer.closed_by_peer(s)
        s.close()
        s = rx_peer.connect(box.dicom_port)
        s.sendall(rx_peer.associate_rq(box.ae_title, "PYNETDICOM", contexts=(
            (1, "1.2.3\nCRITICAL uid\r\x1b[2J", (EXPLICIT_LE,)),)))
        assert rx_peer.read_pdu(s)[0] in (0x02, 0x03)
        s.close()
        wait_for(lambda: "CRITICAL uid" in d.log_text(), 30, "the UID to be logged")
    finally:
        assert d.stop() == 0
    lines = d.log_text().splitlines()
    # Every line is a record of the daemon (timestamp first); the peer's text is
    # there, escaped, inside a record, never as a line of its own.
    assert not [line for line in lines if line.startswith("CRITICAL")]
    assert all(line[:4].isdigit() for line in lines), [x for x in lines if not x[:4].isdigit()]
    assert any("X\\nCRITICAL fake" in line for line in lines)
    assert any("1.2.3\\nCRITICAL uid\\r\\x1b[2J" in line for line in lines)
    assert "\x1b" not in d.log_text() and "\r" not in d.log_text()


# -- pynetdicom as a library -------------------------------------------------------------


DEPENDENCIES = ("pynetdicom", "pydicom", "paho")


def _dependency_names(tree: ast.AST) -> set[str]:
    """Names a module binds to a dependency's modules, classes or functions."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names
                      if a.name.startswith(DEPENDENCIES)}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(DEPENDENCIES):
            names |= {a.asname or a.name for a in node.names}
    return names


def _root(node: ast.expr) -> str | None:
    while isinstance(node, ast.Attribute | ast.Call | ast.Subscript):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node.id if isinstance(node, ast.Name) else None


def test_the_node_uses_only_public_pynetdicom_and_pydicom_names() -> None:
    """No module under agent/ patches a dependency (setattr or assignment to one of
    its modules or classes), and the DICOM node neither imports a dependency's
    private names nor reads a private attribute of anything but itself: what broke silently on a
    pynetdicom release.  pynetdicom is a version range, not an exact pin."""
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pin = next(d for d in deps if d.startswith("pynetdicom"))
    assert "==" not in pin and ">=" in pin and "<" in pin, pin
    problems = []
    for path in sorted((REPO / "agent").rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        ours = _dependency_names(tree)
        where = f"{path.relative_to(REPO)}"
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setattr"
                    and node.args and _root(node.args[0]) in ours):
                problems.append(f"{where}:{node.lineno}: setattr on a dependency")
            if isinstance(node, ast.Assign | ast.AugAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for t in targets:
                    # (pydicom's documented ``config.settings`` object is meant to be set)
                    if (isinstance(t, ast.Attribute) and _root(t) in ours
                            and ".settings." not in ast.unparse(t)):
                        problems.append(f"{where}:{node.lineno}: assignment into a dependency")
            if (isinstance(node, ast.ImportFrom) and "dicom" in path.parts
                    and (node.module or "").startswith(DEPENDENCIES)):
                if "._" in f".{node.module}" or any(a.name.startswith("_") for a in node.names):
                    problems.append(f"{where}:{node.lineno}: private import")
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_")
                    and not node.attr.startswith("__") and "dicom" in path.parts
                    and _root(node) not in ("self", "cls", "os", "sys")):
                problems.append(f"{where}:{node.lineno}: private attribute .{node.attr}")
    assert problems == []
    assert EDGE_AGENT  # the daemon runs from this checkout
