"""Human review of flagged results, and model performance measured from the verdicts.

``store``: the encrypted per-result record a verdict joins with (model, finding,
subgroup attributes: quasi-identifiers, so sealed under the KEK) and the verdicts.
``verdicts``: what a verdict message is (JSON Schema, CloudEvents) and whether the
box takes it.  ``service``: the stage the daemon wires in (pipeline hook, MQTT
handler, local commands, backlog, escalation).  ``performance`` and ``stats``:
per model version and subgroup counts, sensitivity, specificity, PPV, NPV and
agreement with Wilson intervals, k-suppressed, and the alerts on them.

May import: agent.config, agent.crypto, agent.errors, agent.fileperm, agent.types,
agent.subgroups (coarse subgroup values),
agent.infer.manifest (thresholds, subgroup attributes), agent.ops (control command
shapes, the test-mode guard), agent.uplink's cloudevents and inbound (the verdict
envelope and the inbound channel). Must not import the DICOM node, agent.store,
agent.deid or the wiring: it sees results after de-identification, never originals.
"""
