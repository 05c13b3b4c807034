"""A throwaway development box: dev CA, certificates, keys, agent.toml, mosquitto.conf.

Idempotent: keys and certificates that already exist are kept (so pseudonyms
stay stable across runs); the config files are rewritten from the arguments.
Everything lives under one folder so ``rm -rf`` resets it.
"""

from __future__ import annotations

import getpass
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.crypto import write_secret_file
from agent.identity.pki import issue, load_cert, load_key, make_ca, write_pair
from agent.uplink.inbound import INBOUND_CHANNELS, OUTBOUND_CHANNELS, topic_filter

DEV_SITE = "dev-site"
DEV_DEVICE = "dev-box"
DEV_AE = "EDGE_AGENT"
DEV_CALLING = ("STORESCU", "FINDSCU", "ECHOSCU", "PYNETDICOM", "ORTHANC", "MODALITY")


def repo_models_dir() -> Path:
    return Path(__file__).resolve().parents[2] / "models"


@dataclass(frozen=True)
class DevBox:
    root: Path
    config: Path
    mosquitto_conf: Path
    ops_config: Path
    dicom_port: int
    mqtt_port: int
    ca: Path
    ops_cert: Path
    ops_key: Path
    site: str = DEV_SITE
    device: str = DEV_DEVICE
    ae_title: str = DEV_AE
    topic_prefix: str = "edge"

    def as_json(self) -> dict[str, Any]:
        return {
            "config": str(self.config),
            "mosquitto_conf": str(self.mosquitto_conf),
            "ops_config": str(self.ops_config),
            "dicom": {"host": "127.0.0.1", "port": self.dicom_port, "ae_title": self.ae_title},
            "mqtt": {
                "host": "localhost", "port": self.mqtt_port, "ca": str(self.ca),
                "ops_cert": str(self.ops_cert), "ops_key": str(self.ops_key),
                "topic_prefix": self.topic_prefix, "site": self.site, "device": self.device,
            },
        }


OPS_IDENTITIES = ("ops", "ops-sub", "ops-2")
# Reviewers: certificates that may write verdicts to the boxes' review topics and do
# nothing else (no read, no other topic): a reviewer reads flagged results through
# central ops' view ('fleet review list', an ops certificate).
REVIEWER_IDENTITIES = ("reviewer", "reviewer-2")


def reviewer_acl(prefix: str, cn: str, boxes: str = "+/+") -> str:
    """The ACL entry of one reviewer certificate: write on its own review topics only.

    The topic's last level is the certificate's CN (the broker's MQTT user): the box
    takes the reviewer's identity from it, so a reviewer cannot send a verdict in
    another reviewer's name.  One ``user`` entry per reviewer rather than one
    ``pattern write {prefix}/+/+/review/%u``: mosquitto applies a pattern to every
    user, so it would let every certificate of the CA (a box's, an ops dashboard's)
    write a review topic of its own CN.  ``boxes`` is ``site/device`` of one box, or
    ``+/+`` for every box under the prefix (mosquitto matches the wildcards per level,
    so no other channel is reachable)."""
    if not cn or any(ch in cn for ch in "/+#\0") or not cn.isprintable():
        raise ValueError(f"reviewer CN {cn!r} cannot be a topic level")
    return f"user {cn}\ntopic write {prefix}/{boxes}/review/{cn}\n"


# Central ops' rollout tool: writes signed documents and package chunks to the boxes'
# deployments topics, reads their job states and presence; nothing else.
DEPLOYER = "deployer"


def deployer_acl(prefix: str) -> str:
    return (f"user {DEPLOYER}\ntopic write {prefix}/+/+/deployments\n"
            f"topic read {prefix}/+/+/jobs\ntopic read {prefix}/+/+/status\n")


