"""``ops.toml``: how a central-ops consumer reaches the broker.

One ``[mqtt]`` table with the same keys as a box's ``[mqtt]`` (host, port, ca, cert,
key, topic_prefix, tls_server_name, crl, keepalive) read into the box's own
``MqttSettings``, plus ``share_group`` for MQTT 5 shared subscriptions. Relative
paths are resolved against the file's folder, like agent.toml. The defaults are the
box's own (agent/config.py); nothing here repeats them.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from agent.config import MQTT_TLS_PORT, SAFE_ID, MqttSettings, field_default
from agent.errors import ConfigError

_KEYS = {"host", "port", "ca", "cert", "key", "topic_prefix", "share_group", "tls_server_name",
         "crl", "keepalive"}


@dataclass(frozen=True)
class OpsSettings:
    mqtt: MqttSettings
    # MQTT 5 shared-subscription group: consumers in one group split the messages.
    share_group: str | None = None

    @property
    def topic_prefix(self) -> str:
        return self.mqtt.topic_prefix

    def with_identity(self, cert: Path, key: Path) -> OpsSettings:
        """The same broker with another ops certificate (one connection per certificate)."""
        return replace(self, mqtt=replace(self.mqtt, cert=cert, key=key))

    def with_share_group(self, group: str | None) -> OpsSettings:
        if group is not None:
            check_share_group(group)
        return replace(self, share_group=group)


def check_share_group(group: str) -> None:
    # MQTT 5 (4.8.2): a ShareName must not contain "/", "+" or "#"; we hold it to the
    # identity alphabet so that no option value can widen the subscription.
    if not SAFE_ID.match(group):
        raise ConfigError([f"share group {group!r} must be 1-64 characters of A-Z a-z 0-9 _ . - "
                           "(no '/', '+' or '#')"])


def load_ops(path: Path) -> OpsSettings:
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(["file not found"], path=str(path)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"cannot read it ({exc})"], path=str(path)) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"not valid TOML ({exc})"], path=str(path)) from None
    m = data.get("mqtt")
    if not isinstance(m, dict):
        raise ConfigError(["needs an [mqtt] table with host, port, ca, cert, key"], path=str(path))
    problems: list[str] = []
    base = path.parent

    def p(key: str, required: bool = True) -> Path | None:
        v = m.get(key)
        if v is None and not required:
            return None
        if not isinstance(v, str) or not v:
            problems.append(f"[mqtt] {key} must be a file path")
            return None
        return Path(v) if Path(v).is_absolute() else base / v

    def num(key: str, default: int, lo: int, hi: int) -> int:
        v: Any = m.get(key, default)
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            problems.append(f"[mqtt] {key} must be a whole number from {lo} to {hi}")
            return default
        return v

    host = m.get("host")
    if not isinstance(host, str) or not host:
        problems.append("[mqtt] host must be the broker host name in its certificate")
    prefix = m.get("topic_prefix", field_default(MqttSettings, "topic_prefix"))
    if not isinstance(prefix, str) or not SAFE_ID.match(prefix):
        problems.append(f"[mqtt] topic_prefix {prefix!r} must be 1-64 characters of "
                        "A-Z a-z 0-9 _ . - (one topic segment, no MQTT wildcards)")
    group = m.get("share_group")
    if group is not None and (not isinstance(group, str) or not SAFE_ID.match(group)):
        problems.append(f"[mqtt] share_group {group!r} must be 1-64 characters of A-Z a-z 0-9 _ . - "
                        "(no '/', '+' or '#')")
    server_name = m.get("tls_server_name")
    if server_name is not None and not isinstance(server_name, str):
        problems.append("[mqtt] tls_server_name must be a host name")
    port = num("port", MQTT_TLS_PORT, 1, 65535)
    keepalive = num("keepalive", field_default(MqttSettings, "keepalive"), 5, 3600)
    ca, cert, key, crl = p("ca"), p("cert"), p("key"), p("crl", required=False)
    unknown = sorted(set(m) - _KEYS)
    if unknown:
        problems.append(f"[mqtt] unknown key(s) {unknown}; allowed: {', '.join(sorted(_KEYS))}")
    if problems or ca is None or cert is None or key is None:
        raise ConfigError(problems, path=str(path))
    mqtt = MqttSettings(host=str(host), port=port, ca=ca, cert=cert, key=key,
                        topic_prefix=str(prefix), keepalive=keepalive, crl=crl,
                        tls_server_name=server_name)
    return OpsSettings(mqtt, group)
