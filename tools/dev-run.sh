#!/usr/bin/env bash
# The quickstart's main job: a dev-provisioned box with a local mTLS broker,
# the daemon in the foreground on 127.0.0.1:11112.
set -euo pipefail
cd "$(dirname "$0")/.."
BOX=${BOX:-.dev-box}
DICOM_PORT=${DICOM_PORT:-11112}
MQTT_PORT=${MQTT_PORT:-8883}
EA=.venv/bin/edge-agent

$EA provision dev --state-dir "$BOX" --dicom-port "$DICOM_PORT" --mqtt-port "$MQTT_PORT" --json > "$BOX.json"
conf=$(.venv/bin/python -c 'import json,sys; print(json.load(open(sys.argv[1]))["mosquitto_conf"])' "$BOX.json")

broker_pid=""
if .venv/bin/python - "$MQTT_PORT" <<'PY'
import socket, sys
s = socket.socket(); s.settimeout(0.5)
sys.exit(0 if s.connect_ex(("127.0.0.1", int(sys.argv[1]))) == 0 else 1)
PY
then
  echo "a broker already listens on 127.0.0.1:$MQTT_PORT; using it"
else
  mosquitto -c "$conf" 2> "$BOX/broker/mosquitto.log" &
  broker_pid=$!
  trap '[ -n "$broker_pid" ] && kill "$broker_pid" 2>/dev/null || true' EXIT
  sleep 0.5
fi

pki="$BOX/pki"
cat <<MSG

  edge-agent dev box is starting (Ctrl-C stops it).
  Send a study:
    storescu -aet STORESCU -aec EDGE_AGENT 127.0.0.1 $DICOM_PORT path/to/file.dcm
    (any DICOM file works, e.g. $(.venv/bin/python -c 'from pydicom.data import get_testdata_file; print(get_testdata_file("CT_small.dcm"))'))
  Watch results as central ops (one certificate per consumer: the broker gives each
  certificate one session, so these two use different ones):
    mosquitto_sub -h localhost -p $MQTT_PORT --cafile $pki/ca.pem --cert $pki/ops-sub.pem --key $pki/ops-sub.key -t 'edge/#' -v
    .venv/bin/edge-agent fleet watch --config $BOX/ops.toml

MSG
$EA run --config "$BOX/agent.toml"
