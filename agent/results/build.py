"""Every result object of one study version, and how they are written to files.

Which objects a result gets: an SR when a model concluded something; per model
with an explanation region a GSPS (grayscale sources) and a key image (when the
link holds the explained pixels); a SEG only for a model whose manifest
declares a mask output and that gave one.  An object that cannot be built is
reported with its reason, never half-written.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset

from agent.errors import ResultError
from agent.infer.manifest import MaskOutput
from agent.results.common import Issuer, Kind
from agent.results.gsps import build_gsps, explained, is_grayscale
from agent.results.keyimage import build_key_image
from agent.results.link import LinkRecord, has_sr
from agent.results.seg import build_seg
from agent.results.sr import build_sr
from agent.types import ModelOutput


@dataclass(frozen=True)
class ResultObject:
    kind: Kind
    model: str  # "" for the SR (all models)
    dataset: Dataset = field(repr=False)

    @property
    def sop_instance_uid(self) -> str:
        return str(self.dataset.SOPInstanceUID)

    def file_name(self, version: int) -> str:
        """Kind, version and model only: never a value taken from the study."""
        model = "".join(c if c.isalnum() or c in "-_." else "_" for c in self.model)
        return f"{self.kind}-v{version}" + (f"-{model}" if model else "") + ".dcm"


@dataclass(frozen=True)
class Mask:
    """A model's mask on one source image, with the manifest's declaration of it."""

    spec: MaskOutput
    index: int
    pixels: npt.NDArray[np.bool_] = field(repr=False)


def _seg(issuer: Issuer, rec: LinkRecord, m: ModelOutput, given: Mask | None) -> Dataset:
    mask = given or _linked_mask(m)
    if mask is None:
        raise ResultError(f"model {m.name}: no mask")
    return build_seg(issuer, rec, m, mask.spec, mask.index, mask.pixels)


def _linked_mask(m: ModelOutput) -> Mask | None:
    """The segment a mask model gave (kept in the link with the result), if any.  The
    link carries the manifest's segment description with it, so a SEG is built even
    after that model version was deactivated."""
    seg = m.mask
    if seg is None:
        return None
    try:
        pixels = seg.pixels()
    except ValueError as exc:
        raise ResultError(f"model {m.name}: {exc}") from None
    return Mask(MaskOutput("", seg.label, 0.5, seg.category, seg.type), seg.index, pixels)


def build_all(issuer: Issuer, rec: LinkRecord, *,
              masks: Mapping[str, Mask] | None = None,
              ) -> tuple[list[ResultObject], list[str]]:
    """(objects, reasons an object was not made)."""
    objects: list[ResultObject] = []
    skipped: list[str] = []

    def attempt(kind: Kind, model: str, make: object) -> None:
        try:
            objects.append(ResultObject(kind, model, make()))  # type: ignore[operator]
        except ResultError as exc:
            skipped.append(f"{kind}{' ' + model if model else ''}: {exc}")

    if not has_sr(rec.result):
        skipped.append(f"sr: no model output to report (status {rec.result.status})")
        return objects, skipped
    attempt("sr", "", lambda: build_sr(issuer, rec))
    for m in rec.result.models:
        found = explained(rec, m)
        if found is None:
            skipped.append(f"gsps/sc {m.name}: the model gave no explanation region")
        else:
            if is_grayscale(rec.sources[found[0]]):
                attempt("gsps", m.name, lambda m=m: build_gsps(issuer, rec, m))
            else:
                skipped.append(f"gsps {m.name}: the explained image is in colour")
            attempt("sc", m.name, lambda m=m: build_key_image(issuer, rec, m))
        given = (masks or {}).get(m.name)
        if given is not None or m.mask is not None:
            attempt("seg", m.name, lambda m=m, given=given: _seg(issuer, rec, m, given))
    return objects, skipped


def write_objects(objects: list[ResultObject], version: int, out: Path) -> list[Path]:
    """Write each object as a Part 10 file, 0600 in a 0700 folder (they carry PHI)."""
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    paths = []
    for obj in objects:
        path = out / obj.file_name(version)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            obj.dataset.save_as(fh, enforce_file_format=True)
        paths.append(path)
    return paths
