"""agent.toml: load, validate (every problem at once), and expose frozen settings.

Secrets are never inline: the config names files (0600) or systemd credentials,
and nothing here ever prints key material.  Relative paths are resolved against
the directory of the config file, so a provisioned box folder is relocatable.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, cast

from agent.deploy import settings as deploy_settings
from agent.deploy.settings import DeploySettings
from agent.errors import ConfigError

DEFAULT_CONFIG = Path("/etc/edge-agent/agent.toml")
# MQTT over TLS (IANA); [mqtt] port of a box and of ops.toml (fleet/settings.py).
MQTT_TLS_PORT = 8883

# Identities end up in MQTT topics and client ids: a safe alphabet keeps one box
# from reaching into another's topics ("+", "#", "/" are MQTT syntax).
SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# Site and device names are topic segments and, joined by ".", the device certificate's
# CN: the broker's ACL user and (bound to it) the MQTT client id. A "." inside either would
# make that name ambiguous: site "good" + device "dev.ok" and site "good.dev" + device "ok"
# are both "good.dev.ok". So the names themselves never contain one.
BOX_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
BOX_NAME_RULE = "1-64 characters of A-Z a-z 0-9 _ -, starting with a letter or digit"
AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5: no backslash, no control chars

DEID_OPTIONS: tuple[str, ...] = (
    "retain_safe_private",
    "retain_uids",
    "retain_device_identity",
    "retain_institution_identity",
    "retain_patient_characteristics",
    "retain_longitudinal_full_dates",
    "retain_longitudinal_modified_dates",
    "clean_descriptors",
    "clean_structured_content",
    "clean_graphics",
)


@dataclass(frozen=True)
class PeerRule:
    """One allowlist entry binding a calling AE title to addresses (and a TLS subject)."""

    ae_title: str
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    certificate_subject: str | None = None

    def allows(self, ae_title: str, address: str, subject: str | None) -> bool:
        if ae_title != self.ae_title and self.ae_title != "*":
            return False
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        if not any(ip in net for net in self.networks):
            return False
        if self.certificate_subject is not None and subject != self.certificate_subject:
            return False
        return True


@dataclass(frozen=True)
class KnownAE:
    """One ``[[dicom.known_aes]]`` entry: where an AE title is reached when the node
    calls it (a Storage Commitment report on a new association).  Addresses come
    from configuration only, never from the association that asked."""

    ae_title: str
    host: str
    port: int


@dataclass(frozen=True)
class CompletionRule:
    """One ``[[study.completion]]`` entry: how studies from matching senders complete.

    Matched on the calling AE title and the modality of the study's first instance
    (from its SOP class); the first matching rule wins, ``[study]`` is the fallback."""

    calling_ae: str = "*"
    modality: str = "*"
    quiet_seconds: float | None = None  # None: [study] quiet_seconds
    expected_instances: int = 0  # 0: no count trigger
    # MPPS COMPLETED / DISCONTINUED and Storage Commitment requests complete a study
    # as soon as the instances they list are in; false: only the timers complete it.
    use_mpps: bool = True
    use_commitment: bool = True
    # Series-level trigger: the study is complete once it holds this many series
    # (distinct Series Instance UIDs) and nothing arrived for series_quiet_seconds
    # (the pause after the last image of the last series, much shorter than the
    # pause between series the study quiet period must outlast); 0: off.
    expected_series: int = 0
    series_quiet_seconds: float = 5.0


@dataclass(frozen=True)
class DicomTls:
    enabled: bool = False
    port: int = 2762
    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None
    require_client_cert: bool = True
    plain_listener: bool = True  # keep the plain TCP listener next to TLS


@dataclass(frozen=True)
class DicomSettings:
    host: str = "0.0.0.0"
    port: int = 11112
    ae_title: str = "EDGE_AGENT"
    peers: tuple[PeerRule, ...] = ()
    max_pdu: int = 1048576
    max_associations: int = 16
    max_associations_per_peer: int = 4
    associations_per_minute_per_peer: int = 120
    acse_timeout: float = 30.0
    dimse_timeout: float = 60.0
    network_timeout: float = 60.0
    # Once the first byte of a PDU arrived, the rest must within this many seconds
    # (the A-ASSOCIATE-RQ: within acse_timeout, the ARTIM timer); also bounds a send.
    pdu_timeout: float = 30.0
    max_instance_bytes: int = 2 * 1024**3
    # 0: one receive process per CPU core (auto_workers); resolved when the config loads.
    workers: int = 0
    tls: DicomTls = DicomTls()
    known_aes: tuple[KnownAE, ...] = ()
    # How long a Storage Commitment report on a new association may take (connect,
    # negotiate, answer) before it is given up and logged.
    commitment_report_timeout: float = 30.0
    # A report that could not be delivered is kept (sealed, in the inbox index) and
    # tried again after this long, doubling per attempt (jittered, at most 10 min),
    # until it is this old: then it is given up and audited.
    commitment_report_retry_seconds: float = 10.0
    commitment_report_max_age_seconds: float = 3600.0


@dataclass(frozen=True)
class StudySettings:
    quiet_seconds: float = 30.0
    max_instances: int = 5000
    max_bytes: int = 8 * 1024**3
    max_age_seconds: float = 3600.0
    # Processing holds one decrypted copy of an instance in memory: larger ones are refused.
    max_process_instance_bytes: int = 2 * 1024**3
    completion: tuple[CompletionRule, ...] = ()


@dataclass(frozen=True)
class InboxSettings:
    max_bytes: int = 50 * 1024**3
    min_free_bytes: int = 2 * 1024**3


@dataclass(frozen=True)
class PixelCleanConfig:
    manufacturer: str
    model: str
    rows: int
    columns: int
    rectangles: tuple[tuple[int, int, int, int], ...]


@dataclass(frozen=True)
class DeidConfig:
    mode: Literal["strip", "encrypt"] = "strip"
    # keyed: HMAC of the original under the box key; vault: random tokens kept in an
    # encrypted local map (docs/deid.md, "Pseudonyms: keyed or vault").
    pseudonyms: Literal["keyed", "vault"] = "keyed"
    options: frozenset[str] = frozenset()
    recipients: tuple[Path, ...] = ()
    pixel_clean: tuple[PixelCleanConfig, ...] = ()


@dataclass(frozen=True)
class KeyFiles:
    pseudonym: Path
    kek: Path
    audit_signing: Path


@dataclass(frozen=True)
class ModelSettings:
    dir: Path
    publisher_keys: tuple[Path, ...] = ()
    threads: int = 1
    timeout_seconds: float = 60.0
    drift_min_studies: int = 10


@dataclass(frozen=True)
class InferSettings:
    # onnxruntime execution providers in preference order; those this build lacks are
    # dropped with a warning and the CPU one is always kept last (agent/infer/providers.py)
    providers: tuple[str, ...] = ("CPUExecutionProvider",)


_PROVIDER = re.compile(r"^[A-Za-z][A-Za-z0-9]*ExecutionProvider$")


def _providers(v: Any) -> str | None:
    if not v or not all(isinstance(p, str) and _PROVIDER.match(p) for p in v):
        return ('must be a non-empty list of onnxruntime execution provider names, e.g. '
                '["CUDAExecutionProvider", "CPUExecutionProvider"]')
    return None


@dataclass(frozen=True)
class MqttSettings:
    host: str
    port: int
    ca: Path
    cert: Path
    key: Path = field(repr=False)
    topic_prefix: str = "edge"
    client_id: str | None = None
    keepalive: int = 30
    session_expiry_seconds: int = 7 * 24 * 3600
    inflight: int = 32
    crl: Path | None = None
    tls_server_name: str | None = None


@dataclass(frozen=True)
class TelemetrySettings:
    interval_seconds: float = 60.0
    prometheus_port: int = 0  # 0 = off; binds 127.0.0.1 only


@dataclass(frozen=True)
class AuditSettings:
    checkpoint_every: int = 100
    checkpoint_seconds: float = 300.0
    retention_days: int = 2190  # HIPAA documentation retention: six years
    max_bytes: int = 5 * 1024**3
    # The byte budget never shreds a day younger than this: volume an attacker can
    # generate must not wash real history out (docs/audit.md, "Retention").
    min_retention_days: int = 90
    # Repeated refusals of one (event, peer, reason) inside this window become one
    # counted summary record instead of one record each.
    summary_seconds: float = 60.0
    # Events held in memory while the store cannot write (intake is held meanwhile).
    max_queue: int = 10_000


@dataclass(frozen=True)
class OutboxSettings:
    max_bytes: int = 2 * 1024**3


@dataclass(frozen=True)
class ControlSettings:
    socket: Path
    admin_group: str = "edge-agent-admin"
    auditor_group: str = "edge-agent-audit"
    operator_group: str = "edge-agent"
    # Roles of their own (separation of duties): the privacy officer reviews quarantined
    # instances; the local reviewer gives verdicts on flagged results.
    privacy_group: str = "edge-agent-privacy"
    reviewer_group: str = "edge-agent-review"


@dataclass(frozen=True)
class QuarantineSettings:
    # A quarantined instance nobody released is crypto-shredded this many days after
    # it was quarantined (its data key deleted, then its file).
    retention_days: int = 30


@dataclass(frozen=True)
class ReviewSettings:
    """Human review of flagged results and the performance measured from it
    (agent/review/, docs/configuration.md [review])."""

    # A flagged result without a verdict after this long raises an escalation alert.
    escalate_after_seconds: float = 86400.0
    # k: a subgroup with fewer verdicts is merged into "other", or suppressed.
    min_verdicts: int = 20
    # Rolling windows (days of verdicts) the performance is computed over.
    windows_days: tuple[int, ...] = (30, 90)
    # A subgroup whose interval lies further than this from the rest's is an alert.
    gap: float = 0.1
    # Results and verdicts older than this are deleted (at least the longest window).
    retention_days: int = 365


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNIT_SECONDS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def duration_seconds(value: Any) -> float | None:
    """Seconds from a number or a string with a unit: 90, "90s", "30m", "4h", "2d"."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    m = _DURATION.match(value) if isinstance(value, str) else None
    return float(m.group(1)) * _UNIT_SECONDS[m.group(2)] if m else None