def device_acl(prefix: str, site: str, device: str) -> str:
    """The ACL entry of one box: it writes its own outbound topics and reads its inbound ones.

    Channels are listed one by one rather than as ``{base}/#``: mosquitto ACLs only
    grant, so a wildcard write grant would let a box (or a stolen box certificate)
    forge its own verdicts and deployment documents.
    """
    base = f"{prefix}/{site}/{device}"
    lines = [f"user {site}.{device}"]
    lines += [f"topic write {base}/{ch}" for ch in OUTBOUND_CHANNELS]
    lines += [f"topic read {topic_filter(base, ch)}" for ch in INBOUND_CHANNELS]
    return "\n".join(lines) + "\n"


def _secret(path: Path) -> None:
    if not path.exists():
        write_secret_file(path, os.urandom(32).hex().encode())


def provision_dev(root: Path, *, dicom_port: int = 11112, mqtt_port: int = 8883,
                  models_dir: Path | None = None, extra_ae: tuple[str, ...] = ()) -> DevBox:
    root = root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o700)
    pki = root / "pki"
    keys = root / "keys"
    state = root / "state"
    broker = root / "broker"
    for d in (pki, keys, state, broker):
        d.mkdir(exist_ok=True, mode=0o700)

    if (pki / "ca.pem").exists() and (pki / "ca.key").exists():
        ca_key, ca_cert = load_key(pki / "ca.key"), load_cert(pki / "ca.pem")
    else:
        ca_key, ca_cert = make_ca()
        write_pair(pki, "ca", ca_key, ca_cert)
    identities = {
        "broker": dict(cn="localhost", server=True, dns=("localhost",), ips=("127.0.0.1", "::1")),
        "device": dict(cn=f"{DEV_SITE}.{DEV_DEVICE}", client=True),
        # Read-only central ops. The broker gives every certificate one session, so each
        # consumer running at the same time needs its own: "ops" for 'fleet watch'
        # (ops.toml), "ops-sub" for a mosquitto_sub or a second consumer beside it,
        # "ops-2" for a third (two fleet exporters sharing a group beside a watch).
        "ops": dict(cn="ops", client=True),
        "ops-sub": dict(cn="ops-sub", client=True),
        "ops-2": dict(cn="ops-2", client=True),
        # A central reviewer: writes verdicts to the review topics, nothing else.
        "reviewer": dict(cn="reviewer", client=True),
        # A second reviewer: each may write only its own review topic (reviewer_acl).
        "reviewer-2": dict(cn="reviewer-2", client=True),
        # Writes deployment documents and package chunks (docs/fleet.md, "Deployments").
        DEPLOYER: dict(cn=DEPLOYER, client=True),
        "dicom": dict(cn="edge-agent-dicom", server=True, dns=("localhost",), ips=("127.0.0.1",)),
        "modality": dict(cn="modality", client=True),
        # The hospital's ATNA audit repository (a syslog/TLS collector) on loopback;
        # the box presents its device certificate to it ([atna] in the config).
        "collector": dict(cn="localhost", server=True, dns=("localhost",), ips=("127.0.0.1",)),
    }
    for stem, spec in identities.items():
        if not (pki / f"{stem}.pem").exists():
            cn = str(spec.pop("cn"))
            k, c = issue(ca_key, ca_cert, cn, **spec)  # type: ignore[arg-type]
            write_pair(pki, stem, k, c)
    for name in ("pseudonym", "kek", "audit_signing"):
        _secret(keys / f"{name}.key")

    models = (models_dir or repo_models_dir()).resolve()
    pub = models / "dev-publisher.pub"
    calling = list(dict.fromkeys((*DEV_CALLING, *extra_ae)))
    peers = "\n".join(
        f'[[dicom.peers]]\nae_title = "{ae}"\naddresses = ["127.0.0.0/8", "::1/128"]\n'
        for ae in calling
    )
    config = root / "agent.toml"
    config.write_text(f"""\
# Development box written by 'edge-agent provision dev'. Not for patient data.
[box]
site = "{DEV_SITE}"
device = "{DEV_DEVICE}"
environment = "development"
state_dir = "state"

[logging]
level = "INFO"

[dicom]
host = "127.0.0.1"
port = {dicom_port}
ae_title = "{DEV_AE}"
max_pdu = 1048576

{peers}
[study]
quiet_seconds = 3
max_age_seconds = 600

[inbox]
min_free_bytes = 104857600

[deid]
mode = "strip"
options = []

[keys]
pseudonym = "keys/pseudonym.key"
kek = "keys/kek.key"
audit_signing = "keys/audit_signing.key"

[models]
dir = "{models}"
publisher_keys = [{f'"{pub}"' if pub.exists() else ""}]
threads = 1
timeout_seconds = 60

[mqtt]
host = "localhost"
port = {mqtt_port}
ca = "pki/ca.pem"
cert = "pki/device.pem"
key = "pki/device.key"
topic_prefix = "edge"
keepalive = 10

[telemetry]
interval_seconds = 5

[audit]
checkpoint_every = 50
checkpoint_seconds = 30
""")
    config.chmod(0o600)

    acl = root / "mosquitto.acl"
    acl.write_text(
        "# device: writes its own outbound topics, reads its own inbound ones\n" + device_acl("edge", DEV_SITE, DEV_DEVICE) + "\n"
        "# central ops: read everything under the prefix except verdicts in transit (a\n"
        "# reviewer's note is for the box only), write nothing\n"
        + "".join(f"user {cn}\ntopic deny edge/+/+/review/#\ntopic read edge/#\n"
                  for cn in OPS_IDENTITIES)
        + "# reviewers: write verdicts to their own review topics (.../review/<CN>), read nothing\n"
        + "".join(reviewer_acl("edge", cn) for cn in REVIEWER_IDENTITIES)
        + "# central ops' rollouts: write deployments topics, read job states and presence\n"
        + deployer_acl("edge")
    )
    conf = root / "mosquitto.conf"
    conf.write_text(f"""\
# Local mutual-TLS broker for the dev box (written by 'edge-agent provision dev').
per_listener_settings false
allow_anonymous false
persistence true
persistence_location {broker}/
log_dest stderr
log_type error
log_type warning
log_type notice
user {getpass.getuser()}
set_tcp_nodelay true
acl_file {acl}

listener {mqtt_port} 127.0.0.1
cafile {pki / "ca.pem"}
certfile {pki / "broker.pem"}
keyfile {pki / "broker.key"}
require_certificate true
# The certificate CN is the MQTT user (the ACL above) and, replacing whatever the client
# sent, its client id: no certificate can take over another identity's session.
use_identity_as_username true
use_username_as_clientid true
""")
    ops = root / "ops.toml"
    ops.write_text(f"""\
# Central-ops view of the dev fleet ('edge-agent fleet watch --config {ops}').
[mqtt]
host = "localhost"
port = {mqtt_port}
ca = "{pki / "ca.pem"}"
cert = "{pki / "ops.pem"}"
key = "{pki / "ops.key"}"
topic_prefix = "edge"

# 'edge-agent fleet review submit': verdicts are sent with the reviewer certificate
# (the broker lets only the reviewer role write review topics).
[reviewer]
cert = "{pki / "reviewer.pem"}"
key = "{pki / "reviewer.key"}"
""")
    (root / "deploy.toml").write_text(f"""\
# Central-ops rollouts as the deployer ('edge-agent fleet deploy --config {root / "deploy.toml"}').
[mqtt]
host = "localhost"
port = {mqtt_port}
ca = "{pki / "ca.pem"}"
cert = "{pki / "deployer.pem"}"
key = "{pki / "deployer.key"}"
topic_prefix = "edge"
""")
    return DevBox(root=root, config=config, mosquitto_conf=conf, ops_config=ops,
                  dicom_port=dicom_port, mqtt_port=mqtt_port, ca=pki / "ca.pem",
                  ops_cert=pki / "ops.pem", ops_key=pki / "ops.key")
