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
* **the hospital's PACS** (``[[results.destinations]]``, only with ``[results]
  enabled``): result objects written into the original study carry the patient
  and study modules by design (agent/results/).  Only to a destination an
  operator configured by AE title, host and port; DICOM TLS with the configured
  CA when the destination sets ``tls.enabled``.  The MQTT result only names the
  destination and its delivery state.

A sender that would carry PHI asks here for its destination instead of reading
the configuration itself, so "where may PHI go" has one answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from agent.config import Config
from agent.errors import ConfigError

PhiKind = Literal["atna", "dicom"]

# Central ops (MQTT) never receives PHI: the guard blocks any payload that has some.
MQTT_MAY_CARRY_PHI = False


@dataclass(frozen=True)
class PhiDestination:
    """A configured in-hospital destination that may receive PHI."""

    kind: PhiKind
    host: str
    port: int
    ca_file: Path  # the only trust anchor for its certificate (when tls)
    server_name: str  # the name its certificate must carry
    why: str
    name: str = ""  # a DICOM destination's label
    ae_title: str = ""  # a DICOM destination's called AE title
    tls: bool = True  # False: a DICOM destination on plain TCP (inside the hospital)

    def describe(self) -> str:
        if self.kind == "dicom":
            tls = "TLS" if self.tls else "plain"
            return f"PACS {self.name} {self.ae_title}@{self.host}:{self.port} ({tls})"
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
    r = cfg.results
    if r.enabled:
        for d in r.destinations:
            out.append(PhiDestination(
                kind="dicom", host=d.host, port=d.port,
                ca_file=d.tls.ca if d.tls.enabled and d.tls.ca else Path(),
                server_name=d.tls.server_name or d.host, name=d.name, ae_title=d.ae_title,
                tls=d.tls.enabled,
                why="result objects (SR, presentation state, key image, SEG) written into "
                    "the original study, C-STORE"))
    return tuple(out)


def destination(cfg: Config, kind: PhiKind) -> PhiDestination:
    """The configured destination of ``kind``; ConfigError when PHI may not go there."""
    for d in phi_destinations(cfg):
        if d.kind == kind:
            return d
    raise ConfigError([f"[{kind}] is not enabled with host, ca_file, cert_file and key_file: "
                       f"no PHI may be sent to a {kind} destination"], path=str(cfg.path))


def may_send_phi(cfg: Config, kind: PhiKind, host: str, port: int, *,
                 ae_title: str | None = None) -> bool:
    """Whether PHI may go to ``host:port`` as ``kind`` (the sender checks before it
    connects); a DICOM destination also by its AE title."""
    return any(d.kind == kind and d.host == host and d.port == port
               and (ae_title is None or d.ae_title == ae_title)
               for d in phi_destinations(cfg))