@dataclass(frozen=True)
class WatchdogSettings:
    # A stage (assembler, publisher, receive, telemetry, control) that shows neither
    # progress nor an idle heartbeat for this long is stuck: systemd's watchdog is
    # no longer fed and systemd restarts the daemon.
    stage_deadline_seconds: float = 120.0


ATNA_FORMATS: tuple[str, ...] = ("dicom-xml", "fhir-json")
# RFC 5424 facility names (the number is what goes into PRI); IHE ITI-20 asks for 10.
SYSLOG_FACILITIES: dict[str, int] = {
    "kern": 0, "user": 1, "mail": 2, "daemon": 3, "auth": 4, "syslog": 5, "lpr": 6,
    "news": 7, "uucp": 8, "cron": 9, "authpriv": 10, "ftp": 11, "ntp": 12, "audit": 13,
    "alert": 14, "clock": 15, **{f"local{i}": 16 + i for i in range(8)},
}
# RFC 5424 APP-NAME: 1-48 printable US-ASCII characters, no space.
APP_NAME = re.compile(r"^[\x21-\x7e]{1,48}$")


@dataclass(frozen=True)
class AtnaSettings:
    """IHE ATNA Record Audit Event (ITI-20): the full local audit records, with PHI,
    to the hospital's audit repository over RFC 5425 syslog with mutual TLS."""

    enabled: bool = False
    host: str = ""
    port: int = 6514
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = field(default=None, repr=False)
    format: Literal["dicom-xml", "fhir-json"] = "dicom-xml"
    app_name: str = "edge-agent"
    facility: int = 10  # security/authorization (authpriv), as ITI-20 asks
    # The name the collector's certificate must carry when it differs from host
    # (a box that dials an address while the certificate names a host).
    server_name: str | None = None
    connect_timeout_seconds: float = 10.0


# Result object kinds a destination may take (agent/results/common.py names the key
# image "sc", its SOP class: Secondary Capture).
RESULT_KINDS: dict[str, str] = {"sr": "sr", "gsps": "gsps", "keyimage": "sc", "seg": "seg"}


@dataclass(frozen=True)
class DestinationTls:
    """DICOM TLS (PS3.15 B.1) towards one destination; the box's client certificate."""

    enabled: bool = False
    ca: Path | None = None  # the only trust anchor for the destination's certificate
    cert: Path | None = None
    key: Path | None = field(default=None, repr=False)
    server_name: str | None = None  # the name its certificate carries, when not the host


@dataclass(frozen=True)
class ResultDestination:
    """One ``[[results.destinations]]`` entry: a PACS (or router) that takes results."""

    name: str  # our label: telemetry, status, the MQTT delivered_to summary (never PHI)
    ae_title: str
    host: str
    port: int
    kinds: frozenset[str] = frozenset(RESULT_KINDS.values())  # internal kinds: sr gsps sc seg
    storage_commitment: bool = False
    release_after: Literal["commitment", "success"] = "success"
    tls: DestinationTls = DestinationTls()

    def describe(self) -> str:
        return f"{self.name} ({self.ae_title}@{self.host}:{self.port})"


