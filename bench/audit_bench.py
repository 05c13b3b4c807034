"""Audit append rate (records/s) with SQLite WAL + synchronous=FULL, and verify rate.

Every record() is its own durable transaction (fsync of the WAL), so the
append rate is bounded by the disk's fsync latency; that is the price of
"an acknowledged audit event survives power loss".  Writes markdown and JSON
into bench/out/.

    .venv/bin/python bench/audit_bench.py [--records N] [--threads T] [--dir PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sqlite3
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.audit import AuditLog, verify  # noqa: E402
from agent.config import AuditSettings  # noqa: E402
from agent.crypto import KeyEncryptionKey, write_secret_file  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"


def _append(db: Path, kek: KeyEncryptionKey, seed: Path, records: int, threads: int) -> dict[str, float]:
    log = AuditLog(db, kek, seed, AuditSettings(checkpoint_every=100), box="bench/box-01")
    per = records // threads

    def work(k: int) -> None:
        for i in range(per):
            log.record("instance.received", source="CT1@10.0.0.5",
                       details={"study": f"{k:02x}{i:08x}", "instance": f"{i:012x}",
                                "bytes": 524_288, "sop_class": "1.2.840.10008.5.1.4.1.1.2"},
                       phi={"patient_id": f"MRN{i:07d}", "patient_name": "Bench^Patient"})

    t0 = time.perf_counter()
    pool = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    elapsed = time.perf_counter() - t0
    log.checkpoint()
    errors = log.errors
    log.close()
    n = per * threads
    return {"records": n, "threads": threads, "seconds": round(elapsed, 3),
            "records_per_s": round(n / elapsed, 1), "errors": errors}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--records", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--dir", type=Path, default=None,
                    help="where the database goes (default: a temp dir under /var/tmp)")
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="audit-bench-", dir=args.dir or "/var/tmp"))
    try:
        kek = KeyEncryptionKey(os.urandom(32))
        results = []
        for threads in (1, args.threads):
            root = base / f"t{threads}"
            seed = root / "audit_signing.key"
            write_secret_file(seed, os.urandom(32).hex().encode())
            db = root / "audit" / "audit.db"
            results.append(_append(db, kek, seed, args.records, threads))
            genesis = bytes.fromhex((db.parent / "genesis.pub").read_text())
            t0 = time.perf_counter()
            report = verify(db, kek, genesis, signing_key_path=seed)
            vs = time.perf_counter() - t0
            results[-1]["verify_ok"] = report.ok
            results[-1]["verify_records_per_s"] = round(report.records / vs, 1)
            results[-1]["bytes_per_record"] = round(
                sum(p.stat().st_size for p in db.parent.glob("audit.db*")) / report.records, 1)
        env = {
            "python": platform.python_version(), "sqlite": sqlite3.sqlite_version,
            "machine": platform.machine(), "cpus": os.cpu_count(),
            "filesystem_dir": str(base), "synchronous": "FULL", "journal_mode": "WAL",
            "checkpoint_every": 100,
        }
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / "audit_bench.json").write_text(json.dumps({"env": env, "results": results},
                                                          indent=2) + "\n")
        lines = ["# Audit append rate", "",
                 f"SQLite {env['sqlite']} WAL, synchronous=FULL (one fsync per record), "
                 f"AES-256-GCM per record, hash chain, Ed25519 checkpoint every 100 records; "
                 f"Python {env['python']}, {env['cpus']} CPUs, db under {base.parent}.", "",
                 "| writer threads | records | seconds | records/s | verify records/s | "
                 "bytes/record | errors |",
                 "|---:|---:|---:|---:|---:|---:|---:|"]
        for r in results:
            lines.append(f"| {r['threads']} | {r['records']} | {r['seconds']} | "
                         f"{r['records_per_s']} | {r['verify_records_per_s']} | "
                         f"{r['bytes_per_record']} | {r['errors']} |")
        (OUT / "audit_bench.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
        return 0 if all(r["verify_ok"] and not r["errors"] for r in results) else 1
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
