"""One step of the publisher's MQTT network loop, woken by the broker or by the box.

paho's ``Client.loop(timeout)`` waits on the broker's socket only: a message that
entered the outbox while it waited was noticed when the timeout ran out (the
publisher used 50 ms, so an idle box added up to 50 ms to every result, and a drain
paid the poll whenever the window emptied before the socket spoke).  ``step`` waits
on the socket and on a ``Wakeup`` that the outbox sets on every enqueue (and
``Publisher.stop`` on stop), then does what ``loop`` does with paho's documented
external-loop calls (``loop_read``, ``loop_write``, ``loop_misc``).  Still one
thread drives the client: paho's client is not meant to be driven from several.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode

log = logging.getLogger(__name__)


class Wakeup:
    """A level-triggered flag a select() can wait on (an eventfd).

    ``set`` may be called from any thread, any number of times; ``clear`` resets it.
    """

    def __init__(self) -> None:
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        # set() from another thread must not write into a closed fd whose number the
        # process already handed to some other file.
        self._lock = threading.Lock()

    def set(self) -> None:
        with self._lock:
            if self.fd < 0:
                return  # closed: nobody waits any more
            try:
                os.eventfd_write(self.fd, 1)
            except BlockingIOError:
                pass  # the counter is full: it is set anyway

    def clear(self) -> None:
        try:
            os.eventfd_read(self.fd)
        except OSError:
            pass  # was not set

    def close(self) -> None:
        with self._lock:
            fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)


def step(client: mqtt.Client, wake: Wakeup, timeout: float) -> MQTTErrorCode:
    """Wait up to ``timeout`` s for the broker (data in or room to write) or ``wake``,
    then read, write and keep alive as ``Client.loop`` does; its return codes too."""
    sock = client.socket()
    if sock is None:
        return MQTTErrorCode.MQTT_ERR_NO_CONN
    # TLS may hold decrypted bytes the kernel no longer shows: select would not see them.
    pending = sock.pending() if hasattr(sock, "pending") else 0
    try:
        fd = sock.fileno()
        readable, writable, _ = select.select([fd, wake.fd], [fd] if client.want_write() else [],
                                              [], 0.0 if pending else timeout)
    except (OSError, ValueError, TypeError):
        # The socket was closed under us (a disconnect): what paho's loop reports too.
        return MQTTErrorCode.MQTT_ERR_CONN_LOST
    if wake.fd in readable:
        wake.clear()
    if fd in readable or pending:
        rc = client.loop_read()
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or client.socket() is None:
            return rc
    if fd in writable or client.want_write():
        rc = client.loop_write()
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or client.socket() is None:
            return rc
    return client.loop_misc()


@contextmanager
def corked(client: mqtt.Client) -> Iterator[None]:
    """Hold the TCP segments of the PUBLISHes written inside back until the end.

    paho writes each packet to the socket as it is published (one TLS record, one
    send each).  With TCP_NODELAY set by paho every send went out as its own segment,
    and on a loopback broker each one also ran the broker's receive path inside our
    send: a third of the publisher thread's time in a drain.  Corked, a window of
    messages leaves in a few full segments when the cork comes off (Linux TCP_CORK;
    elsewhere this does nothing).  Nothing is delayed past the block: the cork is
    removed in ``finally``, whatever happened inside.
    """
    sock = client.socket()
    cork = getattr(socket, "TCP_CORK", None)
    if not isinstance(sock, socket.socket) or cork is None:  # an SSLSocket is one
        yield
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, cork, 1)
    except (OSError, ValueError):
        yield  # closed under us: paho reports the lost connection on its next call
        return
    try:
        yield
    finally:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, cork, 0)
        except (OSError, ValueError):
            pass  # closed meanwhile: nothing is left to send on it
