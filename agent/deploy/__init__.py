"""Fleet deployments on the box: signed, approved model and configuration rollouts.

document (shape, approvals, target), chunks + archive (the resumable package
download), overlay (the approved agent.toml changes), jobstate (durable job
state), gates (health over the soak), agent (the stage the daemon runs).
Kept import-light: agent/config.py imports agent.deploy.settings.
"""
