"""Training under repeated SIGKILL: random kills, resumes, compared with an uninterrupted run.

    python bench/bench_train_kill_resume.py --kills 20 --seed 0 \
        --json bench/results/train_kill_resume.json

A tiny CPU training (the test fixtures' toy dataset and two-layer student; 72 steps, about
5 epochs, a checkpoint every 3, held-out evaluation every 6, one DataLoader worker) runs once
uninterrupted, then once more to time a start that has nothing left to do (which must change
nothing). Then the same command with ``--resume`` is started again and again in a fresh
directory, each start SIGKILLed together with its worker after a delay drawn uniformly from
[0, the expected length of a start that resumes from the latest checkpoint] (start-up plus
the remaining steps at the measured speed), until the run completes. Up to ``--kills`` kills
are made; only those that land before the run completes (before ``final/`` exists) count, so
a delay longer than the start needs ends the loop early. The per-step training metrics, the
held-out metrics and the final weights must equal the uninterrupted run's bitwise; "steps
redone" is the number of optimizer steps run beyond the ``--steps`` a single run needs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from tests.test_train_fixtures import tiny_config, write_dataset, write_student  # noqa: E402

TIMING = "tokens_per_s"          # wall-clock speed: the one value that may differ


def make_inputs(work: Path) -> None:
    write_dataset(work / "ds", n_docs=30, teacher_mask_every=5, loss_mask_every=4)
    write_dataset(work / "held", n_docs=6, seed=9)
    write_student(work / "student")


def train_cmd(work: Path, out: Path, steps: int) -> list[str]:
    """``kdpipe train --resume`` of the tiny run; --resume starts afresh when there is no
    checkpoint yet, so every start of the killed run is the same command."""
    sets = tiny_config(out, work / "ds", work / "student", heldout=work / "held",
                       **{"train.max_steps": steps, "train.grad_accum": 2,
                          "checkpoint.every": 3, "checkpoint.keep_last": 2, "eval.every": 6,
                          "data.workers": 1, "optim.weight_decay": 0.01})
    sets.append("loss.terms=[{kind: kl, weight: 0.6, temperature: 2.0, missing: tail}, "
                "{kind: ce, weight: 0.2}, {kind: hidden_cosine, weight: 0.2}]")
    return [sys.executable, "-c", "from kdpipe.cli import main; main()", "train", "--resume",
            *[a for s in sets for a in ("--set", s)]]


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")


def records(run: Path) -> list[dict]:
    """metrics.jsonl, without a last line cut short by a kill."""
    path = run / "metrics.jsonl"
    out = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def _train_steps(run: Path) -> list[tuple[int, float]]:
    """(step, speed) of every training record: a rerun step logs a new speed, so new pairs
    count the steps an attempt ran."""
    return [(r["step"], r[TIMING]) for r in records(run) if r["kind"] == "train"]


def _checkpoint_step(run: Path) -> int:
    steps = [int(p.parent.name[5:]) for p in (run / "checkpoints").glob("step-*/meta.json")]
    return max(steps, default=0)


def kill_loop(cmd: list[str], run: Path, kills: int, seed: int,
              duration: Callable[[int], float]) -> dict:
    """Start ``cmd`` until ``run/final`` exists, SIGKILLing up to ``kills`` starts (with their
    process group) after a delay drawn uniformly from [0, ``duration(checkpoint step)``], the
    expected length of a start that resumes there; returns the kills that landed before
    completion and the optimizer steps run in all."""
    rng, landed, steps_run = random.Random(seed), [], 0
    log = run.parent / "stderr.log"          # beside the run directory, not in it
    log.parent.mkdir(parents=True, exist_ok=True)
    while not (run / "final" / "model.safetensors").exists():
        before = set(_train_steps(run))
        resumed_from = _checkpoint_step(run)
        with open(log, "w") as err:
            proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=err,
                                    start_new_session=True)
        if len(landed) < kills:
            delay = rng.uniform(0, duration(resumed_from))
            try:
                proc.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                new = [step for step, speed in _train_steps(run) if (step, speed) not in before]
                steps_run += len(new)
                if not (run / "final" / "model.safetensors").exists():
                    landed.append({"delay_s": round(delay, 3), "resumed_from": resumed_from,
                                   "killed_after_step": max(new, default=None)})
                continue
        if proc.wait() != 0:
            raise RuntimeError(f"training failed after {len(landed)} kills: "
                               f"{log.read_text()[-3000:]}")
        steps_run += len(set(_train_steps(run)) - before)
    return {"landed": landed, "steps_run": steps_run}


def compare(reference: Path, other: Path) -> dict:
    """Bitwise equality of training records, held-out records and final weights (the records'
    speed and stage seconds left out)."""
    def by_kind(run: Path, kind: str) -> list[dict]:
        return [{k: v for k, v in r.items() if k not in (TIMING, "stage_s")}
                for r in records(run) if r["kind"] == kind]
    wa = load_file(reference / "final" / "model.safetensors")
    wb = load_file(other / "final" / "model.safetensors")
    return {"same_losses": by_kind(reference, "train") == by_kind(other, "train"),
            "same_eval": by_kind(reference, "eval") == by_kind(other, "eval"),
            "same_weights": wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k])
                                                           for k in wa)}


def _timed(cmd: list[str], run: Path) -> tuple[float, float]:
    """Wall time of ``cmd``, and the time from its first training record to its last (the
    steps alone: start-up, cold the first time, and exit excluded)."""
    t0, seen, first, last = time.time(), 0, None, None
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    while proc.poll() is None:
        n = len(_train_steps(run))
        if n > seen:
            seen, last = n, time.time()
            first = first or last
        time.sleep(0.02)
    if proc.returncode != 0:
        raise RuntimeError(f"training failed: {' '.join(cmd)}")
    return time.time() - t0, (last or 0) - (first or 0)


def run(kills: int, seed: int, work: Path, steps: int = 72) -> dict:
    make_inputs(work)
    reference = train_cmd(work, work / "reference", steps)
    wall, training = _timed(reference, work / "reference" / "run")
    shutil.copytree(work / "reference" / "run", work / "first")
    # the finished run started again: only start-up and exit, and it must change nothing
    startup, _ = _timed(reference, work / "reference" / "run")
    rerun = compare(work / "first", work / "reference" / "run")
    loop = kill_loop(train_cmd(work, work / "killed", steps), work / "killed" / "run", kills,
                     seed, lambda done: startup + training * (steps - done) / steps)
    result = {**compare(work / "reference" / "run", work / "killed" / "run"),
              "rerun_of_finished_run_changes_nothing": all(rerun.values())}
    return {"steps": steps, "kills_requested": kills, "kills_landed": len(loop["landed"]),
            "steps_redone": loop["steps_run"] - steps, "uninterrupted_wall_s": round(wall, 2),
            "startup_wall_s": round(startup, 2), "kills": loop["landed"], **result,
            "result": "PASS" if all(result.values()) else "FAIL"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=72)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        r = run(a.kills, a.seed, Path(tmp), a.steps)
    print("| kills requested | kills landed mid-run | steps redone | result |")
    print("|---|---|---|---|")
    print(f"| {r['kills_requested']} | {r['kills_landed']} | {r['steps_redone']} | "
          f"{r['result']} |")
    print(f"identical losses {r['same_losses']}, held-out metrics {r['same_eval']}, "
          f"final weights {r['same_weights']}; rerun of the finished run changes nothing "
          f"{r['rerun_of_finished_run_changes_nothing']} (uninterrupted run "
          f"{r['uninterrupted_wall_s']} s, {r['steps']} steps)")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"command": " ".join(sys.argv), **r}, indent=1) + "\n")
    sys.exit(0 if r["result"] == "PASS" else 1)


if __name__ == "__main__":
    main()
