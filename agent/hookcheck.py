"""Proof, at start, that every hook the DICOM node puts into pynetdicom took effect.

Until the node has an acceptor of its own (no patching of library internals),
it relies on replacing a few pynetdicom module attributes and methods: the
temporary file of a C-STORE data set (else instances land in plaintext temp
files), the PDU reader (bounds and deadlines), the file meta encoding, the
command set encoder, the reactors' clock.  A pynetdicom release that renames or
re-imports one of these would make its replacement silently ineffective, so:

* pynetdicom is pinned exactly (pyproject.toml) and its version is checked;
* each replaced attribute must be ours after installation (identity);
* each pynetdicom function that should reach a replacement must still name it,
  and, for module globals, look it up in the module that was patched.

Any problem stops the node before it listens (InstallError, exit 2).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import FunctionType, ModuleType
from typing import Any

import pynetdicom

from agent.errors import InstallError

# Keep equal to the pin in pyproject.toml (a test checks both).
PYNETDICOM_PINNED = "3.0.4"


@dataclass(frozen=True)
class Hook:
    what: str
    owner: Any  # the module or class whose attribute is replaced
    name: str
    ours: Callable[[Any], bool]  # is the attribute now ours?
    used_by: tuple[Callable[..., Any], ...] = ()  # must reach it by this name
    # The name is a global of ``owner`` (a module) that ``used_by`` look up in
    # their own module's namespace, which must then be ``owner``'s.
    module_global: bool = False


def is_(obj: object) -> Callable[[Any], bool]:
    return lambda value: value is obj


def problems(hooks: Sequence[Hook], version: str | None = None) -> list[str]:
    """What is wrong with the installed hooks (empty when every one took effect)."""
    found = []
    installed = pynetdicom.__version__ if version is None else version
    if installed != PYNETDICOM_PINNED:
        found.append(f"pynetdicom {installed} is installed; this release needs exactly "
                     f"{PYNETDICOM_PINNED}")
    for hook in hooks:
        value = getattr(hook.owner, hook.name, None)
        if not hook.ours(value):
            found.append(f"{hook.what}: {_where(hook)} is not edge-agent's replacement")
        for fn in hook.used_by:
            code = getattr(fn, "__code__", None)
            if not isinstance(fn, FunctionType) or code is None:
                found.append(f"{hook.what}: {fn!r} is not a plain function any more")
                continue
            if hook.name not in code.co_names:
                found.append(f"{hook.what}: {fn.__qualname__} no longer uses {hook.name}")
            elif (hook.module_global and isinstance(hook.owner, ModuleType)
                  and fn.__globals__ is not vars(hook.owner)):
                found.append(f"{hook.what}: {fn.__qualname__} looks {hook.name} up elsewhere "
                             f"than {hook.owner.__name__}")
    return found


def verify(hooks: Sequence[Hook]) -> None:
    """Raise InstallError unless every hook took effect."""
    found = problems(hooks)
    if found:
        raise InstallError(
            "the DICOM node cannot run safely on this pynetdicom installation: "
            + "; ".join(found),
            hint=f"install exactly pynetdicom=={PYNETDICOM_PINNED} "
                 "(reinstall edge-agent into its virtualenv) and start again",
        )


def _where(hook: Hook) -> str:
    owner = getattr(hook.owner, "__qualname__", None) or getattr(hook.owner, "__name__", "?")
    return f"{owner}.{hook.name}"
