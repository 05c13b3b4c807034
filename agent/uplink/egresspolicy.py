"""The egress policy: the one place that decides where PHI may leave the box.

Everything that leaves the box goes to one of these, and only these may carry
protected health information (docs/threat-model.md, docs/hipaa.md):

* **central ops over MQTT**: never PHI.  De-identified results, the
  pseudonymised audit projection and aggregate telemetry only; the egress
  guard (agent/uplink/egress.py) checks every payload before it is sent.
* **the hospital's ATNA audit repository** (``[atna]``): the complete local
  audit records, PHI included by design (who accessed which patient's data is
  what the hospital's security office audits).  Only to the one collector an
  operator configured, only over mutual TLS with its certificate verified
  against the configured CA (not the system trust store) and its host name.

A sender that would carry PHI asks here for its destination instead of reading
the configuration itself, so "where may PHI go" has one answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from agent.config import Config
from agent.errors import ConfigError

PhiKind = Literal["atna"]

# Central ops (MQTT) never receives PHI: the guard blocks any payload that has some.
MQTT_MAY_CARRY_PHI = False


@dataclass(frozen=True)
class PhiDestination:
    """A configured in-hospital destination that may receive PHI."""

    kind: PhiKind
    host: str
    port: int
    ca_file: Path  # the only trust anchor for its certificate
    server_name: str  # the name its certificate must carry
    why: str

    def describe(self) -> str:
        return f"{self.kind} collector {self.host}:{self.port}"


def phi_destinations(cfg: Config) -> tuple[PhiDestination, ...]:
    """Every destination PHI may go to under this configuration (none by default)."""
    out: list[PhiDestination] = []
    a = cfg.atna
    if a.enabled and a.host and a.ca_file is not None and a.cert_file is not None \
            and a.key_file is not None:
        out.append(PhiDestination(
            kind="atna", host=a.host, port=a.port, ca_file=a.ca_file,
            server_name=a.server_name or a.host,
            why="IHE ATNA Record Audit Event (ITI-20): complete audit records for the "
                "hospital's audit repository, mutual TLS"))
    return tuple(out)


def destination(cfg: Config, kind: PhiKind) -> PhiDestination:
    """The configured destination of ``kind``; ConfigError when PHI may not go there."""
    for d in phi_destinations(cfg):
        if d.kind == kind:
            return d
    raise ConfigError([f"[{kind}] is not enabled with host, ca_file, cert_file and key_file: "
                       f"no PHI may be sent to a {kind} destination"], path=str(cfg.path))


def may_send_phi(cfg: Config, kind: PhiKind, host: str, port: int) -> bool:
    """Whether PHI may go to ``host:port`` as ``kind`` (the sender checks before it connects)."""
    return any(d.kind == kind and d.host == host and d.port == port
               for d in phi_destinations(cfg))
