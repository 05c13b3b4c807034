#!/usr/bin/env bash
# Set up everything the quickstart needs on a fresh Debian/Ubuntu machine:
# system packages (only when missing), the venv, and the project in it.
#   tools/setup.sh run    -> mosquitto (+ clients)
#   tools/setup.sh test   -> mosquitto, dcmtk, dicom3tools, gdcm tools, openssl, orthanc,
#                            rsyslog + rsyslog-gnutls, prometheus (with promtool)
#   tools/setup.sh deb    -> only what `make deb` needs: python3.11-venv, dpkg-dev, lintian
#                            (no venv: the package's venv is built from packaging/requirements.lock)
#   tools/setup.sh system -> test + deb + debootstrap, systemd-container (`make test-system`)
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-run}

need=()
have() { command -v "$1" >/dev/null 2>&1; }
if [ "$mode" = deb ] || [ "$mode" = system ]; then
  [ -x /usr/bin/python3.11 ] && /usr/bin/python3.11 -c 'import ensurepip' 2>/dev/null \
    || need+=(python3.11-venv)
  have dpkg-shlibdeps || need+=(dpkg-dev)
  have lintian || need+=(lintian)
  have git || need+=(git)
fi
[ "$mode" = system ] && { have debootstrap || need+=(debootstrap); }
# systemd-nspawn boots the package's root with systemd as PID 1 (test_under_systemd.py)
[ "$mode" = system ] && { have systemd-nspawn || need+=(systemd-container); }
if [ "$mode" != deb ]; then
  have mosquitto || need+=(mosquitto)
  have mosquitto_sub || need+=(mosquitto-clients)
fi
if [ "$mode" = test ] || [ "$mode" = system ]; then
  have storescu || need+=(dcmtk)
  have dciodvfy || need+=(dicom3tools)
  have gdcmanon || need+=(libgdcm-tools)
  have openssl || need+=(openssl)
  have systemd-analyze || need+=(systemd)
  [ -x /usr/sbin/Orthanc ] || need+=(orthanc)  # receive interop test and ingest bench
  # The ATNA collector of tests/audit/test_atna.py: a real rsyslog with its TLS driver.
  have rsyslogd || [ -x /usr/sbin/rsyslogd ] || need+=(rsyslog)
  compgen -G "/usr/lib/*/rsyslog/lmnsd_gtls.so" >/dev/null \
    || compgen -G "/usr/lib/rsyslog/lmnsd_gtls.so" >/dev/null || need+=(rsyslog-gnutls)
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
# rsyslog is installed for the tests' own collectors only; the machine's syslog, if any,
# is left alone (ours run in the foreground on free ports with their own config).
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

[ "$mode" = deb ] && exit 0

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
