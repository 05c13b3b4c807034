"""Peers of the delivery tests: DCMTK storescp as a PACS, scripted misbehaving peers
(pynetdicom SCPs that refuse or abort), and the config lines of a destination."""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pynetdicom import AE, AllStoragePresentationContexts, build_role, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StorageCommitmentPushModel,
    Verification,
)

from tests.helpers import Box, free_port, require_peer, set_config, wait_port


def enable_delivery(box: Box, **results: str) -> None:
    """[results] enabled with quick retries (set before any destination is appended)."""
    set_config(box, "results", "enabled", "true")
    for k, v in {"retry_min_seconds": "0.2", "retry_max_seconds": "1.0", **results}.items():
        set_config(box, "results", k, v)


def add_destination(box: Box, name: str, ae_title: str, port: int, *,
                    host: str = "127.0.0.1", **extra: str) -> None:
    """Append one [[results.destinations]] entry (values are TOML source text)."""
    lines = ["", "[[results.destinations]]", f'name = "{name}"', f'ae_title = "{ae_title}"',
             f'host = "{host}"', f"port = {port}"]
    lines += [f"{k} = {v}" for k, v in extra.items()]
    with box.config.open("a") as fh:
        fh.write("\n".join(lines) + "\n")


def dcmtk_storescp() -> str:
    exe = require_peer("storescp")
    if "/.venv/" in exe and Path("/usr/bin/storescp").exists():
        exe = "/usr/bin/storescp"  # pynetdicom's app of the same name is not DCMTK's
    return exe


class StoreSCP:
    """DCMTK storescp writing every reception to its own file (+uf)."""

    def __init__(self, root: Path, aet: str = "STORESCP", port: int | None = None,
                 tls: tuple[Path, Path, Path] | None = None) -> None:
        self.tls = tls  # (key, certificate, CA that must sign the client's certificate)
        self.root = root
        self.out = root / "received"
        self.out.mkdir(parents=True, exist_ok=True)
        self.aet = aet
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> StoreSCP:
        env = dict(os.environ, TCP_NODELAY="1")
        tls: list[str] = []
        if self.tls is not None:
            key, cert, ca = self.tls
            tls = ["+tls", str(key), str(cert), "+cf", str(ca), "-rc"]
        self.proc = subprocess.Popen(
            [dcmtk_storescp(), "-aet", self.aet, *tls, "+uf", "-od", str(self.out),
             str(self.port)],
            env=env, stdout=subprocess.DEVNULL, stderr=open(self.root / "storescp.log", "ab"))
        wait_port(self.port)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def received(self) -> list[Dataset]:
        out = []
        for f in sorted(self.out.iterdir()):
            try:
                out.append(pydicom.dcmread(f))
            except Exception:  # noqa: BLE001 - a file storescp is still writing
                continue
        return out


class ScriptedPeer:
    """A pynetdicom SCP that answers C-STORE by a script: ``answer(n)`` gives the status
    of the n-th request (0-based), or None to abort the association instead."""

    def __init__(self, aet: str, answer: Callable[[int], int | None]) -> None:
        self.aet = aet
        self.port = free_port()
        self.answer = answer
        self.requests: list[str] = []  # SOP Instance UIDs, in arrival order
        self.stored: list[str] = []  # answered with Success
        self._lock = threading.Lock()
        ae = AE(ae_title=aet)
        ae.supported_contexts = AllStoragePresentationContexts
        ae.add_supported_context(Verification)
        self._ae = ae
        self._server: Any = None

    def _store(self, event: evt.Event) -> int:
        with self._lock:
            n = len(self.requests)
            uid = str(event.request.AffectedSOPInstanceUID)
            self.requests.append(uid)
        status = self.answer(n)
        if status is None:
            event.assoc.abort()
            return 0xA700  # not seen: the association is gone
        if status == 0:
            with self._lock:
                self.stored.append(uid)
        return status

    def start(self) -> ScriptedPeer:
        self._server = self._ae.start_server(("127.0.0.1", self.port), block=False,
                                             evt_handlers=[(evt.EVT_C_STORE, self._store)])
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None


