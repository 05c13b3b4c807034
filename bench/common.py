"""Small helpers every benchmark needs: loopback ports and config edits."""

from __future__ import annotations

import socket
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with socket.socket() as s:
            s.settimeout(0.3)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


def set_config(conf: Path, section: str, key: str, value: str) -> None:
    """Set one key of an agent.toml (value is TOML source text)."""
    out: list[str] = []
    cur: str | None = None
    done = False
    for line in conf.read_text().splitlines():
        s = line.strip()
        if s.startswith("["):
            if cur == section and not done:
                out.append(f"{key} = {value}")
                done = True
            cur = s.strip("[]")
        if cur == section and s.split("=")[0].strip() == key:
            out.append(f"{key} = {value}")
            done = True
            continue
        out.append(line)
    if not done:
        out += [f"[{section}]", f"{key} = {value}"]
    conf.write_text("\n".join(out) + "\n")
