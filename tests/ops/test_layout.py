"""The package tree follows the data path, and its docstrings say what each package
may import: these rules keep it so.  A new import that breaks one fails here with
the edge to remove (or, when the design really changed, the rule to change along
with the package's docstring)."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers import REPO

# The DICOM node: what receives C-STOREs (being rebuilt into a package of its own).
DICOM_NODE = ("agent.dicom",)
WIRING = ("agent.daemon", "agent.pipeline")

# importer prefix -> prefixes it must not import (module-exact exceptions below)
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "agent.store": ("agent.uplink", *DICOM_NODE, *WIRING),
    "agent.uplink": ("agent.store", "agent.deid", "agent.infer", "agent.results", "agent.audit",
                     *DICOM_NODE, *WIRING),
    "agent.deid": ("agent.store", "agent.infer", "agent.results", "agent.audit", "agent.ops",
                   "agent.identity", "agent.uplink", *DICOM_NODE, *WIRING),
    "agent.infer": ("agent.store", "agent.deid", "agent.results", "agent.audit", "agent.ops",
                    "agent.identity", "agent.uplink", *DICOM_NODE, *WIRING),
    "agent.results": ("agent.store", "agent.uplink", "agent.audit", *DICOM_NODE, *WIRING),
    "agent.audit": ("agent.store", "agent.deid", "agent.infer", "agent.results",
                    *DICOM_NODE, *WIRING),
    "agent.identity": (*DICOM_NODE, *WIRING),
    "agent.review": ("agent.store", "agent.deid", "agent.results", "agent.uplink.publish",
                     "agent.uplink.outbox", *DICOM_NODE, *WIRING),
    "agent.dicom": ("agent.uplink", "agent.deid", "agent.infer", "agent.results", "agent.audit",
                    "agent.identity", *WIRING),
    "agent.errors": ("agent.",),
    "agent.types": ("agent.",),
    "agent.dicomraw": ("agent.",),
    "agent.subgroups": ("agent.",),
    "agent.crypto": ("agent.",),
    # sealed SQLite rows, shared by the outbox and the results queue: below every stage
    "agent.sealedrows": ("agent.",),
    "agent": ("fleet", "provisioning"),
    "fleet": ("agent.store", "agent.deid", "agent.infer", "agent.results", "agent.ops",
              "agent.identity", "agent.uplink.publish", "agent.uplink.outbox", *DICOM_NODE,
              *WIRING),
}
ALLOWED: dict[str, tuple[str, ...]] = {
    # re-runs a quarantined item through the pipeline's parser and the daemon's parts
    "agent.store.quarantine_review": ("agent.pipeline", "agent.daemon"),
    # control commands typed against the daemon they act on (TYPE_CHECKING imports)
    "agent.review.commands": ("agent.daemon",),
    "agent.review.seed": ("agent.daemon",),
    # the fixed words a quarantine reason, finding or failure may use
    "agent.deid.burnedin": ("agent.uplink.vocabulary",),
    # the vault's map is shredded under the same exclusive state lock as key rotation
    "agent.deid.vault": ("agent.identity.keyrotate",),
    # the delivery stage: the one place PHI-bearing objects leave (egresspolicy decides
    # where), and its PHI-free summary (result.delivery) goes to the outbox
    "agent.results.delivery": ("agent.uplink.cloudevents", "agent.uplink.egresspolicy",
                               "agent.uplink.outbox", "agent.uplink.vocabulary"),
    "agent.infer.engine": ("agent.uplink.vocabulary",),
    "agent.infer.pixels": ("agent.uplink.vocabulary",),
    "agent.crypto": ("agent.errors",),
    "agent.sealedrows": ("agent.crypto", "agent.errors"),
    "agent.types": ("agent.errors",),
}


def _module(path: Path) -> str:
    name = ".".join(path.relative_to(REPO).with_suffix("").parts)
    return name.removesuffix(".__init__")


def _imports(path: Path) -> set[str]:
    """Every agent/fleet/provisioning module a file imports, at any depth (lazy ones too)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # "from agent.uplink import egress" imports agent.uplink.egress; "from
            # agent.config import Config" counts as agent.config.Config, inside agent.config
            out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m.split(".")[0] in ("agent", "fleet", "provisioning")}


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix if prefix.endswith(".") else prefix + ".")


def violations() -> list[str]:
    found = []
    for path in sorted([*REPO.glob("agent/**/*.py"), *REPO.glob("fleet/**/*.py")]):
        mod = _module(path)
        for importer, banned in FORBIDDEN.items():
            if not _within(mod, importer):
                continue
            for imported in sorted(_imports(path)):
                if _within(imported, importer) and importer != "agent":
                    continue  # inside its own package
                if any(_within(imported, ok) for ok in ALLOWED.get(mod, ())):
                    continue
                if any(_within(imported, b) for b in banned):
                    found.append(f"{mod} imports {imported} (rule: {importer} must not import it)")
    return found


def test_the_import_rules_see_the_tree() -> None:
    """Guards the checker itself: it finds modules and their imports."""
    pipeline = _imports(REPO / "agent" / "pipeline.py")
    assert any(_within(m, "agent.store.inbox") for m in pipeline)
    assert "agent.uplink.egress" in pipeline  # from agent.uplink import ..., egress, ...
    assert _within("agent.store.inbox", "agent.store") and not _within("agent.storex", "agent.store")


def test_packages_import_only_what_their_docstrings_allow() -> None:
    bad = violations()
    assert not bad, "imports against the layout (see each package's __init__):\n" + "\n".join(bad)


def test_every_package_says_what_it_owns_and_may_import() -> None:
    missing = [str(p.relative_to(REPO)) for p in sorted(REPO.glob("agent/*/__init__.py"))
               if "may import" not in (ast.get_docstring(ast.parse(p.read_text())) or "").lower()]
    assert not missing, f"package docstrings without a 'May import' rule: {missing}"
