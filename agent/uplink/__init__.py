"""The way out: everything that leaves the box towards central operations.

Owns the encrypted outbox (``outbox``), the egress guard that checks every payload
for PHI (``egress``) and the one policy of where PHI may go (``egresspolicy``), the
MQTT publisher (``publish``) and its TLS set-up and diagnosis (``mqtt_tls``), the
CloudEvents envelope (``cloudevents``) and the fixed vocabulary of reasons
(``vocabulary``), the router of the inbound topics (``inbound``: verdicts, deployments), health telemetry (``telemetry``) and the loopback Prometheus
endpoint (``metrics``).

May import: agent.config, agent.errors, agent.crypto, agent.sealedrows, agent.fileperm, agent.types,
agent.dicomraw (the standard UID table), agent.ops (liveness, faults). Must not import the DICOM node, agent.store or
agent.pipeline: stages hand it frozen messages, it never reaches back.
"""
