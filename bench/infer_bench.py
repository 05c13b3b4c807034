"""Inference latency per study: InferenceEngine against raw InferenceSession.run,
for the explanation and uncertainty methods of two model packages side by side.

    .venv/bin/python -m bench.infer_bench [--studies 24] [--repeats 7] [--threads 1]
                                          [--packages 1.0.0,1.1.0]

Both sides get the same decoded inputs.  The engine's per-study time minus its
own decode time is compared with raw ``InferenceSession.run`` calls on the
very tensors the engine feeds the model (1.0.0: the study batch with its
test-time flips, plus the occlusion batch for the explanation; 1.1.0: the
study batch once, fetching the score and the in-graph map), so the difference
is the pipeline's own overhead: preprocessing, batching, the timeout timer,
aggregation, review rules, the explanation region, hashing, drift aggregates
and audit.  The cost of the clinical extras (uncertainty + explanation) is
reported against a bare single forward pass of the same model: from the raw
runs (what the extras cost onnxruntime) and end to end (the engine's whole
time beyond decoding).  The packages are measured interleaved, study by study,
in the same run.  Writes bench/out/infer_bench.{md,json}.

A third overhead figure needs no
second session: the engine's own time (its total minus its decoding minus the
time inside its onnxruntime calls, ``ModelSession.run_seconds``) relative to
that onnxruntime time, from the very same calls; it moves far less between
runs.  The overhead is taken twice: from wall time and from this process's CPU time
(``time.process_time``; onnxruntime computes in the calling thread with one
intra-op thread).  On a machine shared with other jobs both swing by up to
+-8 points between whole runs (a job on the sibling core slows whichever side
runs at that moment, in CPU time too): run it several times and quote the
median run (docs/models.md does).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from agent.infer import InferenceEngine, InferenceSettings, load_manifest  # noqa: E402
from agent.infer.engine import applies, run_batch  # noqa: E402
from agent.infer.explain import _positions  # noqa: E402
from agent.infer.manifest import Manifest  # noqa: E402
from agent.infer.pixels import iter_images  # noqa: E402
from agent.infer.preprocess import preprocess  # noqa: E402
from agent.infer.session import ModelSession  # noqa: E402
from agent.types import DeidentifiedStudy  # noqa: E402
from training.synth import make_case, to_dataset  # noqa: E402

MODELS = REPO / "models" / "lesion-demo"
Tensor = npt.NDArray[np.float32]
Work = list[tuple[Tensor, list[str]]]  # (batch, outputs fetched) per run


def make_studies(n: int) -> list[DeidentifiedStudy]:
    """Alternating 8-slice CT series and single radiographs, half with a lesion."""
    studies = []
    for s in range(n):
        kind = "ct" if s % 2 == 0 else "radiograph"
        count = 8 if kind == "ct" else 1
        lesion_at = (s // 2) % (count + 1) if s % 4 < 2 else -1
        cases = [make_case(90_000 + s, i, kind=kind, lesion=(i == lesion_at)) for i in range(count)]
        datasets = tuple(to_dataset(c, instance_number=i + 1, study_seed=f"bench{s}")
                         for i, c in enumerate(cases))
        for ds in datasets:
            _ = ds.pixel_array  # decode once so neither side pays first-decode caching
        studies.append(DeidentifiedStudy(f"bench{s}", "p", 1, datasets, (), (), "bench", (),
                                         len(datasets), 0.0, 0.0))
    return studies


def tensors(study: DeidentifiedStudy, m: Manifest) -> Tensor:
    """Decoded pixels -> model tensors with the manifest's preprocessing."""
    selected = [(i, ds) for i, ds in enumerate(study.instances) if applies(m.applies_to, ds)]
    return np.stack([preprocess(img, m.preprocessing)[0]
                     for img in iter_images(selected, m.attributes, m.applies_to.max_images)])


