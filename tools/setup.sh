#!/usr/bin/env bash
# Set up everything the quickstart needs on a fresh Debian/Ubuntu machine:
# system packages (only when missing), the venv, and the project in it.
#   tools/setup.sh run    -> mosquitto (+ clients)
#   tools/setup.sh test   -> mosquitto, dcmtk, dicom3tools, gdcm tools, openssl, orthanc,
#                            prometheus (with promtool)
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-run}

need=()
have() { command -v "$1" >/dev/null 2>&1; }
have mosquitto || need+=(mosquitto)
have mosquitto_sub || need+=(mosquitto-clients)
if [ "$mode" = test ]; then
  have storescu || need+=(dcmtk)
  have dciodvfy || need+=(dicom3tools)
  have gdcmanon || need+=(libgdcm-tools)
  have openssl || need+=(openssl)
  have systemd-analyze || need+=(systemd)
  [ -x /usr/sbin/Orthanc ] || need+=(orthanc)  # receive interop test and ingest bench
  have promtool || need+=(prometheus)  # fleet exporter tests: a real Prometheus, promtool
fi
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  echo "installing system packages: ${need[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# The broker is started by our own scripts/tests, never as a system service.
if have systemctl && systemctl is-active --quiet mosquitto 2>/dev/null; then
  systemctl stop mosquitto || true
fi
# Orthanc likewise: tests and the bench run throwaway instances on free ports.
if have systemctl && systemctl is-active --quiet orthanc 2>/dev/null; then
  systemctl stop orthanc || true
fi
# Prometheus likewise (the package enables a service on :9090 and a node exporter).
for svc in prometheus prometheus-node-exporter; do
  if have systemctl && systemctl is-active --quiet $svc 2>/dev/null; then
    systemctl stop $svc || true
  fi
done

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "installing edge-agent and its dependencies into .venv (log: .venv/install.log)"
  if ! { .venv/bin/pip install -q --upgrade pip && .venv/bin/pip install -q -e '.[dev]'; } > .venv/install.log 2>&1; then
    tail -40 .venv/install.log
    echo "pip install failed; see .venv/install.log" >&2
    exit 1
  fi
  touch "$stamp"
fi
