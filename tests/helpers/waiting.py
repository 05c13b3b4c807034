"""Ports and waiting: one free_port, one wait_for, both used by every test folder.

Waiting is on the monotonic clock: a test that steps the wall clock (or an NTP
step on the runner) must not stretch or cut a timeout.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any


def free_port() -> int:
    """A TCP port nothing listens on right now (on 127.0.0.1)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(pred: Callable[[], Any], timeout: float, what: str, step: float = 0.1) -> Any:
    """The first truthy value of ``pred()``, polled every ``step`` seconds; TimeoutError
    naming ``what`` after ``timeout`` seconds.  A deadline, not an assertion on time:
    a slow machine only makes it return later."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(step)


def wait_port(port: int, timeout: float = 15.0, host: str = "127.0.0.1") -> None:
    """Until something accepts TCP connections on host:port."""

    def listening() -> bool:
        with socket.socket() as s:
            s.settimeout(0.3)
            return s.connect_ex((host, port)) == 0

    try:
        wait_for(listening, timeout, f"a listener on {host}:{port}", step=0.05)
    except TimeoutError:
        raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s") from None