def raw_work(study: DeidentifiedStudy, m: Manifest) -> tuple[Work, Work]:
    """(bare pass, the engine's runs): the exact tensors and outputs the engine runs for
    the manifest's uncertainty and explanation methods."""
    x = tensors(study, m)
    bare: Work = [(x, [m.output_name])]
    views = ([x, x[..., ::-1], x[..., ::-1, :], x[..., ::-1, ::-1]]
             if m.uncertainty == "tta_flip" else [x])
    study_batch = np.ascontiguousarray(np.concatenate(views))
    ex = m.explanation
    if ex.method == "cam":
        return bare, [(study_batch, [m.output_name, ex.output])]  # the map: same run
    work: Work = [(study_batch, [m.output_name])]
    if ex.method == "occlusion":
        # The engine explains the top image; any image costs the same to occlude.
        top = x[0]
        patch, stride = ex.patch, ex.stride
        boxes = [(y, xx) for y in _positions(top.shape[1], patch, stride)
                 for xx in _positions(top.shape[2], patch, stride)]
        occ = np.repeat(top[None], len(boxes), axis=0)
        fill = top.mean(axis=(1, 2), keepdims=True)
        for k, (y, xx) in enumerate(boxes):
            occ[k, :, y : y + patch, xx : xx + patch] = fill
        work.append((occ, [m.output_name]))
    return bare, work


def time_raw(sess: ort.InferenceSession, m: Manifest, work: Work) -> tuple[float, float]:
    """(wall ms, CPU ms) of raw runs of this work, split like the engine splits it."""
    t0, c0 = time.perf_counter(), time.process_time()
    for batch, fetch in work:
        step = run_batch(batch.shape[1:])  # the engine's run batch size
        for start in range(0, len(batch), step):
            sess.run(fetch, {m.input_name: batch[start : start + step]})
    return (time.perf_counter() - t0) * 1000, (time.process_time() - c0) * 1000


def decode_cpu_ms(study: DeidentifiedStudy, m: Manifest) -> float:
    """CPU time of the engine's decode step alone (frames + the manifest's attributes)."""
    selected = [(i, ds) for i, ds in enumerate(study.instances) if applies(m.applies_to, ds)]
    c0 = time.process_time()
    for _ in iter_images(selected, m.attributes, m.applies_to.max_images):
        pass
    return (time.process_time() - c0) * 1000


@dataclass
class Side:
    """One package: an engine that loads only it, and a raw session with its options."""

    version: str
    manifest: Manifest
    engine: InferenceEngine
    bare: InferenceEngine  # the same model with explanation "none" and one-pass entropy
    raw: ort.InferenceSession
    rows: list[dict[str, Any]]

    @property
    def label(self) -> str:
        m = self.manifest
        return f"{m.version} ({m.explanation.method} + {m.uncertainty})"


def _bare_manifest(text: str) -> str:
    """The manifest with no explanation and the one-pass entropy uncertainty."""
    text = re.sub(r"\[uncertainty\]\n(?:[^[\n].*\n|\n)*", '[uncertainty]\nmethod = "entropy"\n\n',
                  text)
    return re.sub(r"\[explanation\]\n(?:[^[\n].*\n|\n)*", '[explanation]\nmethod = "none"\n\n',
                  text)


def open_side(version: str, root: Path, threads: int) -> Side:
    """Models dirs holding just this package (and its bare variant), so each engine loads
    exactly it.  The bare variant is unsigned (its manifest changed), hence loaded in
    development mode; the shipped package is verified as in production."""
    models = root / version / "models"
    shutil.copytree(MODELS / version, models / "lesion-demo" / version)
    shutil.copy2(REPO / "models" / "dev-publisher.pub", models / "dev-publisher.pub")
    engine = InferenceEngine(InferenceSettings(
        models, root / version / "state", environment="production",
        publisher_keys=(models / "dev-publisher.pub",), threads=threads))
    assert [m["version"] for m in engine.active_models()] == [version], "package not loaded"
    bare_pkg = root / version / "bare" / "lesion-demo" / version
    shutil.copytree(MODELS / version, bare_pkg)
    (bare_pkg / "manifest.toml.sig").unlink()
    manifest = bare_pkg / "manifest.toml"
    manifest.write_text(_bare_manifest(manifest.read_text()))
    logging.getLogger("agent.infer.registry").setLevel(logging.ERROR)  # "unverified" warnings
    bare = InferenceEngine(InferenceSettings(
        bare_pkg.parents[1], root / version / "bare-state", environment="development",
        threads=threads))
    assert [m["version"] for m in bare.active_models()] == [version], "bare variant not loaded"
    m = load_manifest(MODELS / version / "manifest.toml")
    raw = ModelSession(MODELS / version / m.model_file, input_name=m.input_name,
                       output_name=m.output_name, threads=threads).raw  # same options
    return Side(version, m, engine, bare, raw, [])


