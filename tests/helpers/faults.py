"""Helpers for the fault tests: studies with planted PHI, a counting modality,
and the bookkeeping that turns C-STORE successes and published results into
the "nothing lost" checks of DESIGN.md."""

from __future__ import annotations

import json
import os
import random
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pydicom
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from agent.crypto import load_key_file
from agent.deid.pseudonym import Pseudonymizer
from tests.helpers.dicom import make_instance
from tests.helpers.peers import Box, Subscriber

# A randomised round (kill -9 at random points) runs with a fresh seed, printed and
# attached to its failure; setting this variable replays that exact round.
SEED_ENV = "EDGE_AGENT_TEST_SEED"

CANARY_NAME = "Faultcanary^Wilhelmina"
CANARY_ID = "PID-FAULT-4471"
CANARY_ACC = "ACC-FAULT-5521"
CANARY_BIRTH = "19290311"

def round_seed() -> int:
    """The seed of a randomised round: ``$EDGE_AGENT_TEST_SEED`` when set (a replay),
    else a fresh one.  Printed, so that the captured output of a failure shows it."""
    raw = os.environ.get(SEED_ENV, "").strip()
    seed = int(raw) if raw else random.randrange(1 << 30)
    print(f"random seed {seed} (replay: {SEED_ENV}={seed})")
    return seed


@contextmanager
def seed_noted(seed: int) -> Iterator[None]:
    """Whatever fails inside says which seed replays it."""
    try:
        yield
    except BaseException as exc:
        exc.add_note(f"random seed {seed}; replay with {SEED_ENV}={seed}")
        raise


@dataclass
class SentStudy:
    uid: str
    sop_uids: list[str] = field(default_factory=list)
    acked: set[str] = field(default_factory=set)

    def phi(self) -> set[str]:
        return {self.uid, *self.sop_uids, CANARY_NAME, CANARY_ID, CANARY_ACC, CANARY_BIRTH}


def ct_instance(study_uid: str, series_uid: str, number: int) -> pydicom.Dataset:
    return make_instance(CANARY_NAME, study_uid, series_uid, PatientID=CANARY_ID,
                         AccessionNumber=CANARY_ACC, PatientBirthDate=CANARY_BIRTH,
                         InstanceNumber=number)


def send(box: Box, study: SentStudy, n: int, *, aet: str = "PYNETDICOM") -> int:
    """Send n new instances of ``study`` on one association; records what was
    acknowledged with 0x0000.  Never raises: a daemon killed mid-association
    just ends the count."""
    series = generate_uid()
    ae = AE(ae_title=aet)
    ae.add_requested_context(CTImageStorage)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ok = 0
    try:
        assoc = ae.associate("127.0.0.1", box.dicom_port, ae_title=box.ae_title)
    except Exception:  # noqa: BLE001 - a dead daemon refuses, that is the point
        return 0
    if not assoc.is_established:
        return 0
    try:
        for _ in range(n):
            ds = ct_instance(study.uid, series, len(study.sop_uids) + 1)
            study.sop_uids.append(ds.SOPInstanceUID)
            status = assoc.send_c_store(ds)
            if status and int(status.Status) == 0x0000:
                study.acked.add(ds.SOPInstanceUID)
                ok += 1
            elif not assoc.is_established:
                break
        if assoc.is_established:
            assoc.release()
    except Exception:  # noqa: BLE001
        assoc.abort()
    return ok


def results(ops: Subscriber) -> list[dict[str, Any]]:
    return [m.json() for m in ops.on("results")]


def study_ref(box: Box, study_uid: str) -> str:
    key = load_key_file(box.root / "keys" / "pseudonym.key", purpose="pseudonym")
    return Pseudonymizer(key).uid(study_uid)


def check_nothing_lost(box: Box, studies: list[SentStudy], got: list[dict[str, Any]]) -> None:
    """Every acknowledged instance is counted in a result of its study; a study
    version has exactly one event id; redeliveries carry identical payloads."""
    by_version: dict[tuple[str, int], set[str]] = defaultdict(set)
    payload: dict[str, str] = {}
    counted: dict[str, int] = defaultdict(int)
    for ev in got:
        s = ev["data"]["study"]
        by_version[(s["ref"], int(s["version"]))].add(ev["id"])
        # A redelivery (or a re-run after a crash between enqueue and mark_done)
        # may differ in timing fields, never in what it says about the study.
        body = json.dumps(s, sort_keys=True)
        assert payload.setdefault(ev["id"], body) == body, "same id, different study content"
    for ids in by_version.values():
        assert len(ids) == 1, f"study version has {len(ids)} different ids"
    seen: set[str] = set()
    for ev in got:
        if ev["id"] in seen:
            continue
        seen.add(ev["id"])
        counted[ev["data"]["study"]["ref"]] += int(ev["data"]["study"]["instances_received"])
    for st in studies:
        ref = study_ref(box, st.uid)
        if st.acked:
            assert ref in counted, "a study with acknowledged instances has no result"
        versions = sorted((v, len(ids)) for (r, v), ids in by_version.items() if r == ref)
        facts = (f"study {ref[:20]}: sent {len(st.sop_uids)}, acked {len(st.acked)}, "
                 f"counted {counted.get(ref, 0)} over versions {versions}")
        assert counted.get(ref, 0) >= len(st.acked), f"acknowledged instance lost ({facts})"
        assert counted.get(ref, 0) <= len(st.sop_uids), f"more instances than were sent ({facts})"
