"""The egress guard and the log scrubber, from unit checks to a planted PHI
value travelling through a running daemon: blocked, kept encrypted, audited as
``egress.blocked``, counted in telemetry, and never in the log."""

from __future__ import annotations

import io
import json
import logging
import time
import uuid
from datetime import UTC, datetime

from agent import config as cfgmod
from agent.audit import tail
from agent.crypto import KeyEncryptionKey
from agent.deid import Deidentifier, DeidSettings
from agent.types import PhiFingerprint
from agent.uplink import cloudevents, egress, vocabulary
from agent.uplink.outbox import Outbox
from tests.helpers import REPO, Box, Broker, Daemon, set_config, wait_for
from tests.helpers.mqtt import Collector

NAME = "Müller^Zebulon"
PID = "PID-55-CANARY"
BIRTH = "19310417"
STUDY_UID = "1.2.840.113619.2.55.3.604688119.971.1234567890.123"
GUARD = PhiFingerprint(frozenset({NAME, PID, BIRTH, STUDY_UID}))


def result(data: dict[str, object]) -> bytes:
    ev = cloudevents.envelope(kind="result", source="edge-agent/dev-site/dev-box", data=data,
                              event_id=cloudevents.stable_id("egress", json.dumps(data)))
    return cloudevents.encode(ev)


def test_a_clean_result_passes() -> None:
    payload = result({"study": {"ref": "2.25.1234567890123456789", "patient_ref": "p-4f1c"},
                      "status": "ok", "models": [{"name": "lesion", "version": "1.2.0"}]})
    assert egress.check(payload, GUARD) is None


def test_original_values_are_caught_in_any_spelling() -> None:
    cases = {
        "id": {"note": f"see {PID}"},
        "id, other case": {"note": PID.lower()},
        "escaped unicode name": {"who": "Müller"},  # on the wire as M\u00fcller
        "name component": {"who": "zebulon"},
        "iso date": {"born": "1931-04-17"},
        "uid": {"study": STUDY_UID},
        "as a key": {PID: 1},
    }
    for what, data in cases.items():
        payload = result(data)
        hit = egress.check(payload, GUARD)
        assert hit is not None and hit.kind == "study-value", what
        assert PID not in str(hit) and "Müller" not in str(hit)  # the hit never carries the value


def test_phi_patterns_are_caught_without_a_fingerprint() -> None:
    assert egress.check(result({"x": "Doe^Jane"})) == egress.GuardHit("person-name")
    assert egress.check(result({"x": "078-05-1120"})) == egress.GuardHit("ssn")
    assert egress.check(result({"x": "1.2.840.10008.5.1.4.1.1.2.77"})) == \
        egress.GuardHit("dicom-uid")


TODAY = datetime.now(UTC)
TODAY_GUARD = PhiFingerprint(frozenset({"NONE^BOB", "LI^WU", "4711", TODAY.strftime("%Y%m%d"),
                                        "1.2.840.113619.2.55.3.604688119.971.1234567890.7"}))


def test_a_study_of_today_passes_though_every_envelope_carries_its_date() -> None:
    """The envelope is checked by its format: its time shares the date of every study
    acquired today.  The same date in ``data`` is still a study value."""
    payload = result({"study": {"ref": "2.25.1234567890123456789"}, "status": "ok"})
    assert TODAY.strftime("%Y-%m-%d") in json.loads(payload)["time"]
    assert egress.check(payload, TODAY_GUARD, made_at=time.time()) is None
    leaky = result({"study": {"ref": "2.25.1"}, "acquired": TODAY.strftime("%Y-%m-%d")})
    assert egress.check(leaky, TODAY_GUARD) == egress.GuardHit("study-value")


def test_the_envelope_is_validated_by_its_format() -> None:
    good = json.loads(result({"status": "ok"}))
    bad = {
        "a birth date as the time": {"time": "1931-04-17T00:00:00Z"},
        "a time that is not a timestamp": {"time": "zebulon"},
        "a name in the source": {"source": "edge-agent/dev-site/Muller^Zebulon"},
        "an id that is not a UUID": {"id": PID},
        "another content type": {"datacontenttype": "text/plain"},
        "another spec version": {"specversion": "0.3"},
    }
    for what, change in bad.items():
        payload = json.dumps(good | change)
        assert egress.check(payload, GUARD, made_at=time.time()) == \
            egress.GuardHit("envelope"), what
    # Attributes that are not envelope fields are checked like data.
    for extra in ({"subject": STUDY_UID}, {"note": "zebulon"}, {PID: "x"}):
        assert egress.check(json.dumps(good | extra), GUARD) == \
            egress.GuardHit("study-value"), extra
    assert egress.check(json.dumps(good), GUARD, made_at=time.time()) is None


