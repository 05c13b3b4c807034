"""Faults through the real daemon, a real mTLS mosquitto and real DICOM peers:
kill -9 at random points, broker down and up, a restart with a backlog, full
budgets, a corrupted inbox file, a key rotation interrupted half-way."""

from __future__ import annotations

import random
import re
import signal
import subprocess
import threading

import psutil
import pytest
from pydicom.uid import generate_uid

from agent import config as agent_config
from agent.errors import EdgeAgentError
from agent.identity.keyrotate import install_new_kek, old_kek_path, rotate_keys
from tests.helpers import (
    EDGE_AGENT,
    REPO,
    Box,
    Broker,
    Daemon,
    Subscriber,
    audit_events,
    set_config,
    wait_for,
)
from tests.helpers.faults import (
    SEED_ENV,
    SentStudy,
    check_nothing_lost,
    results,
    round_seed,
    seed_noted,
    send,
)

RESULT_LINE = re.compile(r"-> result ([0-9a-f-]{36})")


def logged_result_ids(d: Daemon) -> list[str]:
    return RESULT_LINE.findall(d.log_text())


def burst(box: Box, timeout: float = 120) -> None:
    b = Daemon(box, "--burst")
    b.start()
    assert b.proc is not None
    assert b.proc.wait(timeout) == 0, b.log_text()[-3000:]


def test_broker_down_then_restart_with_backlog_then_broker_up_delivers_in_order(
        box: Box, broker: Broker) -> None:
    broker.stop()
    set_config(box, "study", "quiet_seconds", "0.5")
    d = Daemon(box)
    d.start()
    studies = [SentStudy(generate_uid()) for _ in range(3)]
    for st in studies:
        assert send(box, st, 2) == 2
    wait_for(lambda: len(logged_result_ids(d)) >= 3, 90, "3 studies processed offline")
    order = logged_result_ids(d)
    assert d.stop() == 0  # a restart with the backlog still in the outbox
    d.start()
    broker.start()
    ops = Subscriber(box).start()
    try:
        wait_for(lambda: {e["id"] for e in results(ops)} >= set(order), 90, "backlog drained")
        first_seen = list(dict.fromkeys(e["id"] for e in results(ops)))
        assert first_seen == order  # same ids, in processing order
        check_nothing_lost(box, studies, results(ops))
        assert d.stop() == 0
    finally:
        ops.stop()


def _kill9_rounds(box: Box, broker: Broker, rounds: int, workers: int = 1) -> None:
    seed = round_seed()
    with seed_noted(seed):
        _kill9_rounds_seeded(box, broker, rounds, random.Random(seed), workers)


def _kill9_rounds_seeded(box: Box, broker: Broker, rounds: int, rng: random.Random,
                         workers: int) -> None:
    set_config(box, "study", "quiet_seconds", "0.4")
    set_config(box, "dicom", "workers", str(workers))
    ops = Subscriber(box).start()
    studies: list[SentStudy] = []
    try:
        for _ in range(rounds):
            d = Daemon(box)
            d.start()
            senders = []
            # With receive workers, several associations at once (they land on
            # different workers); sometimes a follow-up to an earlier study.
            for _ in range(1 if workers == 1 else 3):
                st = (rng.choice(studies) if studies and rng.random() < 0.3
                      else SentStudy(generate_uid()))
                if st not in studies:
                    studies.append(st)
                senders.append(threading.Thread(target=send, args=(box, st, rng.randint(2, 6))))
            for t in senders:
                t.start()
            children = receive_workers(d)
            assert len(children) == (0 if workers == 1 else workers)
            # A random point: mid-ingest, in the quiet period, processing or publishing.
            threading.Event().wait(rng.uniform(0.05, 2.5))
            d.kill9()
            # Workers die with the daemon: nothing may keep writing to the inbox.
            wait_for(lambda: not any(alive(c) for c in children), 10, "workers to die")  # noqa: B023
            for t in senders:
                t.join(30)
        burst(box)
        acked = sum(len(s.acked) for s in studies)
        assert acked > 0
        try:
            wait_for(lambda: _settled(box, studies, ops), 60,
                     "every acknowledged instance in a result")
        finally:
            check_nothing_lost(box, studies, results(ops))  # says what is missing
    finally:
        ops.stop()


def receive_workers(d: Daemon) -> list[psutil.Process]:
    assert d.proc is not None
    return [c for c in psutil.Process(d.proc.pid).children()
            if "agent.dicom.worker" in " ".join(c.cmdline())]


def alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _settled(box: Box, studies: list[SentStudy], ops: Subscriber) -> bool:
    try:
        check_nothing_lost(box, studies, results(ops))
    except AssertionError:
        return False
    return True


def test_kill9_at_random_points_loses_no_acknowledged_instance(box: Box, broker: Broker) -> None:
    _kill9_rounds(box, broker, rounds=4)


@pytest.mark.slow
def test_kill9_many_rounds(box: Box, broker: Broker) -> None:
    _kill9_rounds(box, broker, rounds=40)


def test_kill9_with_receive_workers_loses_no_acknowledged_instance(box: Box,
                                                                   broker: Broker) -> None:
    _kill9_rounds(box, broker, rounds=4, workers=2)


@pytest.mark.slow
def test_kill9_with_receive_workers_many_rounds(box: Box, broker: Broker) -> None:
    _kill9_rounds(box, broker, rounds=25, workers=3)


