"""The publisher's read-ahead: the next messages read, decrypted and checked by the
egress guard on a thread of their own, while the MQTT thread publishes and reads
PUBACKs.

In a drain the MQTT thread spent about half its time opening rows and running the
guard, and the broker waited meanwhile; a bare paho client splits its work over two
threads.  Here the MQTT thread only takes checked messages (``take``) and publishes
them (it still drives paho alone, and still blocks what the guard hit, in order).
The read-ahead keeps at most ``depth`` messages ready, in ``seq`` order, and starts
again from a given ``seq`` when the publisher says so (``restart``: a new session
restarts the walk from the oldest un-acknowledged message); a batch it was checking
when that happened is thrown away, never handed out.  Nothing here deletes, acks or
publishes: the outbox's guarantees are the publisher's, unchanged.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable

from agent.errors import EdgeAgentError
from agent.types import OutboxMessage
from agent.uplink import egress
from agent.uplink.outbox import Outbox

log = logging.getLogger(__name__)

# Re-read the outbox at least this often when nothing woke the read-ahead: a message
# whose enqueue wake-up was missed is still found (the publisher's idle wake is 1 s).
IDLE_S = 1.0

Checked = tuple[OutboxMessage, "egress.GuardHit | None"]


class ReadAhead:
    def __init__(self, outbox: Outbox, depth: int, ready: Callable[[], None]) -> None:
        self._outbox = outbox
        self._depth = max(1, depth)
        self._ready_cb = ready  # cheap, never raising: wakes the MQTT thread
        self._cond = threading.Condition()
        self._queue: deque[Checked] = deque()
        self._after = 0  # the last seq read in this epoch
        self._epoch = 0
        self._more = True  # the outbox may hold more than was read
        self._stop = False
        self._last_error = ""
        self._thread: threading.Thread | None = None
        outbox.on_enqueue(self.poke)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="mqtt-readahead", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def poke(self) -> None:
        """Something was enqueued."""
        with self._cond:
            self._more = True
            self._cond.notify_all()

    def restart(self, after: int) -> None:
        """Hand out messages with seq > ``after`` from now on; what was ready is dropped."""
        with self._cond:
            self._epoch += 1
            self._queue.clear()
            self._after = after
            self._more = True
            self._cond.notify_all()

    def take(self, n: int) -> list[Checked]:
        """Up to ``n`` checked messages, oldest first."""
        with self._cond:
            out = [self._queue.popleft() for _ in range(min(n, len(self._queue)))]
            if out:
                self._cond.notify_all()  # room for more
            return out

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stop and (len(self._queue) >= self._depth or not self._more):
                    if not self._cond.wait(IDLE_S):
                        self._more = True
                if self._stop:
                    return
                epoch, after = self._epoch, self._after
                room = self._depth - len(self._queue)
                self._more = False
            try:
                msgs = self._outbox.peek(after, room)
                # The whole batch checked in one pass (agent/uplink/guardscan.py).
                hits = egress.check_many([(m.payload, m.guard, m.created_at) for m in msgs])
            except EdgeAgentError as exc:
                if str(exc) != self._last_error:  # once per cause, not once a second
                    log.error("outbox: cannot read the next messages: %s", exc)
                    self._last_error = str(exc)
                with self._cond:
                    self._cond.wait(IDLE_S)
                    self._more = True
                continue
            except Exception:  # noqa: BLE001 - the read-ahead must not die
                log.exception("outbox read-ahead failed")
                with self._cond:
                    self._cond.wait(IDLE_S)
                    self._more = True
                continue
            self._last_error = ""
            with self._cond:
                if epoch != self._epoch:
                    continue  # restarted meanwhile: read again from the new start
                self._queue.extend(zip(msgs, hits, strict=True))
                if msgs:
                    self._after = msgs[-1].seq
                if len(msgs) == room:
                    self._more = True  # a full batch: there may be more behind it
            if msgs:
                self._ready_cb()
