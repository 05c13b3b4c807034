"""The review stage's parts on their own: Wilson intervals, the performance table's
merging and suppression, alerts, the verdict schema, the store's first-verdict-wins
and sealing, and the [review] keys."""

from __future__ import annotations

import json
import os
import sqlite3
import uuid
from pathlib import Path

import pydicom
import pytest

from agent import subgroups
from agent.config import duration_seconds
from agent.crypto import KeyEncryptionKey
from agent.review import performance, seed, verdicts
from agent.review.stats import wilson
from agent.review.store import Joined, ResultRecord, ReviewStore, Verdict
from tests.helpers import REPO


@pytest.mark.parametrize(("x", "n", "low", "high"), [
    (0, 10, 0.0, 0.2775), (5, 10, 0.2366, 0.7634), (10, 10, 0.7225, 1.0),
    (95, 100, 0.8883, 0.9785), (30, 48, 0.4836, 0.7479),  # by hand: 0.6157 -/+ 0.1321,
])
def test_wilson_matches_published_values(x: int, n: int, low: float, high: float) -> None:
    p = wilson(x, n)
    # Published with z = 1.96; we use the exact 97.5th percentile (1.95996...).
    assert (p.low, p.high) == (pytest.approx(low, abs=2e-4), pytest.approx(high, abs=2e-4))
    assert wilson(0, 0).n == 0 and wilson(0, 0).value is None
    with pytest.raises(ValueError):
        wilson(3, 2)


def _rec(i: int, group: dict[str, str], positive: bool) -> ResultRecord:
    return ResultRecord(str(uuid.UUID(int=i)), "m", "1", 0.0, True, f"s{i}", "f", positive,
                        "lesion", {"lesion": 0.9, "no_lesion": 0.1}, 0.9, 0.1, (), {}, group)


def _joined(i: int, group: dict[str, str], positive: bool, verdict: str,
            label: str | None = None) -> Joined:
    rec = _rec(i, group, positive)
    return Joined(rec, Verdict(rec.result_id, "m", str(i), verdict, label, None, "r", "mqtt", 1.0))


def test_small_subgroups_merge_into_other_or_are_suppressed_and_never_named() -> None:
    rows = [_joined(i, {"Sex": "F", "Manufacturer": "A"}, True, "agreed") for i in range(12)]
    rows += [_joined(100 + i, {"Sex": "M", "Manufacturer": "RARE1"}, True, "agreed")
             for i in range(4)]
    rows += [_joined(200 + i, {"Sex": "M", "Manufacturer": "RARE2"}, False, "disagreed")
             for i in range(4)]
    rows += [_joined(300 + i, {"Sex": "O", "Manufacturer": "A"}, False, "indeterminate")
             for i in range(2)]
    section, _alerts = performance.report({30: rows}, k=8, thresholds={}, gap=0.1)
    [m] = section["models"]
    cells = {(s["attribute"], s["value"]): s for s in m["subgroups"]}
    # Manufacturer: RARE1 + RARE2 = 8 >= k: merged into other; Sex: M has 8, O only 2.
    assert set(cells) == {("Manufacturer", "A"), ("Manufacturer", "other"), ("Sex", "F"),
                          ("Sex", "M")}
    assert m["suppressed_subgroups"] == 1
    assert cells[("Manufacturer", "other")]["fn"] == 4  # disagreed negatives: missed
    text = json.dumps(section)
    assert "RARE" not in text and '"O"' not in text
    below_k, _ = performance.report({30: rows[:5]}, k=8, thresholds={}, gap=0.1)
    assert below_k["models"] == [{"name": "m", "version": "1", "window_days": 30,
                                  "suppressed": True}]


