"""A mask model's segment in the encrypted result link, and the DICOM SEG built from it:
sealed under the box KEK with the rest of the record, shredded with it, and a SEG
that references the original source image and passes dciodvfy."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from agent.errors import StorageError
from agent.infer import InferenceEngine, InferenceSettings
from agent.results.build import build_all
from tests.helpers.results import DCIODVFY, DEV_PUB, REPO, dciodvfy_errors, link
from training.synth import make_case

SEG_MODEL = REPO / "models" / "available" / "lesion-seg" / "1.0.0"


@pytest.fixture(scope="module")
def seg_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InferenceEngine]:
    root = tmp_path_factory.mktemp("seg-engine")
    shutil.copytree(SEG_MODEL, root / "models" / "lesion-seg" / "1.0.0")
    eng = InferenceEngine(InferenceSettings(root / "models", root / "state",
                                            publisher_keys=(DEV_PUB,)))
    yield eng
    eng.close()


def test_the_mask_is_sealed_in_the_link_and_shredded_with_it(
        tmp_path: Path, seg_engine: InferenceEngine) -> None:
    ln = link(tmp_path, seg_engine)
    (m,) = ln.record.result.models
    assert m.mask is not None, m.explanation
    pixels = m.mask.pixels()
    # Read back from the store: the same segment, with its codes.
    assert m.mask.label == "lesion" and m.mask.type[0] == "52988006"
    # At rest only ciphertext: neither the packed bits nor the source UIDs appear.
    ln.store.close()
    raw = b"".join(p.read_bytes() for p in (tmp_path / "results").iterdir())
    assert m.mask.bits not in raw
    assert all(uid.encode() not in raw for uid in ln.originals.sop_uids)
    from agent.results.link import LinkStore

    store = LinkStore(tmp_path / "results" / "links.db", ln.kek)
    try:
        again = store.get(ln.record.study_ref, 1).result.models[0].mask
        assert again is not None and np.array_equal(again.pixels(), pixels)
        assert store.release(ln.record.study_ref, 1)
        with pytest.raises(StorageError, match="shredded"):
            store.get(ln.record.study_ref, 1)
    finally:
        store.close()


@pytest.mark.skipif(DCIODVFY is None, reason="dicom3tools (dciodvfy) not installed")
def test_the_seg_references_the_source_and_passes_dciodvfy(
        tmp_path: Path, seg_engine: InferenceEngine) -> None:
    ln = link(tmp_path, seg_engine)
    objects, skipped = build_all(ln.issuer, ln.record)
    by_kind = {o.kind: o for o in objects}
    assert "seg" in by_kind, skipped
    seg = by_kind["seg"].dataset
    (m,) = ln.record.result.models
    assert m.mask is not None
    src = seg.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0] \
        .SourceImageSequence[0].ReferencedSOPInstanceUID
    assert src == ln.originals.sop_uids[m.mask.index]
    assert seg.StudyInstanceUID == ln.originals.study_uid
    got = seg.pixel_array.astype(bool)
    got = got[0] if got.ndim == 3 else got
    assert np.array_equal(got, m.mask.pixels())
    # original_study plants a lesion in every image (make_case(5, i, ...)).
    truth = make_case(5, m.mask.index, kind="ct", noise="low", lesion=True).lesion_mask
    assert truth is not None and int((got & truth).sum()) > 0
    assert dciodvfy_errors(seg, tmp_path / "seg.dcm") == []
