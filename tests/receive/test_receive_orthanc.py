"""Orthanc (a PACS) forwards a study to the box as it would to any Storage SCP."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers.orthanc import Orthanc
from tests.helpers.receive import AE_TITLE, ct_files, node


@pytest.mark.peer("Orthanc")
def test_orthanc_forwards_a_study(tmp_path: Path) -> None:
    files = ct_files(tmp_path / "in", 4)
    with node(tmp_path) as n:
        o = Orthanc(tmp_path / "orthanc", modalities={"EDGE": (AE_TITLE, "127.0.0.1", n.port)})
        o.start()
        try:
            ids = [o.upload(f) for f in files]
            study = o.get(f"/instances/{ids[0]}/study")["ID"]
            # C-ECHO, then C-STORE of the whole study, both initiated by Orthanc.
            assert o.post("/modalities/EDGE/echo", b"{}") == {}
            job = o.post("/modalities/EDGE/store", json.dumps({"Resources": [study]}).encode())
            assert job["FailedInstancesCount"] == 0 and job["InstancesCount"] == 4
        finally:
            o.stop()
        assert n.stored() == 4
        assert len(n.studies()) == 1
