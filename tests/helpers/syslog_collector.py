"""A real rsyslog as the hospital's ATNA audit repository: imtcp with the gtls
driver (RFC 5425 syslog over TLS), mutual TLS (x509/certvalid: the box must
present a certificate from the collector's CA), on a free loopback port.

Each received message is written to a file as one line: the whole RFC 5424
message (``rawmsg``), JSON-escaped, so a message with a newline stays one line.
rsyslog's own complaints (a refused peer, a TLS error) go to its stderr log.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.helpers.waiting import free_port, wait_for, wait_port

RSYSLOGD = shutil.which("rsyslogd") or "/usr/sbin/rsyslogd"
GTLS = [Path(p) for p in ("/usr/lib/x86_64-linux-gnu/rsyslog/lmnsd_gtls.so",
                          "/usr/lib/aarch64-linux-gnu/rsyslog/lmnsd_gtls.so",
                          "/usr/lib/rsyslog/lmnsd_gtls.so")]


def available() -> bool:
    return Path(RSYSLOGD).exists() and any(p.exists() for p in GTLS)


# RFC 5424: <PRI>VERSION SP TIMESTAMP SP HOSTNAME SP APP-NAME SP PROCID SP MSGID SP SD [SP MSG]
HEADER = re.compile(r"^<(\d{1,3})>(\d) (\S+) (\S+) (\S+) (\S+) (\S+) (-|\[.*?\])(?: (.*))?$",
                    re.S)


@dataclass(frozen=True)
class SyslogMessage:
    pri: int
    version: int
    timestamp: str
    hostname: str
    app_name: str
    procid: str
    msgid: str
    sd: str
    msg: str  # without the UTF-8 BOM

    @property
    def facility(self) -> int:
        return self.pri // 8

    @property
    def severity(self) -> int:
        return self.pri % 8


def parse(raw: str) -> SyslogMessage:
    m = HEADER.match(raw)
    assert m is not None, f"not an RFC 5424 message: {raw[:120]!r}"
    msg = m.group(9) or ""
    return SyslogMessage(int(m.group(1)), int(m.group(2)), m.group(3), m.group(4), m.group(5),
                         m.group(6), m.group(7), m.group(8), msg.removeprefix("\ufeff"))


class Collector:
    def __init__(self, root: Path, *, ca: Path, cert: Path, key: Path,
                 port: int | None = None) -> None:
        self.root = root
        self.port = port or free_port()
        self.out = root / "received.log"
        self.log = root / "rsyslogd.log"
        self.conf = root / "rsyslog.conf"
        self.proc: subprocess.Popen[bytes] | None = None
        work = root / "work"
        work.mkdir(parents=True, exist_ok=True)
        self.conf.write_text(f"""\
global(workDirectory="{work}" maxMessageSize="64k"
       parser.escapeControlCharactersOnReceive="off"
       defaultNetstreamDriverCAFile="{ca}"
       defaultNetstreamDriverCertFile="{cert}"
       defaultNetstreamDriverKeyFile="{key}")
module(load="imtcp" streamDriver.name="gtls" streamDriver.mode="1"
       streamDriver.authMode="x509/certvalid")
template(name="atna" type="list") {{
  property(name="rawmsg" format="json")
  constant(value="\\n")
}}
ruleset(name="atna") {{
  action(type="omfile" file="{self.out}" template="atna")
}}
input(type="imtcp" address="127.0.0.1" port="{self.port}" ruleset="atna")
""")

    def start(self) -> Collector:
        self.proc = subprocess.Popen(
            [RSYSLOGD, "-n", "-f", str(self.conf), "-i", str(self.root / "rsyslogd.pid")],
            stdout=subprocess.DEVNULL, stderr=open(self.log, "ab"))  # noqa: SIM115
        try:
            wait_port(self.port, timeout=20)
        except TimeoutError:
            raise RuntimeError(f"rsyslogd did not start:\n{self.log_text()[-2000:]}") from None
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def raw(self) -> list[str]:
        if not self.out.exists():
            return []
        lines = self.out.read_text(encoding="utf-8").split("\n")
        # The last line may still be being written: only complete lines count.
        return [json.loads(f'"{line}"') for line in lines[:-1] if line]

    def messages(self) -> list[SyslogMessage]:
        return [parse(r) for r in self.raw()]

    def wait_for(self, pred: object, timeout: float, what: str) -> list[SyslogMessage]:
        assert callable(pred)

        def matched() -> list[SyslogMessage] | None:
            msgs = self.messages()
            return msgs if pred(msgs) else None

        try:
            return list(wait_for(matched, timeout, what, step=0.2))
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}; {len(self.messages())} message(s) received; rsyslogd "
                               f"said:\n{self.log_text()[-1500:]}") from None