def measure(side: Side, s: DeidentifiedStudy, repeats: int) -> dict[str, Any]:
    m = side.manifest
    bare, work = raw_work(s, m)
    eng_ms, dec_ms, single_ms, same_ms, prep_ms = [], [], [], [], []
    eng_cpu, dec_cpu, same_cpu, in_runs = [], [], [], []
    bare_ms, bare_cpu = [], []

    def run_bare() -> None:
        t0, c0 = time.perf_counter(), time.process_time()
        (bare_out,), _ = side.bare.infer(s)
        bare_ms.append((time.perf_counter() - t0) * 1000 - bare_out.timings_ms["decode"])
        bare_cpu.append((time.process_time() - c0) * 1000)

    def run_engine() -> None:
        before = side.engine.run_seconds()
        t0, c0 = time.perf_counter(), time.process_time()
        (out,), failures = side.engine.infer(s)
        eng_ms.append((time.perf_counter() - t0) * 1000)
        in_runs.append((side.engine.run_seconds() - before) * 1000)
        eng_cpu.append((time.process_time() - c0) * 1000)
        assert not failures and out.explanation["method"] == m.explanation.method
        dec_ms.append(out.timings_ms["decode"])

    def run_single() -> None:
        single_ms.append(time_raw(side.raw, m, bare)[0])

    def run_same() -> None:
        wall, cpu = time_raw(side.raw, m, work)
        same_ms.append(wall)
        same_cpu.append(cpu)

    for k in range(repeats):
        # Each pair in turn goes first: what runs second finds warmer caches.
        for step in ((run_bare, run_engine, run_single, run_same) if k % 2 == 0
                     else (run_engine, run_bare, run_same, run_single)):
            step()
        dec_cpu.append(decode_cpu_ms(s, m))
        t1 = time.perf_counter()
        tensors(s, m)
        prep_ms.append((time.perf_counter() - t1) * 1000)
    return {
        "study": s.study_ref, "images": len(bare[0][0]),
        "engine_ms": statistics.median(eng_ms),
        "decode_ms": statistics.median(dec_ms),
        "raw_same_work_ms": statistics.median(same_ms),
        "raw_single_pass_ms": statistics.median(single_ms),
        "script_preprocess_ms": statistics.median(prep_ms),
        "engine_cpu_ms": statistics.median(eng_cpu),
        "engine_own_ms": statistics.median(
            e - d - r for e, d, r in zip(eng_ms, dec_ms, in_runs, strict=True)),
        "engine_in_runs_ms": statistics.median(in_runs),
        "decode_cpu_ms": statistics.median(dec_cpu),
        "raw_same_work_cpu_ms": statistics.median(same_cpu),
        "bare_engine_ms": statistics.median(bare_ms),  # beyond its decoding
        "bare_engine_cpu_ms": statistics.median(bare_cpu),  # decoding included
    }


