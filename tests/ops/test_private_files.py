"""Private files outside systemd: `edge-agent run` refuses a state or key folder open to
group/others (exit 2, the path, its mode and the chmod that fixes it), and everything the
daemon writes (sqlite stores with their -wal/-shm, quarantined instances, the inbox) is
0600 even when the shell's umask is 0022."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from agent.audit.store import connect
from agent.crypto import KeyEncryptionKey, random_key
from agent.store.quarantine import Quarantine
from agent.uplink.outbox import Outbox
from tests.helpers import Box, Broker, Daemon, Subscriber, wait_for
from tests.helpers.dicom import make_instance
from tests.helpers.ops import cli


def mode(p: Path) -> int:
    return stat.S_IMODE(p.lstat().st_mode)


@contextmanager
def umask(value: int) -> Iterator[None]:
    old = os.umask(value)
    try:
        yield
    finally:
        os.umask(old)


def run_with_umask_022(box: Box) -> tuple[int, str]:
    """`edge-agent run` from a shell with the usual 0022 umask (the child inherits it)."""
    with umask(0o022):
        p = cli("run", "--config", str(box.config), "--burst")
    return p.returncode, p.stdout + p.stderr


@pytest.mark.parametrize("folder", ["state", "keys", "pki"])
def test_run_refuses_a_state_or_key_folder_open_to_others(box: Box, folder: str) -> None:
    target = box.root / folder
    target.mkdir(exist_ok=True)
    target.chmod(0o755)
    rc, out = run_with_umask_022(box)
    assert rc == 2, out
    assert "Traceback" not in out
    assert f"{target} is open to group/others (mode 755)" in out
    assert f"fix: chmod 700 {target}" in out
    # Refused before anything was opened: no store was created in a folder others can list.
    assert not (box.state / "audit" / "audit.db").exists()


def test_doctor_reports_the_same_open_key_folder(box: Box) -> None:
    (box.root / "keys").chmod(0o750)
    p = cli("doctor", "--config", str(box.config), "--skip", "broker", "--skip", "dicom-port")
    assert p.returncode == 2
    assert f"key dir {box.root / 'keys'} is open to group/others (mode 750)" in p.stdout
    assert f"fix: chmod 700 {box.root / 'keys'}" in p.stdout


def _ct(study: str, series: str, n: int, burned_in: bool) -> pydicom.Dataset:
    ds = make_instance(study=study, series=series, InstanceNumber=n)
    if burned_in:
        ds.BurnedInAnnotation = "YES"  # goes to quarantine, sealed on disk
    return ds


def _send(box: Box) -> None:
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", box.dicom_port, ae_title=box.ae_title)
    assert assoc.is_established
    study, series = generate_uid(), generate_uid()
    try:
        for i, burned in enumerate((False, True), start=1):
            status = assoc.send_c_store(_ct(study, series, i, burned))
            assert status and int(status.Status) == 0x0000
    finally:
        assoc.release()


def _loose_files(root: Path) -> list[str]:
    return [f"{p} {mode(p):o}" for p in sorted(root.rglob("*"))
            if p.is_file() and not p.is_symlink() and mode(p) & 0o077]


def test_daemon_files_are_0600_under_a_0022_umask(box: Box, broker: Broker) -> None:
    ops = Subscriber(box).start()
    d = Daemon(box)
    try:
        with umask(0o022):  # what the daemon inherits from an interactive shell
            d.start()
        _send(box)
        wait_for(lambda: ops.on("results"), 90, "the study's result")
        state = box.state
        assert list((state / "quarantine").glob("*.enc")), "nothing was quarantined"
        stores = [state / "inbox" / "index.db", state / "outbox" / "outbox.db",
                  state / "audit" / "audit.db", state / "quarantine" / "index.db"]
        for db in stores:
            assert db.exists(), db
            assert (db.parent / (db.name + "-wal")).exists(), f"{db} not in WAL mode"
        assert _loose_files(state) == []  # while running: -wal and -shm included
        assert d.stop() == 0
        assert _loose_files(state) == []
    finally:
        if d.proc is not None:
            d.stop()
        ops.stop()


def test_stores_are_created_0600_whatever_the_umask(tmp_path: Path) -> None:
    """The same guarantee for code that opens the stores in-process (no CLI umask)."""
    kek = KeyEncryptionKey(random_key())
    with umask(0o022):
        out = Outbox(tmp_path / "outbox" / "outbox.db", kek, 2**20)
        q = Quarantine(tmp_path / "quarantine", kek)
        q.put("s" * 32, "i" * 32, b"sealed bytes", "test")
        audit = connect(tmp_path / "audit" / "audit.db")
        try:
            made = {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()}
            assert made >= {f"{d}/{f}{side}" for d, f in (("outbox", "outbox.db"),
                                                          ("quarantine", "index.db"),
                                                          ("audit", "audit.db"))
                            for side in ("", "-wal", "-shm")}
            assert len(list((tmp_path / "quarantine").glob("*.enc"))) == 1
            assert _loose_files(tmp_path) == []
        finally:
            audit.close()
            q.close()
            out.close()


def test_a_store_left_0644_by_an_older_version_is_tightened(tmp_path: Path) -> None:
    kek = KeyEncryptionKey(random_key())
    db = tmp_path / "outbox" / "outbox.db"
    with umask(0o022):
        Outbox(db, kek, 2**20).close()
        for p in db.parent.iterdir():
            p.chmod(0o644)
        Outbox(db, kek, 2**20).close()
    assert _loose_files(tmp_path) == []
