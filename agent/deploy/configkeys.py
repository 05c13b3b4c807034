"""The agent.toml keys a deployment may change (import-light: config loading uses it)."""

from __future__ import annotations

# agent.toml keys a document may change without further permission: they tune how
# the box behaves, never what it trusts or where data goes.
SAFE_CONFIG_KEYS: dict[str, tuple[type, ...]] = {
    "logging.level": (str,),
    "study.quiet_seconds": (int, float),
    "study.max_age_seconds": (int, float),
    "models.timeout_seconds": (int, float),
    "models.drift_min_studies": (int,),
    "models.threads": (int,),
    "telemetry.interval_seconds": (int, float),
    "quarantine.retention_days": (int,),
}
# Keys a document may change only when it names them in "sensitive" AND the box's own
# [deploy] allow_sensitive lists them.  Anything else (keys, certificates, the MQTT
# broker, the de-identification profile, the approver keys themselves) never.
SENSITIVE_CONFIG_KEYS: dict[str, tuple[type, ...]] = {
    "dicom.peers": (list,),
    "deid.recipients": (list,),
    "atna.host": (str,),
    "atna.port": (int,),
    "results.enabled": (bool,),
}
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