class CommittingPeer(ScriptedPeer):
    """A PACS that stores everything and answers a storage commitment request with its
    N-EVENT-REPORT on the SAME association (PS3.4 J.3.3 allows either way); objects
    whose UID is in ``refuse`` are reported in the Failed SOP Sequence once."""

    def __init__(self, aet: str, refuse: set[str] | None = None,
                 report_to: tuple[str, int] | None = None, *,
                 refuse_first: bool = False) -> None:
        """``report_to``: (AE title, port) of the box: send the report on a NEW
        association there (as Orthanc does), proposing the SCP role.  ``refuse_first``:
        the first object of the first request is reported failed (once), whichever it is."""
        super().__init__(aet, lambda n: 0)
        self._ae.add_supported_context(StorageCommitmentPushModel)
        self.refuse = set(refuse or ())
        self._refuse_first = refuse_first
        self.report_to = report_to
        self.actions: list[tuple[str, list[str]]] = []  # (transaction UID, SOP UIDs)
        self.report_status: list[int] = []

    def _action(self, event: evt.Event) -> tuple[int, None]:
        req = event.action_information
        tx = str(req.TransactionUID)
        refs = [(str(i.ReferencedSOPClassUID), str(i.ReferencedSOPInstanceUID))
                for i in req.ReferencedSOPSequence]
        if self._refuse_first and refs:
            self.refuse, self._refuse_first = {refs[0][1]}, False
        self.actions.append((tx, [u for _, u in refs]))
        assoc = event.assoc

        def report() -> None:
            ds = Dataset()
            ds.TransactionUID = tx
            ok, bad = [], []
            for cls, uid in refs:
                item = Dataset()
                item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = cls, uid
                if uid in self.refuse:
                    item.FailureReason = 0x0110
                    bad.append(item)
                    self.refuse.discard(uid)
                else:
                    ok.append(item)
            if ok:
                ds.ReferencedSOPSequence = ok
            if bad:
                ds.FailedSOPSequence = bad
            on = assoc
            if self.report_to is not None:
                ae = AE(ae_title=self.aet)
                ae.add_requested_context(StorageCommitmentPushModel)
                on = ae.associate("127.0.0.1", self.report_to[1], ae_title=self.report_to[0],
                                  ext_neg=[build_role(StorageCommitmentPushModel,
                                                      scp_role=True)])
            status, _ = on.send_n_event_report(ds, 2 if bad else 1,
                                               StorageCommitmentPushModel,
                                               "1.2.840.10008.1.20.1.1")
            self.report_status.append(int(status.Status) if status else -1)
            if on is not assoc:
                on.release()

        # After our N-ACTION response has gone out.
        threading.Timer(0.2, report).start()
        return 0x0000, None

    def start(self) -> CommittingPeer:
        self._server = self._ae.start_server(
            ("127.0.0.1", self.port), block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._store), (evt.EVT_N_ACTION, self._action)])
        return self


def assert_first_refused_then_committed(peer: CommittingPeer,
                                        audit: list[dict[str, Any]]) -> None:
    """After a three-object study to a ``refuse_first`` peer: only the failed object was
    sent again (same UID) and asked about again; both reports were answered with
    Success; the audit has the failure and then all three committed."""
    assert len(peer.actions) == 2 and len(peer.actions[0][1]) == 3
    failed_uid = peer.actions[0][1][0]
    assert peer.actions[1][1] == [failed_uid]  # only the failed one asked again
    assert peer.requests.count(failed_uid) == 2 and len(set(peer.requests)) == 3
    assert peer.report_status == [0, 0]  # the box answered both reports with Success
    committed = [e for e in audit if e["event"] == "results.committed"]
    assert sorted(e["details"]["result"] for e in committed) == \
        ["commitment-failed", "committed", "committed", "committed"]
