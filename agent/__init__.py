"""edge-agent: a hospital imaging edge box that de-identifies, infers and reports.

The packages follow the data path: the DICOM node (receive, recvpool, recvworker,
dicomtls, dimsestream, ...) -> store (encrypted inbox, quarantine) -> deid -> infer
-> uplink (outbox, egress guard, MQTT) with audit alongside; identity holds the keys
and certificates, ops what systemd and the operator talk to.  daemon wires them,
pipeline runs the stages; config, crypto, errors, fileperm, logs and types are shared
by all.
"""

__version__ = "0.1.0"