def summarise(side: Side, repeats: int, threads: int) -> dict[str, Any]:
    rows = side.rows
    for r in rows:
        beyond = r["engine_ms"] - r["decode_ms"]
        r["overhead_pct"] = 100 * (beyond - r["raw_same_work_ms"]) / r["raw_same_work_ms"]
        r["overhead_cpu_pct"] = 100 * (r["engine_cpu_ms"] - r["decode_cpu_ms"]
                                       - r["raw_same_work_cpu_ms"]) / r["raw_same_work_cpu_ms"]
    tot = {k: sum(r[k] for r in rows) for k in
           ("engine_ms", "decode_ms", "raw_same_work_ms", "raw_single_pass_ms",
            "script_preprocess_ms", "engine_cpu_ms", "decode_cpu_ms", "raw_same_work_cpu_ms",
            "bare_engine_ms", "bare_engine_cpu_ms")}
    own = {k: sum(r[k] for r in rows) for k in ("engine_own_ms", "engine_in_runs_ms")}
    script = tot["raw_same_work_ms"] + tot["script_preprocess_ms"]
    m = side.manifest
    return {
        "package": side.version, "explanation": m.explanation.method,
        "uncertainty": m.uncertainty,
        "studies": len(rows), "repeats": repeats, "threads": threads,
        "median_engine_ms_per_study": statistics.median(r["engine_ms"] for r in rows),
        "median_decode_ms_per_study": statistics.median(r["decode_ms"] for r in rows),
        "median_raw_same_work_ms_per_study": statistics.median(r["raw_same_work_ms"] for r in rows),
        "median_raw_single_pass_ms_per_study": statistics.median(r["raw_single_pass_ms"]
                                                                 for r in rows),
        "pipeline_overhead_beyond_decoding_pct": 100 * (
            tot["engine_ms"] - tot["decode_ms"] - tot["raw_same_work_ms"])
        / tot["raw_same_work_ms"],
        "pipeline_overhead_beyond_decoding_cpu_pct": 100 * (
            tot["engine_cpu_ms"] - tot["decode_cpu_ms"] - tot["raw_same_work_cpu_ms"])
        / tot["raw_same_work_cpu_ms"],
        "engine_own_work_vs_its_runs_pct": 100 * own["engine_own_ms"] / own["engine_in_runs_ms"],
        "median_engine_own_ms_per_study": statistics.median(r["engine_own_ms"] for r in rows),
        "median_engine_cpu_ms_per_study": statistics.median(r["engine_cpu_ms"] for r in rows),
        "median_raw_same_work_cpu_ms_per_study": statistics.median(r["raw_same_work_cpu_ms"]
                                                                   for r in rows),
        "overhead_vs_minimal_script_pct": 100 * (tot["engine_ms"] - tot["decode_ms"] - script)
        / script,
        "median_study_overhead_pct": statistics.median(r["overhead_pct"] for r in rows),
        # The measure: what uncertainty + explanation cost onnxruntime, in bare passes.
        "extras_factor_vs_single_pass": tot["raw_same_work_ms"] / tot["raw_single_pass_ms"],
        # In the engine: the study with the package's methods against the same engine
        # and model with no explanation and one-pass entropy (everything else equal).
        "engine_factor_vs_bare_engine": (tot["engine_ms"] - tot["decode_ms"])
        / tot["bare_engine_ms"],
        "engine_factor_vs_bare_engine_cpu": (tot["engine_cpu_ms"] - tot["decode_cpu_ms"])
        / (tot["bare_engine_cpu_ms"] - tot["decode_cpu_ms"]),
        "median_bare_engine_ms_per_study": statistics.median(r["bare_engine_ms"] for r in rows),
        # Stricter still: everything the engine does beyond decoding, in raw bare passes.
        "engine_factor_vs_single_pass": (tot["engine_ms"] - tot["decode_ms"])
        / tot["raw_single_pass_ms"],
    }


