"""The Debian package, installed the way hospital IT installs software.

`make deb` builds two versions; lintian finds no error in them; `apt-get install
./edge-agent_X_amd64.deb` into a clean Debian root creates the account and folders;
the installed CLI provisions the box and the installed daemon takes a study to a
result; the next version installs offline (nothing downloads at install time) and
keeps the keys, the state and the edited conffile byte for byte; remove keeps the
state, purge deletes it.

System tier (`make test-system`): root, debootstrap, dpkg-dev, lintian and the Debian
mirror this machine's apt uses.  Two package builds make it a few minutes long.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import stat
import subprocess
import tomllib
from pathlib import Path

import psutil
import pytest

from tests.helpers import REPO, free_port, storescu, wait_for, wait_port
from tests.helpers.debbuild import Built, DebBuilder
from tests.helpers.debroot import Root, codename, root_tar

SUITE = codename()
pytestmark = [
    pytest.mark.system,
    pytest.mark.skipif(os.geteuid() != 0, reason="installs packages into a chroot: needs root"),
    pytest.mark.skipif(SUITE is None, reason="needs a Debian host (the root uses its mirror)"),
    pytest.mark.skipif(not all(shutil.which(t) for t in ("debootstrap", "dpkg-deb", "lintian",
                                                          "unshare", "storescu")),
                       reason="tools/setup.sh system installs debootstrap, lintian, dcmtk"),
]

VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
NEXT = f"{VERSION}+systemtest1"  # sorts after VERSION for dpkg
STATE = "var/lib/edge-agent"
CONF = "etc/edge-agent/agent.toml"


@pytest.fixture(scope="module")
def debs(deb_builder: DebBuilder) -> dict[str, Built]:
    """Both versions through `make deb`; the first one with its lintian run."""
    return {v: deb_builder.build(v, lint=v == VERSION) for v in (VERSION, NEXT)}


def field(deb: Path, name: str) -> str:
    return subprocess.run(["dpkg-deb", "-f", str(deb), name], capture_output=True, text=True,
                          check=True).stdout.strip()


def test_package_metadata_and_contents(debs: dict[str, Built]) -> None:
    deb = debs[VERSION].deb
    assert deb.name == f"edge-agent_{VERSION}_amd64.deb"
    assert field(deb, "Version") == VERSION and field(deb, "Architecture") == "amd64"
    depends = field(deb, "Depends")
    assert re.search(r"\bpython3\.11\b", depends) and re.search(r"\blibc6 \(>= ", depends)
    ctrl = subprocess.run(["dpkg-deb", "-I", str(deb), "conffiles"], capture_output=True,
                          text=True, check=True).stdout.split()
    assert ctrl == ["/etc/edge-agent/agent.toml"]
    files = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True,
                           check=True).stdout
    paths = {line.split()[5].lstrip(".") for line in files.splitlines()}
    for want in ("/opt/edge-agent/.venv/bin/edge-agent", "/opt/edge-agent/.venv/pyvenv.cfg",
                 "/lib/systemd/system/edge-agent.service", "/usr/lib/sysusers.d/edge-agent.conf",
                 "/usr/lib/tmpfiles.d/edge-agent.conf", "/etc/edge-agent/agent.toml",
                 "/usr/share/doc/edge-agent/copyright", "/usr/bin/edge-agent"):
        assert want in paths, want
    # byte-code is compiled by postinst, never shipped (it would name the build folder)
    assert not [p for p in paths if "__pycache__" in p or p.endswith(".pyc")]
    # every runtime dependency from the lock, and nothing for building or testing
    lock = (REPO / "packaging/requirements.lock").read_text()
    pinned = re.findall(r"^([a-z0-9-]+)==(\S+) ", lock, re.M)
    site = "/opt/edge-agent/.venv/lib/python3.11/site-packages/"
    infos = {p[len(site):].split("/")[0].lower() for p in paths
             if p.startswith(site) and ".dist-info" in p}
    for name, version in pinned:
        assert f"{name.replace('-', '_')}-{version}.dist-info" in infos, name
    assert not [i for i in infos if re.match(r"(pip|setuptools|pytest|mypy|ruff)-", i)]


def test_make_deb_runs_lintian_and_it_finds_no_error(debs: dict[str, Built]) -> None:
    # build-deb.sh runs `lintian --fail-on error` last: make deb exiting 0 means no error
    out = debs[VERSION].output
    assert re.search(r"^== \[\d+s\] lintian$", out, re.M), out[-2000:]
    assert not [line for line in out.splitlines() if line.startswith("E: ")], out[-4000:]


# -- the lifecycle on a clean Debian root -------------------------------------------------

def snapshot(top: Path) -> dict[str, tuple[int, int, int, str]]:
    """Every file, folder and link under `top`: mode, owner, group and content hash."""
    out = {}
    for dirpath, dirs, files in os.walk(top):
        for name in (*dirs, *files):
            p = Path(dirpath, name)
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode):
                digest = "-> " + os.readlink(p)
            elif stat.S_ISREG(st.st_mode):
                digest = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                digest = ""
            out[str(p.relative_to(top))] = (st.st_mode, st.st_uid, st.st_gid, digest)
    return out


def status(root: Root) -> str:
    p = root.run("dpkg-query -W -f='${Status} ${Version}' edge-agent", check=False)
    return p.stdout.strip()


def mode_owner(p: Path) -> tuple[int, int, int]:
    st = p.stat()
    return stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid


def run_daemon(root: Root, tmp: Path) -> str:
    """A dev box provisioned by the installed CLI, the installed daemon serving it: a
    C-STORE from DCMTK storescu on the host becomes a result (de-identification and
    onnxruntime inference from the package's venv)."""
    from tests.test_e2e import make_study

    shutil.copytree(REPO / "models", root / "tmp/models")
    dicom, mqtt = free_port(), free_port()
    root.run(f"edge-agent provision dev --state-dir /tmp/devbox --models-dir /tmp/models "
             f"--dicom-port {dicom} --mqtt-port {mqtt}")
    log = tmp / "daemon.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(root.command("exec edge-agent run --config /tmp/devbox/agent.toml"),
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_port(dicom, timeout=180)
        files, _phi = make_study(tmp)
        sent = storescu(dicom, files)
        assert sent.returncode == 0, sent.stderr
        wait_for(lambda: re.search(r"study \S+ -> result", log.read_text()), 180,
                 "the installed daemon to produce a result")
    finally:
        for child in psutil.Process(proc.pid).children():
            child.send_signal(signal.SIGTERM)
        rc = proc.wait(120)
    text = log.read_text()
    assert rc == 0 and "Traceback" not in text, text[-3000:]
    return text


def test_install_provision_upgrade_remove_purge(debs: dict[str, Built], tmp_path: Path) -> None:
    assert SUITE is not None
    root = Root(tmp_path / "root", root_tar(SUITE))
    for b in debs.values():
        shutil.copy(b.deb, root / "tmp")
    first, second = (f"/tmp/{debs[v].deb.name}" for v in (VERSION, NEXT))

    # install with apt from the file, dependencies from the mirror
    root.run(f"apt-get update -qq && apt-get install -y -q --no-install-recommends {first}")
    assert status(root) == f"install ok installed {VERSION}"
    passwd = (root / "etc/passwd").read_text()
    m = re.search(r"^edge-agent:x:(\d+):(\d+):[^:]*:/var/lib/edge-agent:/usr/sbin/nologin$",
                  passwd, re.M)
    assert m, passwd
    uid, gid = int(m.group(1)), int(m.group(2))
    assert 0 < uid < 1000
    groups = (root / "etc/group").read_text()
    for g in ("edge-agent", "edge-agent-admin", "edge-agent-audit", "edge-agent-privacy",
              "edge-agent-review"):
        assert re.search(rf"^{g}:x:\d+:", groups, re.M), g
    for d in ("", "/keys", "/pki", "/models"):
        assert mode_owner(root / (STATE + d)) == (0o700, uid, gid), d
    assert mode_owner(root / "etc/edge-agent") == (0o750, 0, gid)
    assert mode_owner(root / CONF) == (0o640, 0, gid)
    assert not list((root / STATE / "keys").iterdir())  # keys come from provisioning only
    conffiles = root.run("dpkg-query -W -f='${Conffiles}' edge-agent").stdout
    assert "/etc/edge-agent/agent.toml" in conffiles
    # the unit's ExecStart and the package's layout agree
    root.run("systemd-analyze verify /lib/systemd/system/edge-agent.service")
    # the packaged config is unprovisioned: the daemon refuses it with a named error
    refused = root.run("edge-agent run --config /etc/edge-agent/agent.toml", check=False,
                       timeout=120)
    assert refused.returncode != 0 and "box.site" in refused.stdout + refused.stderr
    assert "Traceback" not in refused.stdout + refused.stderr

    # provision the production identity with the installed CLI, then a local edit
    root.run("edge-agent provision init --device-id ct-edge-01 --site st-marys "
             "--mqtt-host mqtt.example.org --config /etc/edge-agent/agent.toml --overwrite-config")
    for name in ("pseudonym", "kek", "audit_signing"):
        assert mode_owner(root / STATE / "keys" / f"{name}.key") == (0o600, uid, gid)
    assert mode_owner(root / STATE / "pki/current/device.key") == (0o600, uid, gid)
    with open(root / CONF, "a") as fh:
        fh.write("# edited by the site's admin\n")
    state, conf = snapshot(root / STATE), (root / CONF).read_bytes()
    assert 'site = "st-marys"' in conf.decode()

    # upgrade to the next version without network: nothing downloads at install time
    root.run(f"dpkg -i {second}", network=False)
    assert status(root) == f"install ok installed {NEXT}"
    assert snapshot(root / STATE) == state
    assert (root / CONF).read_bytes() == conf and mode_owner(root / CONF) == (0o640, 0, gid)
    assert not list((root / "etc/edge-agent").glob("agent.toml.dpkg-*"))
    pycache = root / "opt/edge-agent/.venv/lib/python3.11/site-packages/agent/__pycache__"
    assert list(pycache.glob("*.pyc"))  # postinst byte-compiled the venv
    log = run_daemon(root, tmp_path)
    assert f"edge-agent {VERSION} running (site=dev-site" in log

    # remove: the program goes, the box's state and config stay
    root.run("apt-get remove -y -q edge-agent", network=False)
    assert status(root) == f"deinstall ok config-files {NEXT}"
    assert not (root / "opt/edge-agent").exists() and not (root / "usr/bin/edge-agent").exists()
    assert snapshot(root / STATE) == state and (root / CONF).read_bytes() == conf
    # ... and a reinstall picks them up again
    root.run(f"dpkg -i {second}", network=False)
    assert snapshot(root / STATE) == state and (root / CONF).read_bytes() == conf

    # purge: state, config and the permission overrides are gone; the account stays
    root.run("dpkg --purge edge-agent", network=False)
    assert "ok not-installed" in status(root) or status(root) == ""
    for gone in (STATE, "etc/edge-agent", "opt/edge-agent", "var/log/edge-agent"):
        assert not (root / gone).exists(), gone
    overrides = root.run("dpkg-statoverride --list", check=False).stdout  # exit 1: none left
    assert "edge-agent" not in overrides
    assert re.search(r"^edge-agent:", (root / "etc/passwd").read_text(), re.M)
    shutil.rmtree(root.path)  # ~600 MB; a failing run keeps it to look into
