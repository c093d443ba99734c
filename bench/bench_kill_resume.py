"""Capture under repeated SIGKILL: kill at random moments, rerun, compare with an uninterrupted run.

    python bench/bench_kill_resume.py --kills 20 --json bench/results/kill_resume.json

The capture command is run as a subprocess and killed after a delay drawn uniformly from
[0, the uninterrupted run's wall time]; the same command is then started again until the
dataset is complete. Up to ``--kills`` kills are made; only those that land before completion
count (a resumed run has less left to do, so late draws may find it finished). The result must equal the
uninterrupted capture document for document (decoded arrays, shard checksums, record
counts): every input document exactly once, identical content.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compress import Dataset  # noqa: E402
from compress.verify import dump_arrays  # noqa: E402


def capture_cmd(model: str, data: Path, out: Path, extra: list[str]) -> list[str]:
    return [sys.executable, "-c", "from kdpipe.cli import main; main()", "capture",
            "--model", model, "--data", str(data), "--out", str(out), "--no-progress", *extra]


def kill_loop(cmd: list[str], out: Path, kills: int, max_delay: float,
              seed: int = 0) -> list[float]:
    """Run ``cmd`` until its dataset is complete, SIGKILLing it up to ``kills`` times while it
    is still capturing; returns the delays of the kills that landed mid-capture."""
    rng, delays = random.Random(seed), []
    while not (out / "manifest.json").exists():
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if len(delays) < kills:
            delay = rng.uniform(0, max_delay)
            try:
                proc.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                if not (out / "manifest.json").exists():
                    delays.append(delay)
                continue
        if proc.wait() != 0:
            raise RuntimeError(f"capture failed after {len(delays)} kills: {' '.join(cmd)}")
    return delays


def compare(reference: Path, out: Path) -> dict:
    a, b = dump_arrays(str(reference)), dump_arrays(str(out))
    same_arrays = sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
    ma, mb = Dataset(str(reference)).manifest, Dataset(str(out)).manifest
    return {"same_arrays": same_arrays,
            "same_shards": [s.sha256 for s in ma.shards] == [s.sha256 for s in mb.shards],
            "same_records": ma.records == mb.records, "documents": mb.documents}


def run(model: str, data: Path, extra: list[str], kills: int, seed: int, work: Path) -> dict:
    t0 = time.time()
    subprocess.run(capture_cmd(model, data, work / "reference", extra), check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.time() - t0
    delays = kill_loop(capture_cmd(model, data, work / "killed", extra), work / "killed",
                       kills, wall, seed)
    return {"kills": len(delays), "delays_s": delays, "uninterrupted_wall_s": wall,
            **compare(work / "reference", work / "killed")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--data", type=Path, default=ROOT / "runs" / "corpus" / "train.jsonl")
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--args", default="--limit 24 --max-seq-len 96 --top-k 32 --window 2 "
                                      "--docs-per-shard 2 --hidden-layers 0,30",
                    help="capture options (both runs)")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        r = run(a.model, a.data, a.args.split(), a.kills, a.seed, Path(tmp))
    ok = r["same_arrays"] and r["same_shards"] and r["same_records"]
    print(f"kills mid-capture {r['kills']}, documents {r['documents']}, identical arrays {r['same_arrays']}, "
          f"identical shards {r['same_shards']}, identical record counts {r['same_records']}: "
          f"{'PASS' if ok else 'FAIL'}")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"args": a.args, **r}, indent=1))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
