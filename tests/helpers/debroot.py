"""A clean Debian root to install packages into, the way a new edge box starts.

Built once with `debootstrap --variant=minbase` from the Debian mirror this machine's
apt uses, cached as a tar outside the repo (/var/cache/edge-agent-test, or
$EDGE_AGENT_TEST_CACHE) and unpacked fresh for every test.  Commands run in it with
`chroot` inside a private mount namespace (`unshare --mount`), which mounts /proc for
them and takes the mount away when they exit: nothing is left mounted on the host.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

CACHE = Path(os.environ.get("EDGE_AGENT_TEST_CACHE", "/var/cache/edge-agent-test"))
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
CLEAN_ENV = ["env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8", "HOME=/root",
             "DEBIAN_FRONTEND=noninteractive"]


def codename() -> str | None:
    try:
        text = Path("/etc/os-release").read_text()
    except OSError:
        return None
    if not re.search(r"^ID=\"?debian\"?$", text, re.M):
        return None
    m = re.search(r"^VERSION_CODENAME=\"?(\w+)\"?$", text, re.M)
    return m.group(1) if m else None


@dataclass(frozen=True)
class Source:
    uri: str
    suite: str


def _stanzas(text: str) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    cur: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        if not line.strip():
            if cur:
                out.append(cur)
            cur = {}
            continue
        if line[0].isspace():
            continue  # a continuation (e.g. an inline key): not needed here
        key, _, value = line.partition(":")
        cur[key.strip().lower()] = value.strip()
    if cur:
        out.append(cur)
    return out


def host_debian_sources(suite: str) -> list[Source]:
    """The Debian main-archive entries of this machine's apt sources, both formats:
    the same mirror (and its -updates/-security suites) the root is to use."""
    wanted = {suite, f"{suite}-updates", f"{suite}-security"}
    found: list[Source] = []
    apt = Path("/etc/apt")
    lists = [apt / "sources.list", *sorted((apt / "sources.list.d").glob("*.list"))]
    for f in lists:
        if not f.is_file():
            continue
        for line in f.read_text().splitlines():
            words = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()
            if len(words) >= 4 and words[0] == "deb" and words[2] in wanted and "main" in words[3:]:
                found.append(Source(words[1], words[2]))
    for f in sorted((apt / "sources.list.d").glob("*.sources")):
        for st in _stanzas(f.read_text()):
            if st.get("enabled", "yes") == "no" or "deb" not in st.get("types", "").split():
                continue
            if "main" not in st.get("components", "").split():
                continue
            for uri in st.get("uris", "").split():
                found += [Source(uri, s) for s in st.get("suites", "").split() if s in wanted]
    return list(dict.fromkeys(found))


def _sources_file(sources: list[Source]) -> str:
    return "\n".join(f"Types: deb\nURIs: {s.uri}\nSuites: {s.suite}\nComponents: main\n"
                     f"Signed-By: {KEYRING}\n" for s in sources)


def root_tar(suite: str, include: tuple[str, ...] = (), flavour: str = "") -> Path:
    """The cached clean root, built on first use (about a minute with a near mirror).
    ``include``: more packages debootstrap installs (e.g. systemd to boot the root),
    cached apart under ``flavour`` (bookworm-systemd-root.tar)."""
    tar = CACHE / (f"{suite}-{flavour}-root.tar" if flavour else f"{suite}-root.tar")
    if tar.exists():
        return tar
    sources = host_debian_sources(suite)
    mirror = next((s.uri for s in sources if s.suite == suite), None)
    if mirror is None:
        raise RuntimeError(f"no Debian '{suite}' main entry in /etc/apt/sources.list(.d) "
                           "to build the test root from")
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two test runs build it once
        if tar.exists():
            return tar
        with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
            root = Path(tmp) / "root"
            extra = [f"--include={','.join(include)}"] if include else []
            p = subprocess.run(["debootstrap", "--variant=minbase", *extra, suite, str(root),
                                mirror],
                               capture_output=True, text=True, timeout=1800)
            if p.returncode != 0:
                raise RuntimeError(f"debootstrap failed:\n{(p.stdout + p.stderr)[-3000:]}")
            (root / "etc/apt/sources.list").unlink(missing_ok=True)
            (root / "etc/apt/sources.list.d/debian.sources").write_text(_sources_file(sources))
            for d in ("var/cache/apt/archives", "var/lib/apt/lists"):
                for f in (root / d).glob("*"):
                    if f.is_file():
                        f.unlink()
            part = Path(tmp) / "root.tar"
            subprocess.run(["tar", "-C", str(root), "--numeric-owner", "-cf", str(part), "."],
                           check=True, timeout=600)
            os.replace(part, tar)
    return tar


class Root:
    """An unpacked copy of the clean root; `run` executes a shell script inside it."""

    def __init__(self, path: Path, tar: Path) -> None:
        self.path = path
        path.mkdir(parents=True)
        subprocess.run(["tar", "-C", str(path), "--numeric-owner", "-xpf", str(tar)], check=True,
                       timeout=600)
        shutil.copy("/etc/resolv.conf", path / "etc/resolv.conf")  # to reach the mirror

    def command(self, script: str, *, network: bool = True) -> list[str]:
        # --kill-child: the chrooted process dies with us, never outlives the test.
        return ["unshare", "--mount", "--propagation", "private", "--fork", "--kill-child",
                *([] if network else ["--net"]), "sh", "-c",
                'r=$1; shift; mount -t proc proc "$r/proc" && exec chroot "$r" "$@"', "sh", str(self.path),
                *CLEAN_ENV, "sh", "-c", script]

    def run(self, script: str, *, network: bool = True, check: bool = True,
            timeout: float = 900) -> subprocess.CompletedProcess[str]:
        p = subprocess.run(self.command(script, network=network), capture_output=True, text=True,
                           timeout=timeout)
        if check and p.returncode != 0:
            raise AssertionError(f"in the root: {script}\nexit {p.returncode}\n"
                                 f"{(p.stdout + p.stderr)[-4000:]}")
        return p

    def __truediv__(self, rel: str) -> Path:
        return self.path / rel.lstrip("/")
