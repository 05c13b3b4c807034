"""Who the box is and the keys it holds.

Owns X.509 helpers and the development CA (``pki``), the production identity: device
key, CSR, certificate install and rotation (``certificates``), secrets from systemd
credentials (``credentials``) and the box KEK rotation that re-wraps every data key
(``keyrotate``).

May import: agent.config, agent.errors, agent.crypto. ``keyrotate`` alone also
imports the stores whose data keys it re-wraps (agent.store, agent.uplink.outbox,
agent.results.link, agent.audit). Nothing here opens a network connection.
"""
