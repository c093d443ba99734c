"""Corruption trials: random bit flips and truncations in a dataset's shards and manifests.

    python bench/bench_corruption.py --data runs/capture --trials 1000 --json bench/results/corruption.json

Each trial damages one file (a shard, manifest.json or a part fragment), runs
``kdpipe verify`` (checksums, sizes, schema, codec; no decoding), and restores the file.
A trial counts as detected when verify fails and names the damaged file. Prints a table
per file kind and writes JSON; exits 1 if any trial went undetected.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kdpipe.compress.verify import verify_dataset  # noqa: E402


def _kind(rel: str) -> str:
    return "shard" if rel.startswith("shards/") else "manifest" if rel == "manifest.json" \
        else "fragment"


def run_trials(data: Path, trials: int, seed: int = 0) -> dict:
    """Damage, verify, restore, ``trials`` times; returns counts and the undetected cases."""
    files = sorted(str(p.relative_to(data)) for p in data.rglob("*")
                   if p.is_file() and (p.suffix in (".parquet", ".json")))
    if not verify_dataset(str(data)).ok:
        raise SystemExit(f"{data}: verify fails before any damage")
    rng = random.Random(seed)
    done, detected, missed = Counter(), Counter(), []
    for trial in range(trials):
        rel = rng.choice(files)
        path = data / rel
        original = path.read_bytes()
        damaged = bytearray(original)
        if rng.random() < 0.5:
            pos = rng.randrange(len(damaged))
            damaged[pos] ^= 1 << rng.randrange(8)
            how = f"bit flip at byte {pos}"
        else:
            damaged = damaged[: rng.randrange(len(damaged))]
            how = f"truncated to {len(damaged)} bytes"
        path.write_bytes(bytes(damaged))
        try:
            report = verify_dataset(str(data))
            named = not report.ok and any(p.file == rel for p in report.problems)
        except Exception as e:  # verify raised instead of reporting: detected if it names the file
            named = rel in str(e)
        finally:
            path.write_bytes(original)
        done[_kind(rel)] += 1
        if named:
            detected[_kind(rel)] += 1
        else:
            missed.append({"trial": trial, "file": rel, "damage": how})
    return {"trials": trials, "by_kind": {k: {"trials": done[k], "detected": detected[k]}
                                          for k in sorted(done)}, "missed": missed}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT / "runs" / "capture")
    ap.add_argument("--trials", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    result = run_trials(a.data, a.trials, a.seed)
    print(f"{'file kind':10} {'trials':>7} {'detected':>9}")
    for kind, c in result["by_kind"].items():
        print(f"{kind:10} {c['trials']:7d} {c['detected']:9d}")
    print(f"undetected: {len(result['missed'])}")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"data": str(a.data), **result}, indent=1))
    sys.exit(1 if result["missed"] else 0)


if __name__ == "__main__":
    main()
