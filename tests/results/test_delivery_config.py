"""[[results.destinations]]: every mistake reported at once, with the fix, through the
daemon's own start; a valid entry is what the egress policy names as a PHI
destination, and nothing else is."""

from __future__ import annotations

import os
import subprocess
import tomllib
from pathlib import Path

from agent import config
from agent.uplink import egresspolicy
from tests.helpers import EDGE_AGENT, REPO, Box, set_config
from tests.helpers.delivery import add_destination, enable_delivery


def _load(box: Box) -> config.Config:
    return config.parse(tomllib.loads(box.config.read_text()), box.config)


def test_every_destination_mistake_is_reported_at_once(tmp_path: Path, box: Box) -> None:
    key = tmp_path / "client.key"
    key.write_text("not really a key")
    os.chmod(key, 0o644)
    enable_delivery(box)
    add_destination(box, "pacs", "ORTHANC", 104, kinds='["sr", "pdf"]',
                    release_after='"commitment"')
    add_destination(box, "pacs", "A\\\\B", 70000)
    add_destination(box, "tls-pacs", "SECURE", 2762, **{
        "tls.enabled": "true", "tls.ca": f'"{tmp_path / "missing-ca.pem"}"',
        "tls.cert": f'"{tmp_path / "missing.pem"}"', "tls.key": f'"{key}"', "colour": '"red"'})
    proc = subprocess.run([*EDGE_AGENT, "run", "--config", str(box.config)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    err = proc.stderr
    for expected in (
        "[results.destinations[0].kinds] = ['sr', 'pdf']: must list some of sr, gsps, "
        "keyimage, seg",
        "[results.destinations[0].release_after] = 'commitment' needs storage_commitment = true",
        "[results.destinations[1].ae_title]",
        "[results.destinations[1].port] = 70000: must be a TCP port",
        "[results.destinations[1].name] = 'pacs' is used by two destinations",
        "[results.destinations[2].tls.ca]",
        "missing-ca.pem",
        "[results.destinations[2].tls.key]",
        f"chmod 600 {key}",
        "unknown key(s) ['colour']",
    ):
        assert expected in err, f"{expected!r} not in:\n{err}"


def test_destinations_need_results_enabled(box: Box) -> None:
    add_destination(box, "pacs", "ORTHANC", 104)
    try:
        _load(box)
    except config.ConfigError as exc:
        assert "set [results] enabled = true" in str(exc)
    else:
        raise AssertionError("destinations without [results] enabled were accepted")


def test_a_valid_destination_is_the_only_dicom_phi_destination(box: Box) -> None:
    enable_delivery(box, dead_letter_hours="12")
    add_destination(box, "pacs", "ORTHANC", 104, kinds='["sr", "keyimage"]',
                    storage_commitment="true")
    cfg = _load(box)
    (d,) = cfg.results.destinations
    assert d.kinds == frozenset({"sr", "sc"}) and d.release_after == "commitment"
    assert cfg.results.dead_letter_hours == 12.0
    (p,) = [x for x in egresspolicy.phi_destinations(cfg) if x.kind == "dicom"]
    assert (p.name, p.ae_title, p.host, p.port, p.tls) == ("pacs", "ORTHANC", "127.0.0.1",
                                                           104, False)
    assert egresspolicy.may_send_phi(cfg, "dicom", "127.0.0.1", 104, ae_title="ORTHANC")
    assert not egresspolicy.may_send_phi(cfg, "dicom", "127.0.0.1", 104, ae_title="OTHER")
    assert not egresspolicy.may_send_phi(cfg, "dicom", "10.0.0.9", 104)
    # Results off: no DICOM destination may receive PHI, whatever is listed.
    set_config(box, "results", "enabled", "false")
    text = box.config.read_text().split("[[results.destinations]]")[0]
    box.config.write_text(text)
    assert not [x for x in egresspolicy.phi_destinations(_load(box)) if x.kind == "dicom"]
