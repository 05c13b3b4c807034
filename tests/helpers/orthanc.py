"""A throwaway Orthanc (Debian package) on free ports, for interop tests and the bench."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Orthanc:
    def __init__(self, root: Path, *, aet: str = "ORTHANC",
                 modalities: dict[str, tuple[str, str, int]] | None = None) -> None:
        self.root = root
        self.http = free_port()
        self.dicom = free_port()
        self.aet = aet
        root.mkdir(parents=True, exist_ok=True)
        self.config = root / "orthanc.json"
        self.config.write_text(json.dumps({
            "Name": "edge-agent-test", "StorageDirectory": str(root / "db"),
            "IndexDirectory": str(root / "db"), "HttpPort": self.http, "DicomPort": self.dicom,
            "DicomAet": aet, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False, "DicomAlwaysAllowStore": True,
            "DicomModalities": {k: list(v) for k, v in (modalities or {}).items()},
            "DicomScpTimeout": 30, "Plugins": [], "StableAge": 3600,
            "DicomAssociationCloseDelay": 0,
        }))
        self.proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def available() -> bool:
        return Path(ORTHANC).exists()

    def start(self) -> Orthanc:
        env = dict(os.environ, TCP_NODELAY="1")
        self.proc = subprocess.Popen([ORTHANC, str(self.config)], env=env,
                                     stdout=subprocess.DEVNULL,
                                     stderr=open(self.root / "orthanc.log", "ab"))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                self.get("/system")
                return self
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("Orthanc did not start: " + (self.root / "orthanc.log").read_text()[-2000:])

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def _req(self, method: str, path: str, body: bytes | None = None) -> Any:
        req = urllib.request.Request(f"http://127.0.0.1:{self.http}{path}", data=body,
                                     method=method)
        with urllib.request.urlopen(req, timeout=600) as r:
            data = r.read()
        return json.loads(data) if data else None

    def get(self, path: str) -> Any:
        return self._req("GET", path)

    def post(self, path: str, body: bytes) -> Any:
        return self._req("POST", path, body)

    def upload(self, f: Path) -> str:
        return str(self.post("/instances", f.read_bytes())["ID"])