def test_a_round_seed_is_printed_and_replayed_from_the_environment(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv(SEED_ENV, "424242")
    assert round_seed() == 424242
    assert f"{SEED_ENV}=424242" in capsys.readouterr().out
    with pytest.raises(AssertionError) as failed, seed_noted(424242):
        raise AssertionError("an acknowledged instance was lost")
    assert f"replay with {SEED_ENV}=424242" in "".join(failed.value.__notes__)


def test_corrupted_inbox_file_is_failed_with_alert_rest_processed(
        box: Box, broker: Broker, ops: Subscriber) -> None:
    set_config(box, "study", "quiet_seconds", "600")
    d = Daemon(box)
    d.start()
    st = SentStudy(generate_uid())
    assert send(box, st, 3) == 3
    assert d.stop() == 0
    # The inbox pre-allocates empty slot files; the written ones hold instances.
    files = sorted(p for p in (box.state / "inbox" / "files").rglob("*.enc")
                   if p.stat().st_size > 0)
    assert len(files) == 3
    raw = bytearray(files[1].read_bytes())
    raw[len(raw) // 2] ^= 0x01
    files[1].write_bytes(bytes(raw))
    burst(box)
    ev = ops.wait("results", 1, timeout=30)[0].json()
    s = ev["data"]["study"]
    assert s["instances_received"] == 3
    assert s["instances_processed"] == 2
    assert len(s["quarantined"]) == 1
    assert "unreadable inbox file" in s["quarantined"][0]["reason"]
    alerts = [e for e in audit_events(box) if e["event"] == "security.alert"]
    assert alerts, "no security alert audited for the tampered inbox file"


def test_full_outbox_is_reported_survived_and_nothing_lost(box: Box, broker: Broker) -> None:
    set_config(box, "study", "quiet_seconds", "0.5")
    set_config(box, "outbox", "max_bytes", "2000")
    broker.stop()
    d = Daemon(box)
    d.start()
    st = SentStudy(generate_uid())
    assert send(box, st, 2) == 2
    wait_for(lambda: "outbox is full" in d.log_text(), 60, "the full outbox reported")
    assert d.proc is not None and d.proc.poll() is None  # survived
    assert d.stop() == 0
    set_config(box, "outbox", "max_bytes", str(64 * 2**20))
    broker.start()
    ops = Subscriber(box).start()
    try:
        d.start()
        wait_for(lambda: results(ops), 60, "the held-back result")
        check_nothing_lost(box, [st], results(ops))
        assert d.stop() == 0
    finally:
        ops.stop()


def test_inbox_budget_refuses_with_a700_and_recovers(box: Box, broker: Broker,
                                                     ops: Subscriber) -> None:
    set_config(box, "study", "quiet_seconds", "600")
    set_config(box, "inbox", "max_bytes", "20000")  # CT_small is ~39 kB: the 2nd won't fit
    d = Daemon(box)
    d.start()
    st = SentStudy(generate_uid())
    assert send(box, st, 3) == 1
    assert "inbox holds" in d.log_text()  # the operator sees why (0xA700 to the modality)
    assert d.proc is not None and d.proc.poll() is None
    assert d.stop() == 0
    burst(box)
    ops.wait("results", 1, timeout=30)
    check_nothing_lost(box, [st], results(ops))


def test_key_rotation_refused_while_running_and_resumes_after_a_crash(
        box: Box, broker: Broker, ops: Subscriber) -> None:
    set_config(box, "study", "quiet_seconds", "600")
    cfg = agent_config.load(box.config)
    d = Daemon(box)
    d.start()
    st = SentStudy(generate_uid())
    assert send(box, st, 2) == 2
    with pytest.raises(EdgeAgentError, match="daemon is running"):
        rotate_keys(cfg)
    assert d.stop() == 0

    first = rotate_keys(cfg, user="test-officer")
    assert first["inbox"] >= 1 and first["resumed"] == 0
    assert not old_kek_path(cfg.keys.kek).exists()

    # A crash right after the new KEK was installed: the old one is still on disk,
    # the daemon starts on the half-rotated box, and a re-run finishes the job.
    install_new_kek(cfg.keys.kek)
    assert old_kek_path(cfg.keys.kek).exists()
    d.start()
    more = SentStudy(generate_uid())
    assert send(box, more, 1) == 1
    assert d.stop() == 0
    second = rotate_keys(cfg)
    assert second["resumed"] == 1
    assert not old_kek_path(cfg.keys.kek).exists()

    burst(box)
    wait_for(lambda: len({e["id"] for e in results(ops)}) >= 2, 30, "both results")
    check_nothing_lost(box, [st, more], results(ops))
    rotated = [e for e in audit_events(box) if e["event"] == "key.rotated"]
    assert len(rotated) == 2
    verify = subprocess.run([*EDGE_AGENT, "audit", "verify", "--config", str(box.config)],
                            cwd=REPO, capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_sigterm_during_processing_exits_cleanly(box: Box, broker: Broker,
                                                 ops: Subscriber) -> None:
    set_config(box, "study", "quiet_seconds", "0.3")
    d = Daemon(box)
    d.start()
    st = SentStudy(generate_uid())
    assert send(box, st, 4) == 4
    wait_for(lambda: "processing study" in d.log_text(), 30, "processing to start")
    assert d.stop(signal.SIGTERM) == 0
    burst(box)
    wait_for(lambda: results(ops), 30, "the result")
    check_nothing_lost(box, [st], results(ops))