def _row(name: str, sides: list[dict[str, Any]], key: str, fmt: str) -> str:
    return f"| {name} | " + " | ".join(fmt.format(x[key]) for x in sides) + " |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--studies", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--packages", default="1.0.0,1.1.0",
                    help="lesion-demo versions to measure side by side")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "out")
    args = ap.parse_args()

    studies = make_studies(args.studies)
    with tempfile.TemporaryDirectory() as tmp:
        sides = [open_side(v, Path(tmp), args.threads) for v in args.packages.split(",")]
        for side in sides:  # warm caches on both sides
            for s in studies[:2]:
                measure(side, s, 1)
        for s in studies:  # interleaved: a busy minute on the machine hits every package
            for side in sides:
                side.rows.append(measure(side, s, args.repeats))
        for side in sides:
            side.engine.close()
    summaries = [summarise(side, args.repeats, args.threads) for side in sides]
    plat = (f"{platform.machine()} {platform.processor() or ''} python "
            f"{platform.python_version()} onnxruntime {ort.__version__}").strip()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "infer_bench.json").write_text(json.dumps(
        {"platform": plat, "summaries": summaries,
         "studies": {side.version: side.rows for side in sides}}, indent=2) + "\n")
    head = "| metric | " + " | ".join(side.label for side in sides) + " |"
    lines = [
        "# Inference latency: InferenceEngine vs raw InferenceSession.run",
        "",
        f"{args.studies} synthetic studies (8-slice CT series and single radiographs), median "
        f"of {args.repeats} runs each, {args.threads} intra-op thread(s), {plat}. The "
        "packages run interleaved, study by study, in the same run.",
        "",
        "How to read it. A *bare pass* is one onnxruntime run of the study's images, score "
        "output only. The first row is what uncertainty + explanation cost onnxruntime, in "
        "bare passes: 1.0.0 runs every image four times (flips) and the top image 196 more "
        "times (occlusion); 1.1.0 runs every image once and fetches the map the same run "
        "computed (about x1: the same pass, measured twice). The second row is the same "
        "question inside the engine: the study with the package's methods against the "
        "same engine and model with `explanation.method = \"none\"` and the one-pass "
        "entropy (everything else, preprocessing, hashing, drift and audit, equal). The "
        "overhead rows compare the engine with raw runs of exactly its own tensors: for "
        "1.1.0 that work is one small pass (~0.6 ms), so the engine's fixed ~1 ms of "
        "bookkeeping per study is a large share of it, while being less in absolute terms "
        "than with 1.0.0.",
        "",
        head,
        "|---" * (len(sides) + 1) + "|",
        _row("**uncertainty + explanation vs a bare pass, raw onnxruntime runs** (target <= x3)",
             summaries, "extras_factor_vs_single_pass", "**x{:.2f}**"),
        _row("**same, in the engine: the study vs the engine with no explanation and "
             "one-pass entropy** (beyond decoding, wall)", summaries,
             "engine_factor_vs_bare_engine", "**x{:.2f}**"),
        _row("same, CPU time", summaries, "engine_factor_vs_bare_engine_cpu", "x{:.2f}"),
        _row("engine with no explanation and one-pass entropy, per study beyond decoding "
             "(median)", summaries, "median_bare_engine_ms_per_study", "{:.2f} ms"),
        _row("engine end to end beyond decoding vs a raw bare pass (preprocessing, "
             "hashing, audit included)", summaries, "engine_factor_vs_single_pass", "x{:.2f}"),
        _row("engine, per study (median)", summaries, "median_engine_ms_per_study", "{:.2f} ms"),
        _row("of which decoding (median)", summaries, "median_decode_ms_per_study", "{:.2f} ms"),
        _row("raw runs, the engine's tensors and outputs", summaries,
             "median_raw_same_work_ms_per_study", "{:.2f} ms"),
        _row("raw run, bare single pass", summaries, "median_raw_single_pass_ms_per_study",
             "{:.2f} ms"),
        _row("engine CPU time, per study (median)", summaries, "median_engine_cpu_ms_per_study",
             "{:.2f} ms"),
        _row("raw runs CPU time, same tensors", summaries,
             "median_raw_same_work_cpu_ms_per_study", "{:.2f} ms"),
        _row("pipeline overhead beyond decoding, CPU time (all studies)", summaries,
             "pipeline_overhead_beyond_decoding_cpu_pct", "{:.1f} %"),
        _row("pipeline overhead beyond decoding, wall time (all studies)", summaries,
             "pipeline_overhead_beyond_decoding_pct", "{:.1f} %"),
        _row("engine's own work (not decoding, not in onnxruntime), per study (median)",
             summaries, "median_engine_own_ms_per_study", "{:.2f} ms"),
        _row("same, relative to its own onnxruntime time in the same calls", summaries,
             "engine_own_work_vs_its_runs_pct", "{:.1f} %"),
        _row("median per-study overhead", summaries, "median_study_overhead_pct", "{:.1f} %"),
        _row("overhead vs a minimal script (same preprocessing + raw runs)", summaries,
             "overhead_vs_minimal_script_pct", "{:.1f} %"),
        "",
        "| study | images | " + " | ".join(
            f"{side.version} engine ms | {side.version} raw same-work ms | "
            f"{side.version} raw single ms" for side in sides) + " |",
        "|---|---" + "|---|---|---" * len(sides) + "|",
        *["| " + " | ".join([str(rows[0]["study"]), str(rows[0]["images"])] + [
            f"{r['engine_ms']:.2f} | {r['raw_same_work_ms']:.2f} | {r['raw_single_pass_ms']:.2f}"
            for r in rows]) + " |"
          for rows in zip(*(side.rows for side in sides), strict=True)],
        "",
    ]
    (args.out / "infer_bench.md").write_text("\n".join(lines))
    print("\n".join(lines[:22]))


if __name__ == "__main__":
    main()