def test_the_boxs_own_words_are_not_study_values() -> None:
    """A patient NONE^BOB and the method text "...; options: none"; LI^WU and the fixed
    descriptions; a standard transfer syntax UID and the UID pattern."""
    method = Deidentifier(DeidSettings(), b"k" * 32).describe()
    assert method.endswith("options: none")
    vocabulary.allow([method])  # what the pipeline does for its configured method
    payload = result({
        "study": {"ref": "2.25.1234711000000000000", "patient_ref": "ABCDEF0123456789",
                  "quarantined": [{"instance": "0123456789ab", "code": code, "reason": text}
                                  for code, text in vocabulary.QUARANTINE.items()]},
        "deidentification": {"method": method, "options": []},
        "failures": [{"code": code, "reason": text, "transfer_syntax": "RLELossless"}
                     for code, text in vocabulary.FAILURE.items()],
        "latency_ms": 4711.3, "standard": "1.2.840.10008.1.2.4.50",
        "models": [{"review_reasons": [vocabulary.REVIEW_BAND.format(p=0.4711, low=0.35,
                                                                      high=0.65)]}],
    })
    assert egress.check(payload, TODAY_GUARD, made_at=time.time()) is None


def test_study_text_is_still_caught_beside_the_boxs_words() -> None:
    region = vocabulary.REGION_ABOVE.format(label="{label}", where="image 1", x=1, y=2, w=3,
                                            h=4, score=0.5, drop=0.1)
    cases = {
        "the name in free text": {"note": "patient none"},
        "short name parts as words": {"reason": "BurnedInAnnotation LI WU"},
        "a numeric id alone": {"n": 4711},
        "a numeric id in text": {"note": "pid 4711"},
        "a name in a template's hole": {"text": region.replace("{label}", "Bob None")},
        "a study UID beside a fixed word": {"failure": "pixels-undecodable 1.2.840.113619.2.5"},
        "the study date, DICOM spelling": {"d": TODAY.strftime("%Y%m%d")},
    }
    for what, data in cases.items():
        assert egress.check(result(data), TODAY_GUARD) is not None, what
    # Short parts are whole words: "delivery" and "wunderbar" are not Li Wu.
    assert egress.check(result({"note": "delivery wunderbar"}), TODAY_GUARD) is None
    assert egress.check(result({"x": "1.2.840.10008.5.1.4.1.1.2.77"})) == \
        egress.GuardHit("dicom-uid")


def test_what_the_guard_remembers_of_a_study_follows_the_vocabulary() -> None:
    """The guard remembers, per study, which strings are the box's words (issue 19: a
    drain checks the same keys and names in every message).  A word a signed manifest
    adds later (``vocabulary.allow``) must count from then on, and free text is still
    searched in every message."""
    word = f"zqx-{uuid.uuid4().hex[:8]}-lesion-model"  # a model name equal to a study value
    guard = PhiFingerprint(frozenset({word, PID}))
    payload = result({"models": [{"name": word}]})
    assert egress.check(payload, guard) == egress.GuardHit("study-value")
    assert egress.check(payload, guard) == egress.GuardHit("study-value")  # remembered
    vocabulary.allow([word])
    assert egress.check(payload, guard) is None  # the box's own word now
    assert egress.check_many([(payload, guard, None)] * 3) == [None] * 3
    leaking = result({"models": [{"name": word}], "note": f"see {PID.lower()}"})
    assert egress.check_many([(payload, guard, None), (leaking, guard, None)]) == [
        None, egress.GuardHit("study-value")]


