"""Running the box: what systemd, the operator and the tests talk to.

Owns the local control socket with its kernel-checked roles (``control``), the
readiness checks of ``edge-agent doctor`` (``doctor``), the systemd notify
protocol (``sdnotify``), stage heartbeats that gate the watchdog (``liveness``),
the throwaway development box (``devbox``) and the test-only fault hooks
(``faults``).

May import: agent.config, agent.errors, agent.crypto, agent.fileperm, agent.identity,
agent.uplink.telemetry; ``control`` and ``doctor`` import the daemon's parts lazily,
inside the command that needs them, so the CLI starts without loading the pipeline.
"""
