"""The inbox's pre-created instance files ("slots", agent/store/files.py): the next
batch is made before the last ones run out, off the C-STORE's thread."""

from __future__ import annotations

from pathlib import Path

from agent.store.files import Slots
from tests.helpers import wait_for


def test_the_next_batch_of_slots_is_made_before_the_last_ones_are_taken(tmp_path: Path) -> None:
    slots = Slots(tmp_path)
    taken = [slots.take() for _ in range(Slots.BATCH - Slots.LOW_WATER + 1)]
    # Below the low-water mark: a batch is on its way without anyone taking more.
    wait_for(lambda: len(list(tmp_path.iterdir())) == 2 * Slots.BATCH, 30, "the next batch")
    wait_for(lambda: len(slots.free) == 2 * Slots.BATCH - len(taken), 30, "slots handed over")
    # Every slot is an empty private file, handed out once.
    taken += [slots.take() for _ in range(len(slots.free))]
    assert len(set(taken)) == len(taken) == 2 * Slots.BATCH
    assert all(p.parent == tmp_path and p.stat().st_size == 0 for p in taken)
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in taken)


def test_slots_are_made_in_place_when_none_are_left(tmp_path: Path) -> None:
    """A refill that has not finished (or failed) does not leave a C-STORE without a slot."""
    slots = Slots(tmp_path)
    got = [slots.take() for _ in range(3 * Slots.BATCH)]
    assert len(set(got)) == len(got)
    assert all(p.exists() for p in got)