def test_result_schema_and_fleet_doc_list_exactly_the_vocabulary() -> None:
    schema = json.loads((REPO / "docs" / "schemas" / "result.schema.json").read_text())
    study = schema["properties"]["study"]["properties"]
    assert set(study["quarantined"]["items"]["properties"]["code"]["enum"]) == \
        set(vocabulary.QUARANTINE)
    failure = schema["properties"]["failures"]["items"]["properties"]
    assert set(failure["code"]["enum"]) == set(vocabulary.FAILURE)

    def keys(node: object) -> set[str]:
        if isinstance(node, dict):
            own = set(node.get("properties", {}))
            return own | {k for v in node.values() for k in keys(v)}
        if isinstance(node, list):
            return {k for v in node for k in keys(v)}
        return set()

    assert keys(schema) <= set(vocabulary.RESULT_KEYS)
    fleet = (REPO / "docs" / "fleet.md").read_text()
    for code in (*vocabulary.QUARANTINE, *vocabulary.FAILURE):
        assert f"| `{code}` |" in fleet, f"docs/fleet.md does not explain {code}"


def test_log_lines_are_scrubbed_of_planted_values_and_patterns() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(egress.ScrubFilter())
    logger = logging.getLogger("edge_agent.test_scrub")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        with egress.watch(GUARD):
            logger.warning("study of %s (%s) born %s", "MÜLLER Zebulon", PID, "1931-04-17")
            try:
                raise ValueError(f"bad value {PID} in uid {STUDY_UID}")
            except ValueError:
                logger.exception("decode failed for %s", "Roe^Richard")
        logger.warning("after the study: ssn 078-05-1120")
    finally:
        logger.removeHandler(handler)
    out = stream.getvalue()
    for planted in ("MÜLLER", "Zebulon", PID, "1931-04-17", STUDY_UID, "Roe^Richard",
                    "078-05-1120"):
        assert planted.lower() not in out.lower(), planted
    assert "[redacted]" in out and "[person-name]" in out and "[ssn]" in out
    assert "ValueError" in out  # the traceback survives, minus the values


def test_planted_phi_in_a_result_is_blocked_by_the_daemon(box: Box, broker: Broker) -> None:
    set_config(box, "telemetry", "interval_seconds", "1")
    cfg = cfgmod.load(box.config)
    kek = KeyEncryptionKey.from_file(cfg.keys.kek)
    (cfg.state_dir / "outbox").mkdir(parents=True, exist_ok=True)
    ob = Outbox(cfg.state_dir / "outbox" / "outbox.db", kek, cfg.outbox.max_bytes)
    leaky = result({"study": {"ref": "2.25.99"}, "status": "ok",
                    "explanation": "prior exam of zebulon muller"})
    clean = result({"study": {"ref": "2.25.100"}, "status": "ok"})
    leaky_id = json.loads(leaky)["id"]
    ob.enqueue("results", leaky_id, leaky, PhiFingerprint(frozenset({"Muller^Zebulon"})))
    ob.enqueue("results", json.loads(clean)["id"], clean, GUARD)
    ob.close()

    ops = Collector(box).start()
    d = Daemon(box)
    d.start()
    try:
        wait_for(lambda: any(e["data"]["security"]["egress_blocked"] >= 1
                             for e in ops.on("/telemetry")), 30, "egress_blocked in telemetry")
        ids = [e["id"] for e in ops.on("/results")]
        assert json.loads(clean)["id"] in ids and leaky_id not in ids
    finally:
        assert d.stop() == 0
        ops.stop()
    everything = b"".join(p for _t, p, _r in ops.messages).lower()
    assert b"zebulon" not in everything
    log_text = d.log_text()
    assert f"egress guard blocked results message {leaky_id}" in log_text
    assert "zebulon" not in log_text.lower()

    ob = Outbox(cfg.state_dir / "outbox" / "outbox.db", kek, cfg.outbox.max_bytes)
    try:
        assert ob.stats()["blocked"] == 1  # kept (encrypted), not deleted, not published
        raw = (cfg.state_dir / "outbox" / "outbox.db").read_bytes()
        assert b"zebulon" not in raw.lower()
    finally:
        ob.close()
    events = tail(cfg.state_dir / "audit" / "audit.db", kek, 200)
    blocked = [e for e in events if e.get("event") == "egress.blocked"]
    assert len(blocked) == 1, [e.get("event") for e in events]
    assert "zebulon" not in json.dumps(blocked).lower()
