"""Result objects written back into the original study: the encrypted link from a
study's pseudonym to its originals (``link``), and the SR (TID 1500), presentation
state, key image and segmentation built from a result (``build`` and one module per
object).  ``queue``, ``scu`` and ``delivery`` send them to the configured PACS
destinations (durable C-STORE queue, storage commitment).  See docs/models.md.

May import: agent.crypto, agent.sealedrows (the queue's sealed rows), agent.errors,
agent.types, agent.infer.manifest.  The
objects carry original identifiers (they go back into the hospital's study), so
nothing here publishes them over MQTT: ``delivery`` (which may also import
agent.uplink's cloudevents, egresspolicy, outbox and vocabulary) enqueues only the
PHI-free ``result.delivery`` summary.
"""
