"""Fleet deployments on the box: signed, approved model and configuration rollouts.

document (shape, approvals, target), chunks + archive (the resumable package
download), overlay (the approved agent.toml changes), jobstate (durable job
state), gates (health over the soak), agent (the stage the daemon runs).
Kept import-light: agent/config.py imports agent.deploy.settings (which imports
nothing of agent/) and config loading imports agent.deploy.overlay.

May import: agent.config, agent.errors, agent.crypto, agent.uplink.cloudevents, agent.uplink.inbound,
agent.infer (registry and signing: a downloaded package is verified and installed as
``models install`` does).  Never agent.daemon or the pipeline: the daemon hands the
stage its hooks (agent/deploy/runner.py ``Hooks``).
"""