@dataclass(frozen=True)
class ResultsSettings:
    # Writing results back into the original study (agent/results/).  Off by default:
    # with it off nothing is captured, stored or sent.
    enabled: bool = False
    # The encrypted link from a study's pseudonym to its originals is shredded once
    # released, and at the latest this many days after it was written.
    link_retention_days: int = 14
    destinations: tuple[ResultDestination, ...] = ()
    # Delivery: retries back off from retry_min to retry_max seconds (jittered); an
    # object not confirmed this many hours after it was queued is dead-lettered.
    retry_min_seconds: float = 5.0
    retry_max_seconds: float = 300.0
    dead_letter_hours: float = 72.0
    # A commitment request unanswered for this long is asked again.
    commitment_timeout_seconds: float = 600.0
    # How long the association stays open after N-ACTION for a report on it.
    commitment_wait_seconds: float = 5.0
    connect_timeout_seconds: float = 10.0


@dataclass(frozen=True)
class Config:
    path: Path
    site: str
    device: str
    environment: Literal["production", "development"]
    state_dir: Path
    log_level: str
    dicom: DicomSettings
    study: StudySettings
    inbox: InboxSettings
    deid: DeidConfig
    keys: KeyFiles
    models: ModelSettings
    mqtt: MqttSettings
    telemetry: TelemetrySettings
    audit: AuditSettings
    outbox: OutboxSettings
    control: ControlSettings
    watchdog: WatchdogSettings = WatchdogSettings()
    results: ResultsSettings = ResultsSettings()
    atna: AtnaSettings = AtnaSettings()
    quarantine: QuarantineSettings = QuarantineSettings()
    review: ReviewSettings = ReviewSettings()
    deploy: DeploySettings = DeploySettings()
    infer: InferSettings = InferSettings()

    @property
    def topic_base(self) -> str:
        return f"{self.mqtt.topic_prefix}/{self.site}/{self.device}"


T = TypeVar("T")
_MISSING = object()


