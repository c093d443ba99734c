"""Checkpoints of a training run: everything ``--resume`` needs to continue exactly.

Layout of ``OUT/checkpoints/step-00000100/``::

    model/                 the student alone: save_pretrained (safetensors), config, tokenizer
    trainer_state.pt       optimizer, LR scheduler, hidden-state projections (full tensors)
    rng-rank00000.pt       each rank's RNG states (torch CPU/CUDA, numpy, python)
    meta.json              human-readable: step, tokens, data state, last metrics and
                           evaluation, corrupt shards left out, config

A checkpoint is written under a temporary name, flushed to disk (every file, then the
directories) and renamed when complete, so a killed run or a lost machine leaves either a
whole checkpoint or none; the last ``keep_last`` are kept, and an old one is
made invisible (``meta.json`` removed) before it is deleted. Model and optimizer states are
gathered to full tensors with ``torch.distributed.checkpoint``'s state-dict helpers, so the
same code serves one process, DDP and FSDP2, and a checkpoint can be resumed on another world
size. Multi-node runs need ``OUT`` on a shared filesystem.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict,
                                                     set_optimizer_state_dict)

from kdpipe.compress import fsync_path, publish_dir, publish_tree, share_tree
from kdpipe.schemas import ConfigError

from .train_dist import DistInfo

CHECKPOINTS = "checkpoints"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "chat_template.jinja", "generation_config.json")
_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(out: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(out) / CHECKPOINTS
    found = []
    for p in root.glob("step-*") if root.exists() else []:
        if (p / "meta.json").exists() and p.name[5:].isdigit():
            found.append((int(p.name[5:]), p))
    return sorted(found)


def latest_checkpoint(out: str | Path) -> Path | None:
    found = list_checkpoints(out)
    return found[-1][1] if found else None


def rng_state() -> dict:
    """RNG states as tensors and plain Python values, so they load with weights_only=True."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                       "has_gauss": has_gauss, "gauss": gauss},
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["gauss"]))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def copy_tokenizer(src: str | Path | None, dst: Path) -> None:
    if src is None:
        return
    for name in TOKENIZER_FILES:
        if (Path(src) / name).exists() and not (dst / name).exists():
            shutil.copy2(Path(src) / name, dst / name)


def link_tree(src: Path, dst: Path) -> None:
    """Replace ``dst`` (a run's own ``final``, never a directory of the user's) with
    ``src``'s files, hard-linked where the filesystem allows."""
    with publish_dir(dst) as tmp:
        for f in src.iterdir():
            try:
                os.link(f, tmp / f.name)
            except OSError:
                shutil.copy2(f, tmp / f.name)


def save_model(module, out_dir: Path, *, dist: DistInfo, tokenizer_src: str | None) -> None:
    """The student alone, loadable with ``AutoModelForCausalLM.from_pretrained(out_dir)``.
    Collective: every rank calls it (FSDP gathers the shards)."""
    state = get_model_state_dict(module.student, options=_FULL)
    if dist.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        module.student.save_pretrained(out_dir, state_dict=state)
        copy_tokenizer(tokenizer_src, out_dir)


def save_checkpoint(out: str | Path, step: int, *, module, optimizer, scheduler,
                    meta: dict, dist: DistInfo, keep_last: int,
                    tokenizer_src: str | None) -> Path:
    """Write checkpoint ``step`` (collective) and prune old ones; returns its directory."""
    root = Path(out) / CHECKPOINTS
    final = root / step_name(step)
    tmp = root / f".tmp-{step_name(step)}"
    if dist.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    save_model(module, tmp / "model", dist=dist, tokenizer_src=tokenizer_src)
    # gathering sharded (FSDP) tensors is collective: every rank takes part
    optim_state = get_optimizer_state_dict(module, optimizer, options=_FULL)
    projections = get_model_state_dict(module.projections, options=_FULL)
    torch.save(rng_state(), tmp / f"rng-rank{dist.rank:05d}.pt")
    fsync_path(tmp / f"rng-rank{dist.rank:05d}.pt")   # ranks of other nodes flush their own
    if dist.is_main:
        torch.save({"optimizer": optim_state, "scheduler": scheduler.state_dict(),
                    "projections": projections, "step": step}, tmp / "trainer_state.pt")
        meta = dict(meta, step=step, saved_at=time.strftime("%Y-%m-%dT%H:%M:%S"),
                    world_size=dist.world_size)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True, default=str))
    dist.barrier()
    if dist.is_main:
        share_tree(tmp)
        publish_tree(tmp, final, remove=remove_checkpoint)
        for _, old in list_checkpoints(out)[:-keep_last]:
            remove_checkpoint(old)
    dist.barrier()
    return final


def remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint, ``meta.json`` first: a kill halfway through leaves a directory
    that ``list_checkpoints`` ignores, never one that looks whole with files missing."""
    (path / "meta.json").unlink(missing_ok=True)
    shutil.rmtree(path, ignore_errors=True)


def read_meta(path: Path) -> dict:
    try:
        return json.loads((path / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: unreadable checkpoint meta.json ({e})") from e


def load_projections(module, path: Path) -> None:
    """Before parallelization: the projections' weights from a checkpoint."""
    state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=True)
    module.projections.load_state_dict(state["projections"])


def load_training_state(path: Path, *, module, optimizer, scheduler, dist: DistInfo) -> None:
    """After parallelization: optimizer, scheduler and this rank's RNG states."""
    state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=True)
    set_optimizer_state_dict(module, optimizer, state["optimizer"], options=_FULL)
    scheduler.load_state_dict(state["scheduler"])
    rng = path / f"rng-rank{dist.rank:05d}.pt"
    if rng.exists():                              # absent when resuming on more ranks
        set_rng_state(torch.load(rng, map_location="cpu", weights_only=True))
