"""The central-ops side of edge-agent: what runs next to the broker, not on a box.

``settings`` reads ``ops.toml`` into the box's own ``MqttSettings`` (plus a share
group); ``view`` folds the fleet's status, telemetry, results and audit messages into
one row per box (``edge-agent fleet watch``); ``exporter`` serves those rows as
Prometheus metrics (``edge-agent fleet exporter``), rendered by ``metrics``;
``prometheus/`` holds the shipped alert rules and their ``promtool`` tests.

May import from agent/: config (settings types, defaults, name rules), errors,
agent.uplink.cloudevents, agent.uplink.mqtt_tls (the TLS context and diagnosis) and the
audit event catalogue. Never imported by agent/.
"""