def test_corrected_label_sets_the_truth_and_alerts_name_the_subgroup() -> None:
    rows = [_joined(i, {"Modality": "CT"}, True, "agreed") for i in range(20)]
    rows += [_joined(100 + i, {"Modality": "DX"}, False, "disagreed", "lesion")
             for i in range(10)]
    rows += [_joined(200 + i, {"Modality": "DX"}, True, "agreed") for i in range(10)]
    rows += [_joined(300 + i, {"Modality": "DX"}, True, "disagreed", "lesion")
             for i in range(2)]  # a corrected label equal to the finding: still positive
    section, alerts = performance.report({30: rows}, k=10,
                                         thresholds={("m", "1"): {"sensitivity": 0.9}},
                                         gap=0.05)
    dx = next(s for s in section["models"][0]["subgroups"] if s["value"] == "DX")
    assert (dx["tp"], dx["fn"], dx["fp"]) == (12, 10, 0)
    named = {(a.subgroup, a.metric, a.kind) for a in alerts}
    assert ("Modality=DX", "sensitivity", "below-threshold") in named
    assert not any(a.subgroup == "Modality=CT" for a in alerts)
    md = performance.markdown(section, "m")
    assert "| Modality=DX |" in md and "below-threshold" in md


def test_subgroup_values_are_stored_coarse() -> None:
    assert performance.band("PatientAge", "045Y") == "40-64"
    assert performance.band("PatientAge", "006M") == "0-17"
    assert performance.band("PatientAge", "65+") == "65+"  # captured coarse already
    assert performance.band("PatientAge", "old") == "unknown"
    assert performance.band("PatientSex", "f ") == "F"
    assert performance.band("PatientSex", "X") == "unknown"
    assert performance.band("Manufacturer", "  ACME\x00 ") == "ACME"


def test_patient_characteristics_are_captured_as_bands_only() -> None:
    ds = pydicom.Dataset()
    ds.PatientAge, ds.PatientSex, ds.PatientBirthDate = "017Y", "F", "19500101"
    wanted = ("Modality", "PatientAge", "PatientSex")
    assert subgroups.capture(ds, wanted) == {"PatientAge": "0-17", "PatientSex": "F"}
    del ds.PatientAge  # from the birth date against the study's date, to the day
    ds.StudyDate = "20150101"
    assert subgroups.capture(ds, wanted)["PatientAge"] == "65+"
    ds.StudyDate = "20141231"
    assert subgroups.capture(ds, wanted)["PatientAge"] == "40-64"
    ds.StudyDate, ds.PatientSex = "19000101", "X"  # before birth; not a DICOM code
    assert subgroups.capture(ds, wanted) == {"PatientAge": "unknown", "PatientSex": "unknown"}
    assert subgroups.capture(pydicom.Dataset(), wanted) == {"PatientAge": "unknown",
                                                            "PatientSex": "unknown"}


def test_verdict_schema_is_the_published_one_and_refusals_carry_codes() -> None:
    shipped = REPO / "agent" / "review" / "schemas" / "verdict.schema.json"
    assert shipped.read_text() == (REPO / "docs" / "schemas" / "verdict.schema.json").read_text()
    rid = str(uuid.uuid4())
    ok = verdicts.build(reviewer="dr.who", box="s/d", result_id=rid, verdict="agreed")
    assert verdicts.parse(json.dumps(ok).encode(), "s/d").reviewer == "dr.who"
    cases = {
        "malformed": b"[1]",
        "wrong-role": json.dumps({**ok, "source": "edge-agent/s/d"}).encode(),
        "invalid": json.dumps({**ok, "data": {**ok["data"], "verdict": "maybe"}}).encode(),
        "wrong-box": json.dumps(ok).encode(),
    }
    for code, payload in cases.items():
        with pytest.raises(verdicts.VerdictRefused) as exc:
            verdicts.parse(payload, "s/other" if code == "wrong-box" else "s/d")
        assert exc.value.code == code
    # The identity the topic bound (the certificate's CN) must be the one the source names.
    assert verdicts.parse(json.dumps(ok).encode(), "s/d", reviewer="dr.who").reviewer == "dr.who"
    with pytest.raises(verdicts.VerdictRefused) as exc:
        verdicts.parse(json.dumps(ok).encode(), "s/d", reviewer="dr.no")
    assert (exc.value.code, exc.value.verdict_id) == ("wrong-reviewer", ok["id"])
    with pytest.raises(verdicts.VerdictRefused) as exc:
        verdicts.parse(json.dumps({**ok, "data": {**ok["data"], "extra": 1}}).encode(), "s/d")
    assert exc.value.verdict_id == ok["id"]


