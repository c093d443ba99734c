"""Rank arithmetic and data parallelism: one process, DDP, or FSDP2 under ``torchrun``.

``init_distributed`` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); without it
the run is a single process. ``parallelize`` applies the strategy from outside the model:
DDP keeps a full replica per rank; FSDP2 (``fully_shard``) shards every decoder layer and
then the root, for students that do not fit one GPU.

Gradient averaging: DDP and FSDP2 average gradients over ranks; the trainer normalizes each
loss by counts of the whole global batch and multiplies by the world size, so the result is
the gradient of the global-batch loss whatever the world size.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist
from torch import nn

from kdpipe.runtime import resolve_device
from kdpipe.schemas import ConfigError

from .train_config import ParallelConfig


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            tdist.barrier()

    def all_reduce_sum(self, values: dict[str, float]) -> dict[str, float]:
        """Sum a dict of numbers over ranks (float64 on the training device)."""
        if not self.distributed or not values:
            return dict(values)
        keys = sorted(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64,
                         device=self.device)
        tdist.all_reduce(t)
        return dict(zip(keys, t.tolist()))


def init_distributed(*, parallel: ParallelConfig, device: str) -> DistInfo:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    try:
        dev = resolve_device(device, local_rank=local_rank)
    except ValueError as e:
        raise ConfigError(f"train.device={e}") from e
    if world > 1 and not tdist.is_initialized():
        backend = parallel.backend
        if backend == "auto":
            backend = "nccl" if dev.type == "cuda" else "gloo"
        tdist.init_process_group(backend=backend, device_id=dev if dev.type == "cuda" else None)
    return DistInfo(rank, world, local_rank, dev)


def shutdown_distributed() -> None:
    if tdist.is_initialized():
        tdist.destroy_process_group()


# Share of a GPU's memory a replica's weights, gradients and AdamW state may take before
# ``auto`` shards them: the rest is for activations, the LM-head chunks and the data.
REPLICA_SHARE = 0.5


def training_state_bytes(module: nn.Module) -> int:
    """fp32 weights of every parameter, plus gradient and two AdamW moments of trainable ones."""
    return sum(p.numel() * (16 if p.requires_grad else 4) for p in module.parameters())


def strategy_of(parallel: ParallelConfig, dist: DistInfo, module: nn.Module | None = None) -> str:
    """``auto``: nothing on one process; FSDP2 when a full replica's training state would
    not fit in ``REPLICA_SHARE`` of a GPU, DDP otherwise."""
    if not dist.distributed:
        return "none"
    if parallel.strategy != "auto":
        return parallel.strategy
    if module is not None and dist.device.type == "cuda":
        total = torch.cuda.get_device_properties(dist.device).total_memory
        if training_state_bytes(module) > REPLICA_SHARE * total:
            return "fsdp"
    return "ddp"


def parallelize(module: nn.Module, *, parallel: ParallelConfig, dist: DistInfo) -> nn.Module:
    """Wrap ``module`` (a ``DistillModule`` on its device) for data parallelism."""
    strategy = strategy_of(parallel, dist, module)
    if strategy == "ddp":
        return nn.parallel.DistributedDataParallel(
            module, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard
        for layer in module.student.model.layers:
            fully_shard(layer)
        # The root keeps embeddings, the LM head (used chunk by chunk inside the root's
        # forward) and the projections; it is not resharded between forward and backward.
        fully_shard(module, reshard_after_forward=False)
        return module
    return module


def no_sync(model: nn.Module, skip: bool):
    """Skip the gradient all-reduce for micro-batches before the last one of a step."""
    if not skip:
        return contextlib.nullcontext()
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):          # FSDP2
        @contextlib.contextmanager
        def _fsdp():
            model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)
        return _fsdp()
    return contextlib.nullcontext()


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
