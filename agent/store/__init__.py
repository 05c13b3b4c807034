"""What the box holds between receiving and publishing: encrypted, durable, bounded.

Owns the inbox (``inbox``: the facade the DICOM node and the pipeline use) and its
parts, the quarantine of instances that must not be published (``quarantine``) and
the privacy officer's review of it (``quarantine_review``).

May import: agent.config, agent.errors, agent.crypto, agent.sealedrows (the sealed
Storage Commitment reports still owed), agent.fileperm, agent.types,
agent.deid (burned-in text rules), agent.subgroups (the patient characteristics a
released item is reviewed by), agent.ops.faults (the inbox's test hook). Must not
import the DICOM node, agent.uplink or
agent.pipeline (``quarantine_review`` alone reuses the pipeline's parser and the
daemon's parts lazily, to re-run an item through the same code).
"""