def test_store_keeps_the_first_verdict_and_seals_what_identifies(tmp_path: Path) -> None:
    kek = KeyEncryptionKey(os.urandom(32))
    path = tmp_path / "review.db"
    store = ReviewStore(path, kek)
    rec = _rec(1, {"Manufacturer": "QUASIIDENTIFIER"}, True)
    store.record(rec)
    store.record(rec)  # a study processed again after a crash
    first = Verdict(rec.result_id, "m", "v1", "agreed", None, "NOTE-CANARY", "r", "mqtt", 2.0)
    assert store.add_verdict(first)
    assert not store.add_verdict(Verdict(rec.result_id, "m", "v2", "disagreed", None, None,
                                         "r", "mqtt", 3.0))
    got = store.verdict_of(rec.result_id, "m")
    assert got is not None and got.verdict_id == "v1" and got.note == "NOTE-CANARY"
    assert [j.record.subgroup for j in store.joined()] == [{"Manufacturer": "QUASIIDENTIFIER"}]
    store.close()
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    assert b"QUASIIDENTIFIER" not in raw and b"NOTE-CANARY" not in raw
    # A row moved under another result does not open.
    db = sqlite3.connect(path)
    db.execute("UPDATE results SET result_id='x'")
    db.commit()
    db.close()
    store = ReviewStore(path, kek)
    with pytest.raises(Exception, match="cannot be read"):
        store.results_of("x")
    store.close()


def test_review_durations_and_the_seed_hook_is_for_dev_test_mode_only(
        monkeypatch: pytest.MonkeyPatch) -> None:
    assert duration_seconds("4h") == 14400 and duration_seconds(90) == 90
    assert duration_seconds("2d") == 172800 and duration_seconds("soon") is None
    monkeypatch.setenv("EDGE_AGENT_TEST_MODE", "1")
    assert seed.armed("development") and not seed.armed("production")
    monkeypatch.delenv("EDGE_AGENT_TEST_MODE")
    assert not seed.armed("development")


def test_manifest_acceptance_thresholds_are_parsed_and_checked() -> None:
    from agent.errors import ModelError
    from agent.infer.manifest import parse_manifest

    shipped = (REPO / "models" / "lesion-demo" / "1.1.0" / "manifest.toml").read_text()
    # The demo ships the model card's thresholds; without the table there are none.
    assert dict(parse_manifest(shipped.encode()).acceptance) == {"sensitivity": 0.9,
                                                                 "specificity": 0.9}
    text = shipped.split("\n[acceptance]\n")[0]
    assert parse_manifest(text.encode()).acceptance == ()
    good = parse_manifest((text + "\n[acceptance]\nsensitivity = 0.9\nppv = 1\n").encode())
    assert dict(good.acceptance) == {"sensitivity": 0.9, "ppv": 1.0}
    with pytest.raises(ModelError) as exc:
        parse_manifest((text + "\n[acceptance]\nrecall = 0.9\nnpv = 1.5\n").encode())
    assert "acceptance.recall is not a metric" in str(exc.value)
    assert "acceptance.npv must be a number in (0, 1]" in str(exc.value)


def test_fleet_reviewer_is_named_by_its_certificate_cn(tmp_path: Path) -> None:
    """'fleet review submit' publishes on the topic of its certificate's CN and names
    the same reviewer in the verdict; a configured name that is not the CN is refused."""
    from agent.errors import ConfigError
    from agent.identity.pki import issue, make_ca, write_pair
    from fleet.review import load_reviewer

    ca_key, ca = make_ca()
    key, cert = issue(ca_key, ca, "dr.jones", client=True)
    kp, cp = write_pair(tmp_path / "pki", "rev", key, cert)
    ops = tmp_path / "ops.toml"
    ops.write_text(f'[reviewer]\ncert = "{cp}"\nkey = "{kp}"\n')
    assert load_reviewer(ops).name == "dr.jones"
    assert load_reviewer(ops, name="dr.jones").name == "dr.jones"
    with pytest.raises(ConfigError, match="not the CN"):
        load_reviewer(ops, name="dr.smith")
    ops.write_text(ops.read_text() + 'name = "dr.smith"\n')
    with pytest.raises(ConfigError, match="not the CN"):
        load_reviewer(ops)
