"""Property-based fuzzing of the DICOM node's wire handling inside an association:
P-DATA-TF PDUs with PDVs on random presentation context IDs (accepted or not),
random control headers and cut short, sent by a scripted peer.  Whatever arrives,
the node answers (a response, an A-ABORT or a close) or keeps waiting within its
deadlines; no thread of it dies, and no association stays counted once its
connection is gone."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import rx_peer
from tests.helpers.receive import AE_TITLE, node, wait_for

WIRE = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.too_slow,
                                       HealthCheck.function_scoped_fixture])
CONTEXTS = ((1, rx_peer.CT, (rx_peer.EXPLICIT_LE,)), (3, rx_peer.VERIFICATION,
                                                       (rx_peer.IMPLICIT_LE,)))


@pytest.fixture
def thread_deaths() -> Iterator[list[str]]:
    died: list[str] = []
    before = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        died.append(f"{args.thread.name if args.thread else '?'}: {args.exc_type.__name__}")
        before(args)

    threading.excepthook = hook
    yield died
    threading.excepthook = before


pdvs = st.lists(st.tuples(st.sampled_from([1, 3, 5, 7, 255]),  # 1 and 3 are accepted
                          st.integers(0, 3),  # control header: command/data, last or not
                          st.binary(max_size=64)),
                min_size=1, max_size=4)


def test_random_pdata_on_random_contexts_never_kills_a_thread_or_leaks_a_slot(
        tmp_path: Path, thread_deaths: list[str]) -> None:
    with node(tmp_path, max_associations_per_peer=2, acse_timeout=5, pdu_timeout=2,
              network_timeout=5) as n:

        @WIRE
        @given(items=pdvs, cut=st.one_of(st.none(), st.integers(1, 40)))
        def one(items: list[tuple[int, int, bytes]], cut: int | None) -> None:
            s = rx_peer.associate(n.port, AE_TITLE, contexts=CONTEXTS)
            try:
                pdu = rx_peer.pdata(*(rx_peer.pdv(c, m, d) for c, m, d in items))
                s.sendall(pdu if cut is None else pdu[:cut])
                s.settimeout(20)
                if any(c not in (1, 3) for c, _, _ in items) and cut is None:
                    # A PDV on a context that was not accepted: aborted, closed.
                    assert rx_peer.closed_by_peer(s)
            finally:
                s.close()
            # The connection is gone: so is its association, whatever happened.
            wait_for(lambda: n.scp.counters.active == 0, 20, "the association to be released")

        one()
        # Still serving: a clean association with a C-ECHO-free release.
        s = rx_peer.associate(n.port, AE_TITLE, contexts=CONTEXTS)
        assert rx_peer.release(s) == 0x06
        s.close()
    assert thread_deaths == []
