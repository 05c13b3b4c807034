"""The package under a real systemd: what the unit promises, proven by systemd itself.

A Debian root with systemd as PID 1 (systemd-nspawn -b, tests/system/machine.py) gets
the .deb from `make deb` installed offline; the installed CLI provisions a development
box; its KEK and pseudonym key become encrypted credentials; the shipped unit runs it.
The broker, the ops subscriber and storescu run on the host (the container shares the
host's network).  Then, asking systemd and the kernel rather than the daemon:

- the unit is Type=notify and systemd got READY=1 from the main PID (its journal,
  at debug level) before it called the start done;
- the keys arrive through LoadCredentialEncrypted= (host key: there is no TPM2 here);
- the live process has no capabilities, no_new_privs and a seccomp filter; in its
  mount namespace, as its user, only its state, runtime and log folders and its
  private /tmp are writable; `systemd-analyze security edge-agent` scores <= 1.5;
- a stage hung by the test fault hook stops the watchdog ping and systemd restarts
  the daemon; without EDGE_AGENT_TEST_MODE=1 the hook is inert;
- `systemctl kill -s KILL` is restarted and every acknowledged study still arrives;
- `systemctl stop` drains and exits cleanly; the study it did not finish is kept.

System tier (`make test-system`): root, systemd-nspawn (systemd-container),
debootstrap and the Debian mirror this machine's apt uses (the booted root is cached
in /var/cache/edge-agent-test with the package's dependencies, so the package
installs there without network).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest

from agent.deid.pseudonym import Pseudonymizer
from tests.helpers import (
    REPO,
    Box,
    Subscriber,
    free_port,
    require_peer,
    storescu,
    wait_for,
    wait_port,
)
from tests.helpers.debbuild import DebBuilder
from tests.helpers.debroot import codename, root_tar
from tests.helpers.machine import KernelRefused, Machine

SUITE = codename()
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
pytestmark = [
    pytest.mark.system,
    pytest.mark.skipif(os.geteuid() != 0, reason="boots a container: needs root"),
    pytest.mark.skipif(SUITE is None, reason="needs a Debian host (the root uses its mirror)"),
    pytest.mark.skipif(not all(shutil.which(t) for t in ("debootstrap", "dpkg-deb", "nsenter")),
                       reason="tools/setup.sh system installs debootstrap and dpkg-dev"),
    pytest.mark.peer("mosquitto", "storescu"),
]

UNIT = "edge-agent"
STATE = "/var/lib/edge-agent"
DROPIN = "/etc/systemd/system/edge-agent.service.d/test.conf"
# Short enough for a test, long enough for a busy 2-core machine: the daemon judges a
# stage stuck after STAGE_DEADLINE s, systemd acts WATCHDOG s after the last ping.
STAGE_DEADLINE = 5
WATCHDOG = 10
BOOT_PACKAGES = ("systemd", "systemd-sysv", "dbus")


@dataclass
class Booted:
    machine: Machine
    box: Box  # host-side view: pki under the root, the ports
    ops: Subscriber
    keys: dict[str, bytes]  # the plain key files (kek, pseudonym) as provisioned
    pseudonym: bytes  # the pseudonym key, kept by the test to name studies
    work: Path

    def study(self, name: str) -> tuple[list[Path], str]:
        """A fresh 3-instance study; returns its files and its ref in results."""
        from tests.test_e2e import make_study

        folder = self.work / name
        folder.mkdir()
        files, _phi = make_study(folder)
        uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        return files, Pseudonymizer(self.pseudonym).uid(uid)

    def send(self, name: str) -> str:
        files, ref = self.study(name)
        sent = storescu(self.box.dicom_port, files)
        assert sent.returncode == 0, sent.stdout + sent.stderr  # acknowledged: durable
        return ref

    def results(self, ref: str) -> list[dict[str, object]]:
        return [m.json() for m in self.ops.on("results")
                if m.json()["data"]["study"]["ref"] == ref]

    def wait_result(self, ref: str, timeout: float = 180) -> dict[str, object]:
        wait_for(lambda: self.results(ref), timeout, f"the result of study {ref[:24]}")
        [res] = {json.dumps(r, sort_keys=True): r for r in self.results(ref)}.values()
        assert res["data"]["study"]["instances_received"] == 3  # type: ignore[index]
        return res

    def dropin(self, text: str | None) -> None:
        """Install (or remove, None) the test's drop-in and reload systemd."""
        path = self.machine.root / DROPIN.lstrip("/")
        if text is None:
            path.unlink(missing_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("[Service]\n" + text)
        self.machine.run("systemctl daemon-reload")

    def show(self, *props: str) -> dict[str, str]:
        return self.machine.show(UNIT, *props)

    def active(self) -> dict[str, str]:
        return self.show("ActiveState", "SubState", "NRestarts", "MainPID", "StatusText")


def package_depends(deb: Path) -> tuple[str, ...]:
    raw = subprocess.run(["dpkg-deb", "-f", str(deb), "Depends"], capture_output=True,
                         text=True, check=True).stdout
    return tuple(re.split(r"[\s(|]", alt.strip(), maxsplit=1)[0] for alt in raw.split(","))


def provision_script(dicom: int, mqtt: int) -> str:
    """What an installer does on the box, with the installed CLI: a development box
    (test faults need one) laid out where the unit expects it, then the KEK and the
    pseudonym key moved into encrypted credentials (operator-guide.md, section 2)."""
    return f"""set -e
edge-agent provision dev --state-dir {STATE} --models-dir {STATE}/models \
    --dicom-port {dicom} --mqtt-port {mqtt} --json > /root/devbox.json
# The unit reads /etc/edge-agent/agent.toml: the dev box's config with absolute paths.
sed -e 's#^state_dir = "state"#state_dir = "{STATE}/state"#' \
    -e 's#= "keys/#= "{STATE}/keys/#' -e 's#= "pki/#= "{STATE}/pki/#' \
    {STATE}/agent.toml > /etc/edge-agent/agent.toml
printf '\\n[watchdog]\\nstage_deadline_seconds = {STAGE_DEADLINE}\\n' >> /etc/edge-agent/agent.toml
chown root:edge-agent /etc/edge-agent/agent.toml
chmod 0640 /etc/edge-agent/agent.toml
cp {STATE}/keys/kek.key {STATE}/keys/pseudonym.key /root/
for k in kek pseudonym; do
    systemd-creds encrypt --name=$k {STATE}/keys/$k.key /etc/credstore.encrypted/edge-agent.$k
    rm {STATE}/keys/$k.key
done
chown -R edge-agent:edge-agent {STATE}
"""


@pytest.fixture(scope="module")
def booted(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
           deb_builder: DebBuilder) -> Iterator[Booted]:
    assert SUITE is not None
    require_peer("mosquitto")
    if not shutil.which("systemd-nspawn"):
        pytest.skip("systemd-nspawn is missing (tools/setup.sh system installs systemd-container)")
    work = tmp_path_factory.mktemp("systemd")
    deb = deb_builder.build(VERSION, lint=False).deb  # test_deb's build when it ran first
    # The root has what the package depends on already: it installs with no network.
    include = tuple(dict.fromkeys((*BOOT_PACKAGES, *package_depends(deb))))
    digest = hashlib.sha256(" ".join(sorted(include)).encode()).hexdigest()[:12]
    tar = root_tar(SUITE, include, f"systemd-{digest}")  # rebuilt when the Depends change

    root = work / "root"
    root.mkdir()
    subprocess.run(["tar", "-C", str(root), "--numeric-owner", "-xpf", str(tar)], check=True,
                   timeout=600)
    # debootstrap writes no /etc/hosts; an installed Debian has one ("localhost" is
    # the dev box's broker host)
    (root / "etc/hosts").write_text("127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost\n")
    shutil.copy(deb, root / "root")  # not /tmp: the booted system mounts a tmpfs there

    machine = Machine(root, work / "nspawn.log")
    keep = True
    broker: subprocess.Popen[bytes] | None = None
    ops: Subscriber | None = None
    try:
        try:
            machine.boot()
        except KernelRefused as exc:
            pytest.skip(f"the kernel refused systemd-nspawn (namespaces/cgroups): {exc}")
        # dpkg in a network namespace of its own: no network at install time
        machine.run(f"unshare --net dpkg -i /root/{deb.name}")
        shutil.copytree(REPO / "models", root / STATE.lstrip("/") / "models", dirs_exist_ok=True)
        dicom, mqtt = free_port(), free_port()
        machine.run(provision_script(dicom, mqtt))
        info = json.loads((root / "root/devbox.json").read_text())
        box = Box(root / STATE.lstrip("/"), info)
        keys = {k: (root / f"root/{k}.key").read_bytes() for k in ("kek", "pseudonym")}
        for k in ("kek", "pseudonym"):
            (root / f"root/{k}.key").unlink()

        # central ops on the host: the dev box's broker config, paths seen from here
        conf = (box.root / "mosquitto.conf").read_text().replace(f"{STATE}/", f"{box.root}/")
        (work / "mosquitto.conf").write_text(conf)
        broker = subprocess.Popen([require_peer("mosquitto"), "-c", str(work / "mosquitto.conf")],
                                  stdout=subprocess.DEVNULL,
                                  stderr=open(work / "mosquitto.log", "wb"))
        wait_port(box.mqtt_port)
        ops = Subscriber(box).start()
        from agent.crypto import load_key_file

        pseudonym = load_key_file(_keep(work, "pseudonym", keys["pseudonym"]), purpose="pseudonym")
        machine.run(f"systemctl enable --now {UNIT}", timeout=180)
        failed = request.session.testsfailed
        yield Booted(machine, box, ops, keys, pseudonym, work)
        if request.session.testsfailed == failed:
            keep = False  # ~800 MB; a failing run keeps it to look into
    finally:
        if ops is not None:
            ops.stop()
        machine.poweroff()
        if broker is not None:
            broker.terminate()
            broker.wait(10)
    if not keep:
        shutil.rmtree(root, ignore_errors=True)


def _keep(work: Path, name: str, data: bytes) -> Path:
    p = work / f"{name}.key"
    p.write_bytes(data)
    p.chmod(0o600)
    return p


# -- READY -------------------------------------------------------------------------------

def test_unit_is_type_notify_and_systemd_gets_ready(booted: Booted) -> None:
    m = booted.machine
    since = m.mark()
    # systemd logs each notification it accepts at debug level
    m.run("systemd-analyze log-level debug")
    try:
        # a start job of a Type=notify unit completes only when READY=1 arrives
        m.run(f"systemctl restart {UNIT}", timeout=180)
    finally:
        m.run("systemd-analyze log-level info")
    s = booted.show("Type", "NotifyAccess", "ActiveState", "SubState", "StatusText", "MainPID",
                    "WatchdogUSec", "Result")
    assert (s["Type"], s["NotifyAccess"]) == ("notify", "main"), s
    assert (s["ActiveState"], s["SubState"], s["Result"]) == ("active", "running", "success"), s
    assert s["WatchdogUSec"] == "1min", s  # the shipped unit's WatchdogSec=60
    # STATUS= reaches systemd only through the notify socket
    assert s["StatusText"] == f"listening on 127.0.0.1:{booted.box.dicom_port}", s
    log = m.journal(since, "-u", UNIT)
    ready = re.search(rf"Got notification message from PID {s['MainPID']} \(READY=1, STATUS=listening",
                      log)
    assert ready, log[-4000:]
    started = log.find("Started edge-agent.service")
    assert started > ready.start(), log[-4000:]  # "Started" follows READY, not the fork


# -- credentials -------------------------------------------------------------------------

def test_keys_arrive_as_encrypted_credentials(booted: Booted) -> None:
    m, root = booted.machine, booted.machine.root
    for k in ("kek", "pseudonym"):
        assert not (root / f"var/lib/edge-agent/keys/{k}.key").exists()  # no plain key file
        sealed = (root / f"etc/credstore.encrypted/edge-agent.{k}").read_bytes()
        assert booted.keys[k].strip() not in sealed
    # sealed with the host key (no TPM2 in this container: `systemd-creds encrypt`
    # then uses /var/lib/systemd/credential.secret alone; docs/operator-guide.md)
    assert m.run("stat -c '%U %a' /var/lib/systemd/credential.secret").stdout.split() == \
        ["root", "400"]
    pid = booted.show("MainPID")["MainPID"]
    creds = m.run(f"tr '\\0' '\\n' < /proc/{pid}/environ | sed -n 's/^CREDENTIALS_DIRECTORY=//p'"
                  ).stdout.strip()
    assert creds == "/run/credentials/edge-agent.service", creds
    listing = m.run(f"stat -c '%n %U %a' {creds}/kek {creds}/pseudonym").stdout.split("\n")
    assert listing[:2] == [f"{creds}/kek edge-agent 400", f"{creds}/pseudonym edge-agent 400"]
    # decrypted by systemd, byte for byte the key the box was provisioned with
    for k in ("kek", "pseudonym"):
        assert m.run(f"cat {creds}/{k}").stdout.encode() == booted.keys[k]
    status = json.loads(m.run("edge-agent status --config /etc/edge-agent/agent.toml --json")
                        .stdout)
    assert status["secrets"]["kek"] == "credential", status["secrets"]
    assert status["secrets"]["pseudonym"] == "credential", status["secrets"]
    # and the box works with them: a study becomes a result (the inbox is sealed
    # under the KEK, the study ref is the keyed pseudonym)
    ref = booted.send("cred")
    booted.wait_result(ref)


# -- the sandbox -------------------------------------------------------------------------

WRITABLE = ("/var/lib/edge-agent", "/var/lib/edge-agent/state", "/run/edge-agent",
            "/var/log/edge-agent", "/tmp", "/var/tmp")
READ_ONLY = ("/", "/etc", "/etc/edge-agent", "/etc/credstore.encrypted", "/etc/systemd/system",
             "/opt/edge-agent", "/opt/edge-agent/.venv/lib/python3.11/site-packages/agent",
             "/usr/bin", "/usr/lib", "/var/lib", "/var/lib/systemd", "/var/cache", "/var/log",
             "/boot", "/srv", "/root", "/home", "/run")

PROBE = """pid=$(systemctl show -P MainPID edge-agent)
for d in "$@"; do
  if nsenter -t "$pid" -m -S "$(id -u edge-agent)" -G "$(id -g edge-agent)" -- \
       sh -c 'echo probe > "$1/.sandbox-probe"' sh "$d" 2>/dev/null; then
    echo "writable $d"
    nsenter -t "$pid" -m -- rm -f "$d/.sandbox-probe"
  else
    echo "refused $d"
  fi
done
"""


def test_sandbox_holds_on_the_live_unit(booted: Booted) -> None:
    m = booted.machine
    pid = booted.show("MainPID")["MainPID"]
    status = dict(line.split(":", 1) for line in m.run(f"cat /proc/{pid}/status").stdout.splitlines())
    uid = m.run("id -u edge-agent").stdout.strip()
    assert status["Uid"].split() == [uid] * 4
    assert status["NoNewPrivs"].strip() == "1" and status["Seccomp"].strip() == "2"
    for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(status[cap], 16) == 0, (cap, status[cap])

    # as the daemon's user, in the daemon's own mount namespace (ProtectSystem=strict,
    # ProtectHome, PrivateTmp as systemd set them up for this very process)
    paths = (*WRITABLE, *READ_ONLY)
    (m.root / "root/probe.sh").write_text(PROBE)
    out = m.run("sh /root/probe.sh " + " ".join(paths)).stdout.split("\n")
    verdict = dict(reversed(line.split(" ", 1)) for line in out if line)
    assert {p for p, v in verdict.items() if v == "writable"} == set(WRITABLE), out
    assert {p for p, v in verdict.items() if v == "refused"} == set(READ_ONLY), out
    # the mounts themselves are read-only, not just the permissions: root with every
    # capability cannot write there either in that namespace
    for d in ("/etc", "/etc/edge-agent", "/opt/edge-agent", "/usr/lib", "/var/lib"):
        p = m.run(f"nsenter -t {pid} -m -- touch {d}/.sandbox-probe", check=False)
        assert p.returncode != 0 and "Read-only file system" in p.stderr, (d, p.stderr)
    # PrivateTmp: the daemon's /tmp is not the system's
    m.run(f"nsenter -t {pid} -m -S {uid} -- sh -c 'echo x > /tmp/daemon-only'")
    assert m.run("test -e /tmp/daemon-only", check=False).returncode == 1

    # the live unit (its drop-ins and the running process), not the file offline
    p = m.run(f"systemd-analyze security {UNIT} --no-pager", check=False)
    level = re.search(r"Overall exposure level for edge-agent\.service: (\d+\.\d+)", p.stdout)
    assert level, p.stdout + p.stderr
    assert float(level.group(1)) <= 1.5, p.stdout[-3000:]


# -- the watchdog ------------------------------------------------------------------------

def test_fault_hooks_are_inert_without_test_mode(booted: Booted) -> None:
    m = booted.machine
    booted.dropin("Environment=EDGE_AGENT_TEST_FAULTS=hang:assembler,hang:publisher\n"
                  f"WatchdogSec={WATCHDOG}\n")
    try:
        since = m.mark()
        m.run(f"systemctl restart {UNIT}", timeout=180)
        ref = booted.send("inert")
        booted.wait_result(ref)
        log = m.journal(since, "-u", UNIT)
        assert "EDGE_AGENT_TEST_FAULTS is set but ignored: EDGE_AGENT_TEST_MODE=1 is not set" in log
        assert "TEST FAULTS ARMED" not in log and "hangs now" not in log, log[-3000:]
        assert booted.show("NRestarts")["NRestarts"] == "0"
    finally:
        booted.dropin(None)


@pytest.mark.parametrize("stage", ["assembler", "publisher"])
def test_a_hung_stage_makes_systemd_restart_the_daemon(booted: Booted, stage: str) -> None:
    m = booted.machine
    booted.dropin("Environment=EDGE_AGENT_TEST_MODE=1\n"
                  f"Environment=EDGE_AGENT_TEST_FAULTS=hang:{stage}\n"
                  f"WatchdogSec={WATCHDOG}\nRestartSec=1\n")
    ref = None
    try:
        since = m.mark()
        m.run(f"systemctl restart {UNIT}", timeout=180)
        first = booted.active()
        assert first["NRestarts"] == "0" and first["ActiveState"] == "active", first
        if stage == "assembler":
            ref = booted.send("hang")  # the assembler hangs when it takes this study
        # the publisher hangs at its first message (status, telemetry) by itself
        wait_for(lambda: int(booted.show("NRestarts")["NRestarts"]) >= 1, 180,
                 "systemd to restart the daemon")
        log = m.journal(since, "-u", UNIT)
        assert f"test fault: stage {stage} hangs now" in log, log[-4000:]
        assert f"stage {stage} is stuck" in log, log[-4000:]
        assert f"Watchdog timeout (limit {WATCHDOG}s)!" in log, log[-4000:]
        assert "Failed with result 'watchdog'" in log, log[-4000:]
        assert "Scheduled restart job, restart counter is at 1." in log, log[-4000:]
        # the journal carries the daemon's own priorities: the stuck stage is an error
        errors = m.journal(since, "-u", UNIT, "-p", "err")
        assert f"stage {stage} is stuck" in errors, errors[-3000:]
        again = booted.active()
        assert again["MainPID"] != first["MainPID"], (first, again)
    finally:
        booted.dropin(None)
        m.run(f"systemctl restart {UNIT}", timeout=180)
    if ref is not None:
        booted.wait_result(ref)  # the study the hung assembler held is not lost


# -- SIGKILL -----------------------------------------------------------------------------

def test_sigkill_is_restarted_and_loses_nothing(booted: Booted) -> None:
    m = booted.machine
    # Hold the assembler, so that nothing can be processed before the kill: every
    # study below is acknowledged (durable) and not yet a result when KILL arrives.
    booted.dropin("Environment=EDGE_AGENT_TEST_MODE=1 EDGE_AGENT_TEST_FAULTS=hang:assembler\n")
    since = m.mark()
    m.run(f"systemctl restart {UNIT}", timeout=180)
    refs = [booted.send(f"kill{i}") for i in range(3)]
    wait_for(lambda: "test fault: stage assembler hangs now" in m.journal(since, "-u", UNIT),
             60, "the assembler to take the first study")
    assert not any(booted.results(r) for r in refs)
    before = booted.active()
    booted.dropin(None)  # the restart runs the shipped unit again
    since = m.mark()
    m.run(f"systemctl kill -s KILL {UNIT}")
    wait_for(lambda: (booted.active()["ActiveState"] == "active"
                      and booted.active()["MainPID"] not in ("0", before["MainPID"])), 120,
             "systemd to restart the killed daemon")
    assert int(booted.show("NRestarts")["NRestarts"]) == int(before["NRestarts"]) + 1
    log = m.journal(since, "-u", UNIT)
    assert "Main process exited, code=killed, status=9/KILL" in log, log[-3000:]
    assert "Failed with result 'signal'" in log, log[-3000:]
    for ref in refs:
        booted.wait_result(ref)


# -- stop --------------------------------------------------------------------------------

def test_stop_drains_and_keeps_what_it_did_not_finish(booted: Booted) -> None:
    m = booted.machine
    assert booted.show("ActiveState")["ActiveState"] == "active"
    ref = booted.send("stop")  # acknowledged: durable from here on
    since = m.mark()
    m.run(f"systemctl stop {UNIT}", timeout=300)  # returns when the unit is down
    s = booted.show("ActiveState", "Result", "ExecMainCode", "ExecMainStatus")
    # it exited by itself with 0 (code 1 = CLD_EXITED), not killed after TimeoutStopSec
    assert (s["ActiveState"], s["Result"]) == ("inactive", "success"), s
    assert (s["ExecMainCode"], s["ExecMainStatus"]) == ("1", "0"), s
    log = m.journal(since, "-u", UNIT)
    assert "Stopping edge-agent.service" in log
    assert "stop requested (signal 15): closing intake, draining" in log, log[-3000:]
    assert "edge-agent stopped" in log and "Deactivated successfully" in log, log[-3000:]
    assert "SIGKILL" not in log and "Killing process" not in log, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    # finished before the stop, or kept in the encrypted inbox for the next start
    m.run(f"systemctl start {UNIT}", timeout=180)
    res = booted.wait_result(ref)
    assert len({r["id"] for r in booted.results(ref)}) == 1, res  # type: ignore[index]
