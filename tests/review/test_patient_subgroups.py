"""Age band and sex as subgroups: captured before de-identification, coarse, box-local.

The running daemon, the real broker, real studies over DICOM.  The demo model's
manifest names PatientAge and PatientSex as subgroups; de-identification removes
both before the model runs, so the pipeline captures them from the original,
coarse (age band 0-17/18-39/40-64/65+ from Patient's Age or from the birth date
against the study date; sex M/F/O).  Five studies (two F aged 47 and 52, two M
born 1938 and 1939 with no Patient's Age, one O aged 9) get verdicts from the
reviewer certificate; with k = 2 ``edge-agent models performance`` shows
per-sex and per-age-band rows, the singletons suppressed; the published
``performance`` telemetry carries them only as those aggregates; no MQTT message,
no log line and no byte of the review store holds an individual's age, birth date
or sex.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

from tests.helpers import REPO, Box, Daemon, Subscriber, set_config, wait_for
from tests.helpers.review import (
    ReviewerClient,
    ack_of,
    cli,
    flagging_model,
    send_studies,
    verdict,
)

K = 2
STUDIES = [  # (patient name, attributes set on the original, expected band and sex)
    ("Bandcanary^Fay", {"PatientSex": "F", "PatientAge": "047Y"}, ("40-64", "F")),
    ("Bandcanary^Flo", {"PatientSex": "F", "PatientAge": "052Y"}, ("40-64", "F")),
    ("Bandcanary^Max", {"PatientSex": "M", "PatientAge": "", "PatientBirthDate": "19380611",
                        "StudyDate": "20200101"}, ("65+", "M")),
    ("Bandcanary^Mo", {"PatientSex": "M", "PatientAge": "", "PatientBirthDate": "19391122",
                       "StudyDate": "20200101"}, ("65+", "M")),
    ("Bandcanary^Oz", {"PatientSex": "O", "PatientAge": "009Y"}, ("0-17", "O")),
]
# An individual's exact age or birth date, as the originals carry them.
CANARIES = ["047Y", "052Y", "009Y", "19380611", "19391122", "Bandcanary"]
PATIENT = ("PatientAge", "PatientSex")


def _cells(perf: dict[str, Any]) -> dict[str, int]:
    [model] = [m for m in perf["models"] if not m.get("suppressed")]
    return {f"{s['attribute']}={s['value']}": s["verdicts"] for s in model["subgroups"]}


def test_age_band_and_sex_are_k_suppressed_subgroups_and_never_leave_as_values(
        tmp_path: Path, box: Box, ops: Subscriber) -> None:
    shipped = tomllib.loads((REPO / "models" / "lesion-demo" / "1.1.0" / "manifest.toml")
                            .read_text())
    assert set(PATIENT) <= set(shipped["drift"]["subgroup_attributes"])
    assert not set(PATIENT) & set(shipped["inputs"]["attributes"])  # the model never sees them
    flagging_model(box, tmp_path)
    set_config(box, "study", "quiet_seconds", "1")
    set_config(box, "telemetry", "interval_seconds", "1")
    set_config(box, "review", "min_verdicts", str(K))
    set_config(box, "review", "windows_days", "[30]")
    daemon = Daemon(box)
    daemon.start()
    reviewer = ReviewerClient(box)
    try:
        send_studies(box.dicom_port, [n for n, _a, _e in STUDIES], [a for _n, a, _e in STUDIES])
        results = [m.json() for m in ops.wait("results", len(STUDIES), timeout=180)]
        sent = [verdict(r["id"], "agreed") for r in results]
        for ev in sent:
            assert reviewer.send(ev) == 0
        for ev in sent:
            assert ack_of(ops, ev["id"])["outcome"] == "accepted"
        # The local record: the coarse values, nothing finer.
        kept = sorted((m["subgroup"]["PatientAge"], m["subgroup"]["PatientSex"])
                      for r in results
                      for m in json.loads(cli("review", "show", r["id"], "--config",
                                              str(box.config), "--json").stdout)["models"])
        assert kept == sorted(e for _n, _a, e in STUDIES)
        # Published figures move in steps of k verdicts (or daily); a restart computes
        # them at once.
        reviewer.close()
        assert daemon.stop() == 0
        daemon.start()
        reviewer = ReviewerClient(box)

        def published() -> list[dict[str, Any]]:
            for t in reversed(ops.on("telemetry")):
                perf = t.json()["data"].get("performance", {})
                if any(m.get("overall", {}).get("verdicts") == len(STUDIES)
                       for m in perf.get("models", [])):
                    return [perf]
            return []
        [perf] = wait_for(published, 60, "the performance section with every verdict")
        table = json.loads(cli("models", "performance", "lesion-demo", "--config",
                               str(box.config), "--json").stdout)
        text = cli("models", "performance", "lesion-demo", "--config", str(box.config)).stdout
    finally:
        reviewer.close()
        assert daemon.stop() == 0

    expected = {"Modality=CT": 5, "PatientAge=40-64": 2, "PatientAge=65+": 2,
                "PatientSex=F": 2, "PatientSex=M": 2}
    assert _cells(table) == expected
    assert _cells(perf) == expected  # what left the box: the same aggregates
    [model] = perf["models"]
    assert model["suppressed_subgroups"] == 2  # the one O, aged 9: below k, not named
    for row in expected:
        assert row in text
    assert "PatientSex=O" not in text and "0-17" not in text

    # The canary sweep: every message the box published, and its log.
    for m in ops.messages:
        body = m.payload.decode()
        for canary in CANARIES:
            assert canary.lower() not in body.lower(), (m.topic, canary)
        data = m.json().get("data") if body.startswith("{") else None
        if isinstance(data, dict):
            perf_section = data.pop("performance", None)
            rest = json.dumps(data)
            for attr in PATIENT:  # nowhere but in the aggregates
                assert attr not in rest, (m.topic, attr)
            for model_entry in (perf_section or {}).get("models", []):
                for cell in model_entry.get("subgroups", []):
                    assert cell["verdicts"] >= K, cell
    log = daemon.log_text()
    for canary in CANARIES:
        assert canary.lower() not in log.lower(), canary
    assert not [line for line in log.splitlines()
                if any(a in line for a in PATIENT) and "performance alert" not in line]
    # At rest: sealed in the review store (no coarse value in clear either).
    stored = b"".join(p.read_bytes() for p in (box.state / "review").iterdir() if p.is_file())
    for clear in (b"PatientAge", b"PatientSex", b"40-64"):
        assert clear not in stored, clear
