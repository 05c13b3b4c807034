"""The transfer form of a model package: one deterministic tar of its flat folder.

Central ops packs the package folder (model.onnx, manifest.toml, its .sig,
MODEL_CARD.md) into an uncompressed tar with fixed metadata, so the same folder
always gives the same bytes and the same sha256, which the approvers sign into
the deployment document.  The box unpacks only regular files with plain names
into a fresh folder; the package's own signature is checked after that by the
model registry, as for ``models install``.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

from agent.errors import EdgeAgentError

# What a package folder may hold (agent/infer/registry.py reads these).
MEMBERS = ("manifest.toml", "manifest.toml.sig", "model.onnx", "MODEL_CARD.md")
MAX_MEMBERS = 16


def pack(folder: Path) -> bytes:
    """The package folder as a tar: sorted plain files, fixed owner, mode and time."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(folder.iterdir()):
            if not path.is_file() or path.name.startswith("."):
                continue
            data = path.read_bytes()
            info = tarfile.TarInfo(path.name)
            info.size = len(data)
            info.mode = 0o644
            info.mtime = 0
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def unpack(archive: Path, dest: Path) -> None:
    """Extract plain files with plain names into ``dest`` (created); refuse anything else."""
    dest.mkdir(parents=True, exist_ok=False, mode=0o700)
    try:
        with tarfile.open(archive, mode="r:") as tar:
            members = tar.getmembers()
            if len(members) > MAX_MEMBERS:
                raise EdgeAgentError(f"package archive holds {len(members)} entries")
            for m in members:
                if not m.isreg() or "/" in m.name or "\\" in m.name or m.name in ("", ".", ".."):
                    raise EdgeAgentError(f"package archive entry {m.name!r} is not a plain file")
                src = tar.extractfile(m)
                if src is None:
                    raise EdgeAgentError(f"package archive entry {m.name!r} is unreadable")
                with src, (dest / m.name).open("xb") as out:
                    while block := src.read(1 << 20):
                        out.write(block)
    except tarfile.TarError as exc:
        raise EdgeAgentError(f"package archive is not a readable tar ({exc})") from None
