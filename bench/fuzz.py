"""The long fuzz run: the targets of tests/fuzz_targets.py fed random bytes through hypothesis, 1,000,000 inputs.

    python bench/fuzz.py                               # 1,000,000 executions over 2 processes
    python bench/fuzz.py --executions 20000 --jobs 1   # a quick look

Targets and their rules (see tests/fuzz_targets.py): `manifest` (open_bundle raises only RecsysError and never
accepts a bad signature), `rest_events` / `rest_recommendations` (no 5xx), `grpc_handlers` (the Retrieval,
Ranking and Gateway servicer methods never end in INTERNAL or UNKNOWN). Each input is a buffer of random bytes
that hypothesis turns into a structured input with the same strategies the CI test uses
(`fuzz_one_input`); an execution is one run of a target's body. atheris is not used (not a dependency of the
project); these strategies also reach deeper than raw bytes would.

Prints executions, failures and the outcome mix per target, and writes them as JSON (--out). Exit code 1 when
any input broke a rule; each distinct failure is listed once with its first input.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHARES = {"manifest": 0.45, "grpc_handlers": 0.45, "rest_events": 0.06, "rest_recommendations": 0.04}
BUFFER_BYTES = 4096


def run_worker(quotas: dict[str, int], seed: int, progress_s: float) -> dict[str, Any]:
    """Run each target until it has executed its quota; counts, outcomes and distinct failures."""
    logging.disable(logging.CRITICAL)  # refusals are logged by design; failures are collected below
    from tests.fuzz_targets import FuzzEnv, make_targets

    env = FuzzEnv()
    outcomes: Counter[tuple[str, str]] = Counter()
    targets = make_targets(env, outcomes=outcomes)
    result: dict[str, Any] = {}
    try:
        for name, quota in quotas.items():
            rng = random.Random(f"{seed}:{name}")
            fuzz = targets[name].hypothesis.fuzz_one_input
            failures: dict[str, dict[str, Any]] = {}
            inputs, started, last = 0, time.perf_counter(), time.perf_counter()

            def executed(target: str = name) -> int:
                return sum(n for (t, _), n in outcomes.items() if t == target)

            while executed() < quota:
                inputs += 1
                try:
                    fuzz(rng.randbytes(BUFFER_BYTES))
                except Exception as exc:  # a broken rule (FuzzFailure) or a crash in the harness itself
                    outcomes[name, "FAILURE"] += 1
                    key = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
                    entry = failures.setdefault(key, {"count": 0, "first": str(exc)[:2000]})
                    entry["count"] += 1
                if time.perf_counter() - last > progress_s:
                    last = time.perf_counter()
                    rate = executed() / (last - started)
                    print(f"[seed {seed}] {name}: {executed()}/{quota} ({rate:.0f}/s)", file=sys.stderr, flush=True)
            seconds = time.perf_counter() - started
            result[name] = {
                "executions": executed(),
                "inputs": inputs,
                "seconds": round(seconds, 1),
                "failures": failures,
                "outcomes": dict(sorted(((o, n) for (t, o), n in outcomes.items() if t == name), key=lambda x: -x[1])),
            }
    finally:
        env.close()
    return result


def merge(results: list[dict[str, Any]]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for result in results:
        for name, part in result.items():
            empty = {"executions": 0, "inputs": 0, "seconds": 0.0, "failures": {}, "outcomes": {}}
            into = merged.setdefault(name, empty)
            into["executions"] += part["executions"]
            into["inputs"] += part["inputs"]
            into["seconds"] = max(into["seconds"], part["seconds"])
            for key, failure in part["failures"].items():
                have = into["failures"].setdefault(key, {"count": 0, "first": failure["first"]})
                have["count"] += failure["count"]
            for outcome, n in part["outcomes"].items():
                into["outcomes"][outcome] = into["outcomes"].get(outcome, 0) + n
    return merged


def report(merged: dict[str, Any], wall_s: float) -> str:
    lines = [f"{'target':<22}{'executions':>12}{'failures':>10}{'target s':>10}  top outcomes"]
    for name, part in merged.items():
        top = sorted(part["outcomes"].items(), key=lambda x: -x[1])[:6]
        n_failed = sum(f["count"] for f in part["failures"].values())
        lines.append(
            f"{name:<22}{part['executions']:>12,}{n_failed:>10}{part['seconds']:>10.0f}  "
            + ", ".join(f"{o} {n}" for o, n in top)
        )
    total = sum(p["executions"] for p in merged.values())
    lines.append(f"{'total':<22}{total:>12,}   in {wall_s:.0f} s wall")
    for name, part in merged.items():
        for key, failure in part["failures"].items():
            lines.append(f"FAILURE {name} x{failure['count']}: {key}\n    first: {failure['first'][:600]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--executions", type=int, default=1_000_000, help="total over all targets")
    parser.add_argument("--targets", default=",".join(SHARES), help="comma-separated subset of " + ",".join(SHARES))
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (each builds its own services)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--progress-s", type=float, default=60.0, help="print progress this often")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "fuzz.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: JSON quotas for one worker process
    args = parser.parse_args(argv)

    if args.worker:
        spec = json.loads(args.worker)
        result = run_worker(spec["quotas"], spec["seed"], args.progress_s)
        Path(spec["result"]).write_text(json.dumps(result))
        return 0

    names = [n.strip() for n in args.targets.split(",") if n.strip()]
    unknown = sorted(set(names) - set(SHARES))
    if unknown or not names or args.jobs < 1 or args.executions < 1:
        parser.error(f"--targets from {','.join(SHARES)} (unknown: {unknown}); --jobs and --executions >= 1")
    weight = sum(SHARES[n] for n in names)
    totals = {n: round(args.executions * SHARES[n] / weight) for n in names}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="recsys-fuzz-run-") as tmp:
        procs = []
        for job in range(args.jobs):
            quotas = {n: totals[n] // args.jobs + (1 if job < totals[n] % args.jobs else 0) for n in names}
            spec = {"quotas": quotas, "seed": args.seed * 1000 + job, "result": str(Path(tmp) / f"{job}.json")}
            cmd = [sys.executable, __file__, "--worker", json.dumps(spec), "--progress-s", str(args.progress_s)]
            procs.append((subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}), spec))
        codes = [proc.wait() for proc, _ in procs]
        if any(codes):
            print(f"fuzz: a worker exited with {codes}", file=sys.stderr)
            return 2
        results = [json.loads(Path(spec["result"]).read_text()) for _, spec in procs]
    wall = time.perf_counter() - started
    merged = merge(results)
    print(report(merged, wall))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"wall_s": round(wall, 1), "jobs": args.jobs, "targets": merged}, indent=2))
    return 1 if any(p["failures"] for p in merged.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
