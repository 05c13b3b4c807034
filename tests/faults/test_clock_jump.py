"""A wall-clock step (NTP correction, RTC reset) while a study is assembling.

The assembly state lives on disk with wall-clock times (``time.time()``),
because it must survive a restart and a monotonic clock does not.  So:

* a step forward closes open studies early; an instance arriving after that
  becomes a follow-up version (its own result), nothing is lost;
* a step backward would make ``now - last_at`` negative and hold the study
  for the size of the step; ``Inbox.complete_due`` clamps ``last_at`` and
  ``first_at`` to ``now`` when they lie in the future, so the quiet period
  restarts from the step.
"""

from __future__ import annotations

import io
import time
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

from agent.config import InboxSettings, StudySettings
from agent.crypto import KeyEncryptionKey, random_key
from agent.store.inbox import Inbox
from tests.helpers.faults import ct_instance

QUIET = 5.0


def inbox(tmp: Path) -> Inbox:
    return Inbox(tmp / "inbox", KeyEncryptionKey(random_key()), random_key(),
                 InboxSettings(max_bytes=2**30, min_free_bytes=0),
                 StudySettings(quiet_seconds=QUIET, max_age_seconds=3600))


def store(ib: Inbox, study_uid: str) -> int:
    ds = ct_instance(study_uid, generate_uid(), 1)
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    buf.seek(0)
    r = ib.store(buf, study_uid=study_uid, sop_uid=ds.SOPInstanceUID,
                 sop_class=ds.SOPClassUID, transfer_syntax=ds.file_meta.TransferSyntaxUID,
                 calling_ae="PYNETDICOM", peer="127.0.0.1")
    assert r.outcome == "stored"
    return r.study_version


def test_forward_step_closes_early_and_late_instance_is_a_follow_up(tmp_path: Path) -> None:
    ib = inbox(tmp_path)
    uid = generate_uid()
    assert store(ib, uid) == 1
    assert ib.complete_due(time.time() + 86400) != []  # the clock jumped a day ahead
    assert store(ib, uid) == 2  # nothing lost: a second version collects it
    assert [s.version for s in ib.ready()] == [1]
    ib.close()


def test_backward_step_does_not_hold_a_study_for_the_size_of_the_step(tmp_path: Path) -> None:
    ib = inbox(tmp_path)
    store(ib, generate_uid())
    stepped = time.time() - 3600  # the clock went back an hour
    ib.complete_due(stepped)  # first look after the step
    assert ib.complete_due(stepped + QUIET + 1) != []  # a quiet period later it is done
    ib.close()
