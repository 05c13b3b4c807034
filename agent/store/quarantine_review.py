"""The privacy officer's actions on a quarantined instance (``edge-agent quarantine``).

``show``: the pixels of one frame as a PNG, for a human on the box.  The daemon
returns the PNG bytes over the control socket and the CLI writes them 0600 into a
file the officer owns; the PNG carries pixels only (no text chunk, no header value).

``release``: the instance goes on through de-identification and inference so a
result comes out.  Either the officer names a configured ``[[deid.pixel_clean]]``
rule (by its position, 1-based) that must match the instance's device and size: its
rectangles are blacked out as for any matching instance; or the officer attests that
the pixels are clean: the instance is de-identified as if BurnedInAnnotation were NO,
and the audit record names the officer and the attestation.  An encapsulated
document cannot be attested (its content is not pixels).  Once the result is durable
in the outbox the item is crypto-shredded.

``purge``: crypto-shred the item (agent/store/quarantine.py).
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from agent.deid import Deidentifier, PixelCleanRule, burnedin
from agent.errors import DeidError, EdgeAgentError
from agent.pipeline import parse_instance
from agent.store.quarantine import Item, Quarantine
from agent.subgroups import capture
from agent.types import DeidentifiedStudy, InferenceResult, PhiFingerprint

if TYPE_CHECKING:
    from agent.daemon import Daemon

log = logging.getLogger(__name__)

MAX_PNG_SIDE = 4096  # larger frames are scaled down: a look, not a diagnostic copy


class ReleaseRefused(EdgeAgentError):
    """A release that cannot be done as asked (the item stays in quarantine)."""


def render_png(raw: bytes) -> bytes:
    """The first frame of a DICOM instance as an 8-bit PNG (pixels only)."""
    ds = parse_instance(raw)
    try:
        arr = np.asarray(ds.pixel_array)
    except Exception as exc:  # noqa: BLE001 - any decoder failure is one answer
        raise EdgeAgentError(f"the pixels of this instance cannot be decoded "
                             f"({type(exc).__name__})",
                             hint="it can only be purged, or released by an attestation "
                                  "after looking at it with another viewer") from None
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if frames > 1:
        arr = arr[0]
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    if samples == 3:
        img = Image.fromarray(_to_uint8(arr), "RGB")
    else:
        img8 = _to_uint8(arr)
        if photometric == "MONOCHROME1":
            img8 = 255 - img8
        img = Image.fromarray(img8, "L")
    if max(img.size) > MAX_PNG_SIDE:
        img.thumbnail((MAX_PNG_SIDE, MAX_PNG_SIDE))
    out = io.BytesIO()
    img.save(out, "PNG")  # Pillow writes no text chunk unless given pnginfo
    return out.getvalue()


def _to_uint8(arr: Any) -> Any:
    a = np.asarray(arr, dtype=np.float64)
    lo, hi = float(a.min()), float(a.max())
    if hi <= lo:
        return np.zeros(a.shape, dtype=np.uint8)
    return ((a - lo) * (255.0 / (hi - lo))).round().astype(np.uint8)


@dataclass(frozen=True)
class Released:
    item: Item
    event_id: str
    status: str
    how: str  # "rule N" or "attested"


def configured_rules(d: Daemon) -> tuple[PixelCleanRule, ...]:
    return tuple(PixelCleanRule(r.manufacturer, r.model, r.rows, r.columns, r.rectangles)
                 for r in d.cfg.deid.pixel_clean)


def release(d: Daemon, item_id: int, *, rule: int | None, attest: bool) -> Released:
    """De-identify (with the named rule, or under the officer's attestation), infer,
    enqueue the result, then purge the item.  Raises ReleaseRefused, item kept."""
    q: Quarantine = d.quarantine
    if (rule is None) == (not attest):
        raise ReleaseRefused("name exactly one of --rule N or --attest-clean",
                             hint="--rule N applies the N-th [[deid.pixel_clean]] rule; "
                                  "--attest-clean records that you checked the pixels")
    item = q.get(item_id)
    ds = parse_instance(q.read(item_id))
    # Age band and sex for the review store, from the original, as the pipeline does.
    patient = capture(ds, d.pipeline.patient_subgroups())
    if rule is not None:
        rules = configured_rules(d)
        if not 1 <= rule <= len(rules):
            raise ReleaseRefused(f"there is no pixel-clean rule {rule} ({len(rules)} configured)",
                                 hint="add a [[deid.pixel_clean]] rule for this device "
                                      "(docs/configuration.md), or attest the pixels clean")
        chosen = rules[rule - 1]
        if burnedin.is_encapsulated_document(ds) or burnedin.matching_rule(ds, (chosen,)) is None:
            raise ReleaseRefused(
                f"pixel-clean rule {rule} does not match this instance (device model or "
                "image size differ)",
                hint="'edge-agent quarantine show' and the rule's manufacturer, model, rows "
                     "and columns must agree")
        settings = replace(d.deidentifier_settings, pixel_clean=(chosen,))
        how = f"rule {rule}"
    else:
        if burnedin.is_encapsulated_document(ds):
            raise ReleaseRefused("an encapsulated document cannot be attested clean: its "
                                 "content is not pixels you have looked at",
                                 hint="purge it with 'edge-agent quarantine purge'")
        # The officer looked at the pixels: the burned-in rule has been answered.
        ds.BurnedInAnnotation = "NO"
        settings = replace(d.deidentifier_settings, pixel_clean=())
        how = "attested"
    try:
        outcome = Deidentifier(settings, d.pseudonym_key, d.pseudonymizer).deidentify(ds)
    except DeidError as exc:
        raise ReleaseRefused(f"the instance cannot be de-identified: {exc}",
                             hint="purge it with 'edge-agent quarantine purge'") from None
    if outcome.dataset is None:
        code = burnedin.reason_code(outcome.quarantine_reason or "")
        raise ReleaseRefused(f"the instance stays quarantined ({code})",
                             hint="its pixels could not be cleaned with that rule")
    now = item.at
    dstudy = DeidentifiedStudy(
        study_ref=outcome.study_ref, patient_ref=outcome.patient_ref, version=1,
        instances=(outcome.dataset,), quarantined=(), failed=(),
        method=d.deidentifier.describe(), options=tuple(sorted(d.cfg.deid.options)),
        received_instances=1, first_received_at=now, last_received_at=now)
    phi = PhiFingerprint(frozenset(outcome.phi))
    result: InferenceResult = d.pipeline.with_patient_subgroups(d.pipeline.infer(dstudy),
                                                                 [patient])
    eid, payload = d.pipeline.payload_for(item.study_key, f"released:{item.instance_key}",
                                          result, linked=False)  # no link: not delivered
    d.outbox.enqueue("results", eid, payload, phi)
    if d.pipeline.on_result is not None:  # a flagged result waits for review like any other
        d.pipeline.on_result(eid, result)
    q.purge(item_id)  # the result is durable: the original goes
    return Released(item, eid, result.status, how)