def field_default(cls: type, name: str) -> Any:
    """The default of a settings field: the dataclasses above are the one place a
    default is written down; the parser and docs/configuration.md follow them."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            if f.default is dataclasses.MISSING:
                raise KeyError(f"{cls.__name__}.{name} has no default")
            return f.default
    raise KeyError(f"{cls.__name__} has no field {name}")


class _Reader:
    """Pulls typed values out of nested TOML tables, collecting every problem."""

    def __init__(self, data: dict[str, Any], base: Path) -> None:
        self.data = data
        self.base = base
        self.problems: list[str] = []
        self.seen: set[str] = set()

    def _lookup(self, key: str) -> Any:
        self.seen.add(key)
        node: Any = self.data
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return _MISSING
            node = node[part]
        return node

    def get(
        self,
        key: str,
        kind: type[T] | tuple[type, ...],
        default: Any = _MISSING,
        *,
        check: Callable[[Any], str | None] | None = None,
        allowed: str = "",
    ) -> T:
        value = self._lookup(key)
        if value is _MISSING:
            if default is _MISSING:
                self.problems.append(f"[{key}] is required ({allowed or _kind_name(kind)})")
                return cast(T, None)
            return cast(T, default)
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(value, bool) and bool not in kinds:
            ok = False
        else:
            ok = isinstance(value, kinds)
        if not ok:
            self.problems.append(
                f"[{key}] is {type(value).__name__} {value!r}; expected {allowed or _kind_name(kind)}"
            )
            return cast(T, default if default is not _MISSING else None)
        if check is not None:
            msg = check(value)
            if msg:
                self.problems.append(f"[{key}] = {value!r}: {msg}")
                return cast(T, default if default is not _MISSING else None)
        return cast(T, value)

    def field(self, cls: type, key: str, kind: type[T] | tuple[type, ...], *,
              check: Callable[[Any], str | None] | None = None, allowed: str = "") -> T:
        """``key`` ("section.name"), defaulting to the ``name`` field default of ``cls``."""
        return self.get(key, kind, field_default(cls, key.rsplit(".", 1)[1]), check=check,
                        allowed=allowed)

    def path(self, key: str, default: str | None | object = _MISSING) -> Path | None:
        raw = self.get(key, str, default)
        if raw is None:
            return None
        p = Path(os.path.expandvars(str(raw)))
        return p if p.is_absolute() else (self.base / p)

    def require_path(self, key: str, default: str | object = _MISSING) -> Path:
        p = self.path(key, default)
        return p if p is not None else Path("/nonexistent")

    def choice(self, key: str, choices: tuple[str, ...], default: str) -> str:
        return self.get(
            key,
            str,
            default,
            check=lambda v: None if v in choices else f"must be one of {', '.join(choices)}",
        )


MAX_AUTO_WORKERS = 8


def auto_workers(configured: int) -> int:
    """``[dicom] workers``: 0 means one receive process per CPU core (at most 8);
    on a single core the daemon receives in its own process."""
    if configured:
        return configured
    return max(1, min(MAX_AUTO_WORKERS, len(os.sched_getaffinity(0))))


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
             list: "a list", dict: "a table"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _positive(v: Any) -> str | None:
    return None if v > 0 else "must be greater than 0"


def _port(v: Any) -> str | None:
    return None if 0 < v < 65536 else "must be a TCP port between 1 and 65535"


def _port_or_zero(v: Any) -> str | None:
    return None if 0 <= v < 65536 else "must be 0 (off) or a TCP port between 1 and 65535"


def _safe_id(v: Any) -> str | None:
    return None if SAFE_ID.match(v) else (
        "must be 1-64 characters of A-Z a-z 0-9 _ . - (it becomes an MQTT topic segment)"
    )


def box_name_problem(value: str, cn: str) -> tuple[str, str] | None:
    """Why ``value`` cannot be a site or device name, and a name to use instead; None
    when it can be one.

    ``cn`` is the certificate name ``<site>.<device>`` it would take part in (for the
    explanation only)."""
    if BOX_NAME.match(value):
        return None
    if "." in value:
        why = (f"'.' is not allowed: the certificate name is <site>.<device> ({cn!r}), and a "
               "'.' inside a name makes it ambiguous (site 'a' + device 'b.c' and site 'a.b' + "
               "device 'c' would both be 'a.b.c')")
    elif any(c in value for c in "/+#"):
        why = "'/', '+' and '#' are MQTT topic syntax"
    elif any(c.isspace() or not c.isprintable() for c in value):
        why = "spaces and control characters are not allowed"
    else:
        why = f"it must be {BOX_NAME_RULE}"
    return why, re.sub(r"[^A-Za-z0-9_-]+", "-", value).strip("-_")[:64] or "box-1"


def _ae(v: Any) -> str | None:
    return None if AE_TITLE.match(v) and v.strip() else (
        "must be 1-16 printable ASCII characters without backslash"
    )


_KNOWN_TOP = {
    "box", "logging", "dicom", "study", "inbox", "deid", "keys", "models", "mqtt",
    "telemetry", "audit", "outbox", "control", "watchdog", "results", "atna",
    "quarantine", "review", "deploy", "infer",
}


def _peers(r: _Reader) -> tuple[PeerRule, ...]:
    raw = r._lookup("dicom.peers")
    if raw is _MISSING:
        return ()
    if not isinstance(raw, list):
        r.problems.append("[dicom.peers] must be an array of tables ([[dicom.peers]])")
        return ()
    rules: list[PeerRule] = []
    for i, entry in enumerate(raw):
        where = f"dicom.peers[{i}]"
        if not isinstance(entry, dict):
            r.problems.append(f"[{where}] must be a table with ae_title and addresses")
            continue
        ae = entry.get("ae_title")
        if not isinstance(ae, str) or (ae != "*" and _ae(ae)):
            r.problems.append(f"[{where}.ae_title] = {ae!r}: must be an AE title (1-16 chars) or '*'")
            continue
        addrs = entry.get("addresses", ["127.0.0.1/32"])
        if isinstance(addrs, str):
            addrs = [addrs]
        nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for a in addrs if isinstance(addrs, list) else []:
            try:
                nets.append(ipaddress.ip_network(str(a), strict=False))
            except ValueError:
                r.problems.append(f"[{where}.addresses] {a!r} is not an IP address or CIDR network")
        if not nets:
            r.problems.append(f"[{where}.addresses] must list at least one address or CIDR")
            continue
        subject = entry.get("certificate_subject")
        if subject is not None and not isinstance(subject, str):
            r.problems.append(f"[{where}.certificate_subject] must be a string like 'CN=ct1,O=Hospital'")
            subject = None
        unknown = set(entry) - {"ae_title", "addresses", "certificate_subject"}
        if unknown:
            r.problems.append(f"[{where}] unknown key(s) {sorted(unknown)}; allowed: ae_title, addresses, certificate_subject")
        rules.append(PeerRule(ae, tuple(nets), subject))
    return tuple(rules)


def _known_aes(r: _Reader) -> tuple[KnownAE, ...]:
    raw = r._lookup("dicom.known_aes")
    if raw is _MISSING:
        return ()
    if not isinstance(raw, list):
        r.problems.append("[dicom.known_aes] must be an array of tables ([[dicom.known_aes]]) "
                          "with ae_title, host and port")
        return ()
    out: list[KnownAE] = []
    for i, entry in enumerate(raw):
        where = f"dicom.known_aes[{i}]"
        if not isinstance(entry, dict):
            r.problems.append(f"[{where}] must be a table with ae_title, host and port")
            continue
        ae, host, port = entry.get("ae_title"), entry.get("host"), entry.get("port")
        bad = []
        if not isinstance(ae, str) or _ae(ae):
            bad.append(f"[{where}.ae_title] = {ae!r}: must be an AE title (1-16 characters)")
        if not isinstance(host, str) or not host.strip():
            bad.append(f"[{where}.host] = {host!r}: must be a host name or IP address")
        if isinstance(port, bool) or not isinstance(port, int) or _port(port):
            bad.append(f"[{where}.port] = {port!r}: must be a TCP port between 1 and 65535")
        unknown = set(entry) - {"ae_title", "host", "port"}
        if unknown:
            bad.append(f"[{where}] unknown key(s) {sorted(unknown)}; allowed: ae_title, host, port")
        r.problems.extend(bad)
        if not bad:
            assert isinstance(ae, str) and isinstance(host, str) and isinstance(port, int)
            out.append(KnownAE(ae, host, port))
    titles = [k.ae_title for k in out]
    for dup in sorted({t for t in titles if titles.count(t) > 1}):
        r.problems.append(f"[dicom.known_aes] lists AE title {dup!r} more than once; keep one")
    return tuple(out)


_RULE_KEYS = {"calling_ae", "modality", "quiet_seconds", "expected_instances", "use_mpps",
              "use_commitment", "expected_series", "series_quiet_seconds"}


def _completion_rules(r: _Reader) -> tuple[CompletionRule, ...]:
    """``[[study.completion]]``: every problem of every entry is reported."""
    raw = r._lookup("study.completion")
    if raw is _MISSING:
        return ()
    if not isinstance(raw, list):
        r.problems.append("[study.completion] must be an array of tables ([[study.completion]])")
        return ()
    d = CompletionRule()  # the defaults, defined once
    out: list[CompletionRule] = []
    for i, entry in enumerate(raw):
        where = f"study.completion[{i}]"
        if not isinstance(entry, dict):
            r.problems.append(f"[{where}] must be a table, e.g. calling_ae = \"CT1\", "
                              "expected_instances = 3")
            continue
        bad: list[str] = []
        unknown = set(entry) - _RULE_KEYS
        if unknown:
            bad.append(f"[{where}] unknown key(s) {sorted(unknown)}; allowed: "
                       f"{', '.join(sorted(_RULE_KEYS))}")
        ae = entry.get("calling_ae", d.calling_ae)
        if not isinstance(ae, str) or (ae != "*" and _ae(ae)):
            bad.append(f"[{where}.calling_ae] = {ae!r}: must be an AE title or \"*\"")
        modality = entry.get("modality", d.modality)
        if not isinstance(modality, str) or not re.fullmatch(r"\*|[A-Z]{2,3}", modality):
            bad.append(f"[{where}.modality] = {modality!r}: must be a DICOM modality code "
                       "such as \"CT\" or \"MR\", or \"*\"")
        quiet = entry.get("quiet_seconds", d.quiet_seconds)
        if quiet is not None and (isinstance(quiet, bool) or not isinstance(quiet, int | float)
                                  or quiet <= 0):
            bad.append(f"[{where}.quiet_seconds] = {quiet!r}: must be a number of seconds > 0")
        count = entry.get("expected_instances", d.expected_instances)
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            bad.append(f"[{where}.expected_instances] = {count!r}: must be 0 (off) or the "
                       "number of instances a study from this sender has")
        n_series = entry.get("expected_series", d.expected_series)
        if isinstance(n_series, bool) or not isinstance(n_series, int) or n_series < 0:
            bad.append(f"[{where}.expected_series] = {n_series!r}: must be 0 (off) or the "
                       "number of series a study from this sender has (e.g. 2: a localizer "
                       "and an axial series)")
        series_quiet = entry.get("series_quiet_seconds", d.series_quiet_seconds)
        if (isinstance(series_quiet, bool) or not isinstance(series_quiet, int | float)
                or series_quiet <= 0):
            bad.append(f"[{where}.series_quiet_seconds] = {series_quiet!r}: must be a number "
                       "of seconds > 0 (how long the last series must be quiet)")
        flags = {k: entry.get(k, getattr(d, k)) for k in ("use_mpps", "use_commitment")}
        bad += [f"[{where}.{k}] = {v!r}: must be true or false" for k, v in flags.items()
                if not isinstance(v, bool)]
        r.problems.extend(bad)
        if not bad:
            out.append(CompletionRule(str(ae), str(modality),
                                      None if quiet is None else float(quiet), int(count),
                                      bool(flags["use_mpps"]), bool(flags["use_commitment"]),
                                      int(n_series), float(series_quiet)))
    return tuple(out)


def _pixel_clean(r: _Reader) -> tuple[PixelCleanConfig, ...]:
    raw = r._lookup("deid.pixel_clean")
    if raw is _MISSING:
        return ()
    out: list[PixelCleanConfig] = []
    if not isinstance(raw, list):
        r.problems.append("[deid.pixel_clean] must be an array of tables ([[deid.pixel_clean]])")
        return ()
    for i, e in enumerate(raw):
        where = f"deid.pixel_clean[{i}]"
        try:
            rects = tuple(tuple(int(x) for x in rect) for rect in e["rectangles"])
            if any(len(rect) != 4 for rect in rects):
                raise ValueError
            out.append(PixelCleanConfig(
                str(e["manufacturer"]), str(e["model"]), int(e["rows"]), int(e["columns"]),
                cast(tuple[tuple[int, int, int, int], ...], rects),
            ))
        except (KeyError, TypeError, ValueError):
            r.problems.append(
                f"[{where}] needs manufacturer, model, rows, columns and rectangles = "
                "[[x, y, width, height], ...]"
            )
    return tuple(out)


def parse(data: dict[str, Any], path: Path) -> Config:
    """Validate a parsed TOML document; raise ConfigError listing every problem."""
    base = path.parent.resolve()
    r = _Reader(data, base)
    unknown_top = set(data) - _KNOWN_TOP
    for k in sorted(unknown_top):
        r.problems.append(f"[{k}] is not a known section; allowed: {', '.join(sorted(_KNOWN_TOP))}")

    site = r.get("box.site", str, allowed="a site id like 'st-marys'")
    device = r.get("box.device", str, allowed="a device id like 'ct-edge-01'")
    for key, name in (("box.site", site), ("box.device", device)):
        wrong = box_name_problem(name, f"{site}.{device}") if name is not None else None
        if wrong:
            r.problems.append(f"[{key}] = {name!r}: {wrong[0]}; fix: rename it, e.g. "
                              f"{wrong[1]!r} ({BOX_NAME_RULE}); a renamed box needs a "
                              "certificate for its new <site>.<device> name")
    env = r.choice("box.environment", ("production", "development"), "production")
    state_dir = r.require_path("box.state_dir", "/var/lib/edge-agent")
    log_level = r.choice("logging.level", ("DEBUG", "INFO", "WARNING", "ERROR"), "INFO")

    tls = DicomTls(
        enabled=r.get("dicom.tls.enabled", bool, False),
        port=r.get("dicom.tls.port", int, 2762, check=_port),
        cert=r.path("dicom.tls.cert", None),
        key=r.path("dicom.tls.key", None),
        ca=r.path("dicom.tls.ca", None),
        require_client_cert=r.get("dicom.tls.require_client_cert", bool, True),
        plain_listener=r.get("dicom.tls.plain_listener", bool, True),
    )
    if tls.enabled and not (tls.cert and tls.key and tls.ca):
        r.problems.append("[dicom.tls] enabled = true needs cert, key and ca paths")
    d = DicomSettings()  # the defaults, defined once
    dicom = DicomSettings(
        host=r.get("dicom.host", str, d.host),
        port=r.get("dicom.port", int, d.port, check=_port),
        ae_title=r.get("dicom.ae_title", str, d.ae_title, check=_ae),
        peers=_peers(r),
        max_pdu=r.get("dicom.max_pdu", int, d.max_pdu,
                      check=lambda v: None if 4096 <= v <= 16 * 1024**2 else "must be 4096..16777216"),
        max_associations=r.get("dicom.max_associations", int, d.max_associations,
                               check=_positive),
        max_associations_per_peer=r.get("dicom.max_associations_per_peer", int,
                                        d.max_associations_per_peer, check=_positive),
        associations_per_minute_per_peer=r.get(
            "dicom.associations_per_minute_per_peer", int, d.associations_per_minute_per_peer,
            check=_positive),
        acse_timeout=r.get("dicom.acse_timeout", float, d.acse_timeout, check=_positive),
        dimse_timeout=r.get("dicom.dimse_timeout", float, d.dimse_timeout, check=_positive),
        network_timeout=r.get("dicom.network_timeout", float, d.network_timeout,
                              check=_positive),
        pdu_timeout=r.get("dicom.pdu_timeout", float, d.pdu_timeout, check=_positive),
        max_instance_bytes=r.get("dicom.max_instance_bytes", int, d.max_instance_bytes,
                                 check=_positive),
        workers=auto_workers(r.get(
            "dicom.workers", int, d.workers,
            check=lambda v: None if 0 <= v <= 32 else "must be between 0 (auto) and 32")),
        tls=tls,
        known_aes=_known_aes(r),
        commitment_report_timeout=r.field(DicomSettings, "dicom.commitment_report_timeout",
                                          float, check=_positive),
        commitment_report_retry_seconds=r.field(
            DicomSettings, "dicom.commitment_report_retry_seconds", float, check=_positive),
        commitment_report_max_age_seconds=r.field(
            DicomSettings, "dicom.commitment_report_max_age_seconds", float, check=_positive),
    )
    study = StudySettings(
        quiet_seconds=r.field(StudySettings, "study.quiet_seconds", float, check=_positive),
        max_instances=r.field(StudySettings, "study.max_instances", int, check=_positive),
        max_bytes=r.field(StudySettings, "study.max_bytes", int, check=_positive),
        max_age_seconds=r.field(StudySettings, "study.max_age_seconds", float, check=_positive),
        max_process_instance_bytes=r.field(StudySettings, "study.max_process_instance_bytes", int,
                                         check=_positive),
        completion=_completion_rules(r),
    )
    inbox = InboxSettings(
        max_bytes=r.field(InboxSettings, "inbox.max_bytes", int, check=_positive),
        min_free_bytes=r.field(InboxSettings, "inbox.min_free_bytes", int,
                             check=lambda v: None if v >= 0 else "must be >= 0"),
    )
    opts = r.get("deid.options", list, [])
    bad = [o for o in opts if o not in DEID_OPTIONS]
    if bad:
        r.problems.append(f"[deid.options] unknown option(s) {bad}; allowed: {', '.join(DEID_OPTIONS)}")
    mode = r.choice("deid.mode", ("strip", "encrypt"), field_default(DeidConfig, "mode"))
    recips = r.get("deid.recipients", list, [])
    recipients = tuple((base / p) if not Path(p).is_absolute() else Path(p) for p in recips if isinstance(p, str))
    if mode == "encrypt" and not recipients:
        r.problems.append("[deid.recipients] mode = 'encrypt' needs at least one recipient certificate path")
    deid = DeidConfig(
        mode=cast(Literal["strip", "encrypt"], mode),
        pseudonyms=cast(Literal["keyed", "vault"],
                        r.choice("deid.pseudonyms", ("keyed", "vault"), "keyed")),
        options=frozenset(o for o in opts if o in DEID_OPTIONS),
        recipients=recipients,
        pixel_clean=_pixel_clean(r),
    )
    keys = KeyFiles(
        pseudonym=r.require_path("keys.pseudonym"),
        kek=r.require_path("keys.kek"),
        audit_signing=r.require_path("keys.audit_signing"),
    )
    models = ModelSettings(
        dir=r.require_path("models.dir", str(state_dir / "models")),
        publisher_keys=tuple(
            (base / p) if not Path(p).is_absolute() else Path(p)
            for p in r.get("models.publisher_keys", list, []) if isinstance(p, str)
        ),
        threads=r.field(ModelSettings, "models.threads", int, check=_positive),
        timeout_seconds=r.field(ModelSettings, "models.timeout_seconds", float, check=_positive),
        drift_min_studies=r.field(ModelSettings, "models.drift_min_studies", int, check=_positive),
    )
    infer = InferSettings(providers=tuple(
        r.get("infer.providers", list, ["CPUExecutionProvider"], check=_providers)))
    mqtt = MqttSettings(
        host=r.get("mqtt.host", str, allowed="the broker host name in its certificate"),
        port=r.get("mqtt.port", int, MQTT_TLS_PORT, check=_port),
        ca=r.require_path("mqtt.ca"),
        cert=r.require_path("mqtt.cert"),
        key=r.require_path("mqtt.key"),
        topic_prefix=r.field(MqttSettings, "mqtt.topic_prefix", str, check=_safe_id),
        client_id=r.get("mqtt.client_id", (str, type(None)), None),
        keepalive=r.field(MqttSettings, "mqtt.keepalive", int, check=_positive),
        session_expiry_seconds=r.field(MqttSettings, "mqtt.session_expiry_seconds", int, check=_positive),
        inflight=r.field(MqttSettings, "mqtt.inflight", int, check=_positive),
        crl=r.path("mqtt.crl", field_default(MqttSettings, "crl")),
        tls_server_name=r.get("mqtt.tls_server_name", (str, type(None)), None),
    )
    telemetry = TelemetrySettings(
        interval_seconds=r.field(TelemetrySettings, "telemetry.interval_seconds", float, check=_positive),
        prometheus_port=r.field(TelemetrySettings, "telemetry.prometheus_port", int, check=_port_or_zero),
    )
    audit = AuditSettings(
        checkpoint_every=r.field(AuditSettings, "audit.checkpoint_every", int, check=_positive),
        checkpoint_seconds=r.field(AuditSettings, "audit.checkpoint_seconds", float, check=_positive),
        retention_days=r.field(AuditSettings, "audit.retention_days", int, check=_positive),
        max_bytes=r.field(AuditSettings, "audit.max_bytes", int, check=_positive),
        min_retention_days=r.field(AuditSettings, "audit.min_retention_days", int,
                                 check=lambda v: None if v >= 0 else "must be 0 or more"),
        summary_seconds=r.field(AuditSettings, "audit.summary_seconds", float, check=_positive),
        max_queue=r.field(AuditSettings, "audit.max_queue", int, check=_positive),
    )
    outbox = OutboxSettings(max_bytes=r.field(OutboxSettings, "outbox.max_bytes", int, check=_positive))
    control = ControlSettings(
        socket=r.require_path("control.socket", str(state_dir / "control.sock")),
        admin_group=r.field(ControlSettings, "control.admin_group", str),
        auditor_group=r.field(ControlSettings, "control.auditor_group", str),
        operator_group=r.field(ControlSettings, "control.operator_group", str),
        privacy_group=r.field(ControlSettings, "control.privacy_group", str),
        reviewer_group=r.field(ControlSettings, "control.reviewer_group", str),
    )
    quarantine = QuarantineSettings(retention_days=r.field(QuarantineSettings, "quarantine.retention_days", int,
        check=lambda v: None if 1 <= v <= 3650 else "must be between 1 and 3650 days"))

    watchdog = WatchdogSettings(
        stage_deadline_seconds=r.field(WatchdogSettings, "watchdog.stage_deadline_seconds", float,
            check=lambda v: None if 1 <= v <= 86400 else "must be between 1 and 86400 seconds"),
    )
    results = _results(r)
    atna = _atna(r)
    review = _review(r)
    deploy = deploy_settings.parse(r)
    _unknown_keys(data, r)
    if r.problems:
        raise ConfigError(r.problems, path=str(path))
    return Config(
        path=path, site=site, device=device,
        environment=cast(Literal["production", "development"], env),
        state_dir=state_dir, log_level=log_level, dicom=dicom, study=study, inbox=inbox,
        deid=deid, keys=keys, models=models, mqtt=mqtt, telemetry=telemetry, audit=audit,
        outbox=outbox, control=control, watchdog=watchdog, results=results, atna=atna,
        quarantine=quarantine, review=review, deploy=deploy, infer=infer,
    )


def _review(r: _Reader) -> ReviewSettings:
    raw: object = r.get("review.escalate_after", (int, float, str), 86400.0,
                allowed="seconds, or a number with s, m, h or d (\"4h\")")
    escalate = duration_seconds(raw)
    if escalate is None or escalate <= 0:
        r.problems.append(f"[review.escalate_after] = {raw!r}: must be a positive duration "
                          "(seconds, or a number with s, m, h or d, e.g. \"4h\")")
        escalate = 86400.0
    windows = r.get("review.windows_days", list, [30, 90])
    if (not windows or not all(isinstance(w, int) and not isinstance(w, bool) and 1 <= w <= 3650
                               for w in windows)):
        r.problems.append(f"[review.windows_days] = {windows!r}: must be a list of whole "
                          "numbers of days between 1 and 3650")
        windows = [30, 90]
    retention = r.get("review.retention_days", int, 365,
                      check=lambda v: None if 1 <= v <= 3650 else "must be between 1 and 3650 days")
    if retention < max(windows):
        r.problems.append(f"[review.retention_days] = {retention}: must be at least the longest "
                          f"window in [review.windows_days] ({max(windows)})")
    return ReviewSettings(
        escalate_after_seconds=escalate,
        min_verdicts=r.get("review.min_verdicts", int, 20,
                           check=lambda v: None if 2 <= v <= 10000 else "must be between 2 and 10000"),
        windows_days=tuple(sorted(set(windows))),
        gap=r.get("review.gap", float, 0.1,
                  check=lambda v: None if 0 <= v < 1 else "must be at least 0 and below 1"),
        retention_days=retention,
    )


def _facility(v: Any) -> str | None:
    if isinstance(v, str):
        return None if v in SYSLOG_FACILITIES else (
            f"must be a syslog facility number 0-23 or a name ({', '.join(SYSLOG_FACILITIES)})")
    return None if 0 <= v <= 23 else "must be a syslog facility number 0-23 (10 = authpriv)"


def _atna_file(r: _Reader, key: str, p: Path | None, what: str, *, secret: bool) -> None:
    """A TLS file of [atna], by path only: required, existing, a secret one 0600."""
    if p is None:
        r.problems.append(f"[{key}] is required when [atna] enabled = true (the path of the {what})")
        return
    if "-----BEGIN" in str(p):
        # Never echo it: it may be a private key.
        r.problems.append(f"[{key}] holds PEM text; put the {what} in a file (0600 for a key) "
                          "and give its path")
        return
    cred = os.environ.get("CREDENTIALS_DIRECTORY")
    if secret and cred and (Path(cred) / "atna_key").is_file():
        return  # systemd hands the key over as the credential "atna_key"
    try:
        st = p.stat()
    except OSError as exc:
        r.problems.append(f"[{key}] {p}: {exc.strerror or exc}; give the path of the {what}")
        return
    if not p.is_file():
        r.problems.append(f"[{key}] {p} is not a file; give the path of the {what}")
    elif secret and st.st_mode & 0o077:
        r.problems.append(f"[{key}] {p} is readable by group or others (mode "
                          f"{st.st_mode & 0o777:o}); fix: chmod 600 {p}")


def _atna(r: _Reader) -> AtnaSettings:
    enabled = r.field(AtnaSettings, "atna.enabled", bool)
    fmt = r.choice("atna.format", ATNA_FORMATS, field_default(AtnaSettings, "format"))
    facility: int | str = r.field(AtnaSettings, "atna.facility", (int, str), check=_facility,
                                  allowed="a syslog facility number 0-23 or name like 'authpriv'")
    host = r.field(AtnaSettings, "atna.host", str)
    settings = AtnaSettings(
        enabled=enabled,
        host=host,
        port=r.field(AtnaSettings, "atna.port", int, check=_port),
        ca_file=r.path("atna.ca_file", field_default(AtnaSettings, "ca_file")),
        cert_file=r.path("atna.cert_file", field_default(AtnaSettings, "cert_file")),
        key_file=r.path("atna.key_file", field_default(AtnaSettings, "key_file")),
        format=cast(Literal["dicom-xml", "fhir-json"], fmt),
        app_name=r.field(AtnaSettings, "atna.app_name", str,
                       check=lambda v: None if APP_NAME.match(v) else
                       "must be 1-48 printable ASCII characters without spaces (RFC 5424 APP-NAME)"),
        facility=SYSLOG_FACILITIES[facility] if isinstance(facility, str) else int(facility),
        server_name=r.get("atna.server_name", (str, type(None)), None),
        connect_timeout_seconds=r.field(AtnaSettings, "atna.connect_timeout_seconds", float,
                                      check=lambda v: None if 0 < v <= 300 else
                                      "must be between 0 and 300 seconds"),
    )
    if not enabled:
        return settings  # read (typos are reported), but nothing is required of it
    if not host.strip():
        r.problems.append("[atna.host] is required when [atna] enabled = true (the audit "
                          "repository's host name, as in its certificate)")
    _atna_file(r, "atna.ca_file", settings.ca_file,
               "CA certificate(s) that sign the collector's certificate", secret=False)
    _atna_file(r, "atna.cert_file", settings.cert_file, "box's client certificate", secret=False)
    _atna_file(r, "atna.key_file", settings.key_file, "box's client private key", secret=True)
    return settings


def _range(lo: float, hi: float, unit: str) -> Callable[[Any], str | None]:
    return lambda v: None if lo <= v <= hi else f"must be between {lo:g} and {hi:g} {unit}"


def _results(r: _Reader) -> ResultsSettings:
    enabled = r.get("results.enabled", bool, False)
    settings = ResultsSettings(
        enabled=enabled,
        link_retention_days=r.get("results.link_retention_days", int, 14,
                                  check=_range(1, 3650, "days")),
        destinations=_destinations(r),
        retry_min_seconds=r.get("results.retry_min_seconds", float, 5.0,
                                check=_range(0.1, 3600, "seconds")),
        retry_max_seconds=r.get("results.retry_max_seconds", float, 300.0,
                                check=_range(1, 86400, "seconds")),
        dead_letter_hours=r.get("results.dead_letter_hours", float, 72.0,
                                check=_range(0.001, 24 * 365, "hours")),
        commitment_timeout_seconds=r.get("results.commitment_timeout_seconds", float, 600.0,
                                         check=_range(1, 7 * 86400, "seconds")),
        commitment_wait_seconds=r.get("results.commitment_wait_seconds", float, 5.0,
                                      check=_range(0, 300, "seconds")),
        connect_timeout_seconds=r.get("results.connect_timeout_seconds", float, 10.0,
                                      check=_range(0.1, 300, "seconds")),
    )
    if settings.retry_max_seconds < settings.retry_min_seconds:
        r.problems.append("[results.retry_max_seconds] is smaller than retry_min_seconds; "
                          "fix: make it at least as large")
    if settings.dead_letter_hours > settings.link_retention_days * 24:
        # A queued object is a copy of the link's PHI: it must not outlive the link.
        r.problems.append(f"[results.dead_letter_hours] = {settings.dead_letter_hours:g} is "
                          f"longer than link_retention_days ({settings.link_retention_days} "
                          "days); fix: lower it or keep links longer")
    if settings.destinations and not enabled:
        r.problems.append("[[results.destinations]] are configured but [results] enabled = "
                          "false: nothing would be sent; fix: set [results] enabled = true or "
                          "remove the destinations")
    return settings


_DEST_KEYS = ("name", "ae_title", "host", "port", "kinds", "storage_commitment",
              "release_after", "tls")
_DEST_TLS_KEYS = ("enabled", "ca", "cert", "key", "server_name")


def _destinations(r: _Reader) -> tuple[ResultDestination, ...]:
    """``[[results.destinations]]``: every problem of every entry is reported."""
    raw = r._lookup("results.destinations")
    if raw is _MISSING:
        return ()
    if not isinstance(raw, list):
        r.problems.append("[results.destinations] must be an array of tables "
                          "([[results.destinations]])")
        return ()
    out: list[ResultDestination] = []
    names: set[str] = set()
    peers: set[tuple[str, str, int]] = set()
    for i, e in enumerate(raw):
        where = f"results.destinations[{i}]"
        if not isinstance(e, dict):
            r.problems.append(f"[{where}] must be a table with name, ae_title, host and port")
            continue
        before = len(r.problems)
        sub = _Reader(e, r.base)

        def need(key: str, kind: type, check: Callable[[Any], str | None] | None,
                 allowed: str, sub: _Reader = sub) -> Any:
            return sub.get(key, kind, check=check, allowed=allowed)

        name = need("name", str, _safe_id, "a short label like 'pacs' (A-Z a-z 0-9 _ . -)")
        ae = need("ae_title", str, _ae, "the destination's AE title")
        host = need("host", str, lambda v: None if v.strip() else "must not be empty",
                    "the destination's host name or address")
        port = need("port", int, _port, "its DICOM port")
        kinds_raw = sub.get("kinds", list, list(RESULT_KINDS))
        bad = [k for k in kinds_raw if k not in RESULT_KINDS]
        if bad or not kinds_raw:
            sub.problems.append(f"[kinds] = {kinds_raw!r}: must list some of "
                                f"{', '.join(RESULT_KINDS)}")
        commitment = sub.get("storage_commitment", bool, False)
        release = sub.choice("release_after", ("commitment", "success"),
                             "commitment" if commitment else "success")
        if release == "commitment" and not commitment:
            sub.problems.append("[release_after] = 'commitment' needs storage_commitment = true "
                                "(without it, use 'success')")
        tls = DestinationTls(
            enabled=sub.get("tls.enabled", bool, False), ca=sub.path("tls.ca", None),
            cert=sub.path("tls.cert", None), key=sub.path("tls.key", None),
            server_name=sub.get("tls.server_name", (str, type(None)), None))
        if tls.enabled:
            for key, p, what, secret in (
                    ("tls.ca", tls.ca, "CA certificate(s) that sign the destination's "
                                       "certificate", False),
                    ("tls.cert", tls.cert, "box's client certificate", False),
                    ("tls.key", tls.key, "box's client private key", True)):
                _tls_file(sub, key, p, what, secret=secret)
        unknown = set(e) - set(_DEST_KEYS)
        tls_raw = e.get("tls", {})
        if isinstance(tls_raw, dict):
            unknown |= {f"tls.{k}" for k in set(tls_raw) - set(_DEST_TLS_KEYS)}
        if unknown:
            sub.problems.append(f"unknown key(s) {sorted(unknown)}; allowed: "
                                f"{', '.join(_DEST_KEYS)}, tls.{{{', '.join(_DEST_TLS_KEYS)}}}")
        r.problems.extend(f"[{where}.{p[1:]}" if p.startswith("[") else f"[{where}] {p}"
                          for p in sub.problems)
        if name is not None and name in names:
            r.problems.append(f"[{where}.name] = {name!r} is used by two destinations; "
                              "fix: give each its own name")
        if None not in (ae, host, port) and (ae, host, port) in peers:
            r.problems.append(f"[{where}] {ae}@{host}:{port} is configured twice; fix: "
                              "keep one entry (list every kind it takes in its kinds)")
        names.add(name)
        peers.add((ae, host, port))
        if len(r.problems) > before:
            continue
        out.append(ResultDestination(
            name=name, ae_title=ae, host=host, port=port,
            kinds=frozenset(RESULT_KINDS[k] for k in kinds_raw),
            storage_commitment=commitment,
            release_after=cast(Literal["commitment", "success"], release), tls=tls))
    return tuple(out)


def _tls_file(r: _Reader, key: str, p: Path | None, what: str, *, secret: bool) -> None:
    if p is None:
        r.problems.append(f"[{key}] is required when tls.enabled = true (the path of the {what})")
        return
    try:
        st = p.stat()
    except OSError as exc:
        r.problems.append(f"[{key}] {p}: {exc.strerror or exc}; give the path of the {what}")
        return
    if not p.is_file():
        r.problems.append(f"[{key}] {p} is not a file; give the path of the {what}")
    elif secret and st.st_mode & 0o077:
        r.problems.append(f"[{key}] {p} is readable by group or others (mode "
                          f"{st.st_mode & 0o777:o}); fix: chmod 600 {p}")


def _unknown_keys(data: dict[str, Any], r: _Reader) -> None:
    """Report typos: every leaf key that validation never looked at."""
    def walk(node: dict[str, Any], prefix: str) -> None:
        for k, v in node.items():
            key = f"{prefix}{k}"
            if key in {"dicom.peers", "deid.pixel_clean", "results.destinations"} \
                    or prefix == "" and k not in _KNOWN_TOP:
                continue
            if isinstance(v, dict):
                walk(v, key + ".")
            elif key not in r.seen:
                r.problems.append(f"[{key}] is not a known setting (typo?); see docs/configuration.md")
    walk(data, "")


def load(path: Path | None = None) -> Config:
    """Load and validate the config file; every problem is reported at once."""
    p = Path(path or os.environ.get("EDGE_AGENT_CONFIG") or DEFAULT_CONFIG)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            ["file not found; create it with 'edge-agent provision init' or pass --config"],
            path=str(p),
        ) from None
    except PermissionError:
        raise ConfigError(["not readable by this user; run as the edge-agent user"], path=str(p)) from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError([f"not valid TOML: {exc}"], path=str(p)) from None
    # Under systemd, key files named here are replaced by $CREDENTIALS_DIRECTORY entries.
    from agent.deploy import overlay  # changes applied by approved deployments
    from agent.identity import credentials  # here, not at the top: credentials imports this module

    return credentials.apply(parse(overlay.apply(data, p), p))
