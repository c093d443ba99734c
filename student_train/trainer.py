"""The distillation trainer: components built from the config in one place, then the loop.

``Trainer.__init__`` builds, in dependency order: process group and device, output
directory, dataset index, student (a checkpoint, or converted from the teacher), the checks
that the dataset fits it, the objective and projections, frozen parameters, parallelism,
optimizer and schedule, resume state, data stream, held-out stream and metrics.
``Trainer.train`` is the loop: step, log, evaluate, checkpoint.

One optimizer step takes ``grad_accum`` micro-batches per rank. Loss terms are normalized by
counts over the whole global batch (all-reduced before the first backward), so a step is the
same computation on any number of ranks (up to float summation order).
"""

from __future__ import annotations

import math
import re
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm

from kdpipe.compress import Dataset
from kdpipe.runtime import StopSignals, auto_dtype
from kdpipe.schemas import ConfigError, DatasetError
from kdpipe.schemas.layout import embedded_teacher_dir, is_embedded_teacher

from . import checkpoint as ckpt
from .compile import compile_decoder_layers, wants_compile
from .evaluate import autocast_for, eval_stream, evaluate, load_student
from .metrics import MetricsLog
from .model.modeling import enable_activation_checkpointing
from .packing import PackedBatch
from .run_dir import check_out, local_path, mark_run, remove_run
from .stream import StreamState, global_batch
from .stream_loader import DistillStream, TrainBatches, build_index
from .train_checks import (check_dataset, check_same_teacher, load_dense_head,
                           resolve_layer_map)
from .train_config import Config, OptimConfig, StudentConfig, dump_config
from .train_dist import init_distributed, no_sync, parallelize, strategy_of, unwrap
from .train_objective import DistillModule, training_objective, weighted_loss


def lr_multiplier(step: int, *, warmup: int, total: int, min_ratio: float,
                  schedule: str) -> float:
    """Linear warmup over ``warmup`` steps, then constant or cosine down to ``min_ratio``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(max(step - warmup, 0) / max(total - warmup, 1), 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def freeze(model: torch.nn.Module, patterns: list[str]) -> tuple[int, int]:
    """Freeze parameters whose name (as in the student's state dict, tied aliases such as
    ``lm_head.weight`` included) matches any regex; returns (trainable, frozen) counts."""
    compiled = []
    for p in patterns:
        try:
            compiled.append(re.compile(p))
        except re.error as e:
            raise ConfigError(f"train.frozen: {p!r} is not a valid regex ({e})") from e
    used = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        hits = [c.pattern for c in compiled if c.search(name)]
        used.update(hits)
        if hits:
            param.requires_grad_(False)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    unused = [p for p in patterns if p not in used]
    if unused:
        raise ConfigError(f"train.frozen: {unused} match no parameter of the student")
    if trainable == 0:
        raise ConfigError("train.frozen freezes every parameter")
    return trainable, frozen


def frozen_linears_to_bf16(model: torch.nn.Module) -> int:
    """Store the frozen ``nn.Linear`` parameters that bf16 holds exactly in bf16; returns the
    bytes saved.

    Under bf16 autocast every matmul reads its operands in bf16, so this changes no number. It
    removes a cast per use (autocast caches casts only of leaves that require grad, so a frozen
    float32 weight is cast again in every forward and every recomputation) and halves their
    memory. A student converted from a bf16 teacher holds its frozen MLPs and LM head exactly.
    Weights shared with an embedding stay float32: the lookup is not autocast, so its output
    would change dtype."""
    embedded = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding)
                for p in m.parameters()}
    saved = 0
    for m in model.modules():
        params = list(m.parameters(recurse=False))
        if not isinstance(m, torch.nn.Linear) or any(
                p.requires_grad or p.dtype != torch.float32 or id(p) in embedded for p in params):
            continue
        if all(torch.equal(p.to(torch.bfloat16).float(), p) for p in params):
            for p in params:
                p.data = p.data.to(torch.bfloat16)
                saved += 2 * p.numel()
    return saved


def build_optimizer(module: torch.nn.Module, *, optim: OptimConfig) -> torch.optim.Optimizer:
    """AdamW; no weight decay on vectors (norms, biases) and parameters marked
    ``_no_weight_decay`` (KDA's A_log and dt_bias). On CUDA the fused implementation: one
    kernel per parameter group instead of several passes over the optimizer state."""
    decay, no_decay = [], []
    for p in module.parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or getattr(p, "_no_weight_decay", False) else decay).append(p)
    groups = [{"params": decay, "weight_decay": optim.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    on_cuda = all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=optim.lr,
                             betas=tuple(optim.betas), eps=optim.eps, fused=on_cuda or None)


def teacher_dir(student: StudentConfig, *, is_main: bool, barrier,
                prepare_embedded: Callable[[], Path] | None = None) -> Path:
    """The directory of the teacher a student is built from. The embedded teacher is read
    where ``kdpipe teacher prepare`` writes it; ``prepare_embedded`` (the CLI passes capture's
    preparation) writes it there first when it is missing, on the main rank."""
    if not is_embedded_teacher(student.teacher):
        return Path(student.teacher)
    path = embedded_teacher_dir()
    if not (path / "config.json").exists():
        if prepare_embedded is None:
            raise ConfigError(f"student.teacher: the embedded teacher is not prepared at "
                              f"{path}; run `kdpipe teacher prepare` first")
        if is_main:
            prepare_embedded()
        barrier()
    return path


def prepare_student(student: StudentConfig, out: Path, *, is_main: bool, barrier,
                    prepare_embedded: Callable[[], Path] | None = None) -> str:
    """The student checkpoint directory: ``student.path``, or the teacher converted once into
    ``OUT/student-init`` (written under a temporary name and renamed when whole, so a kill
    mid-conversion cannot leave a partial student that a rerun would load)."""
    if student.path is not None:
        return student.path
    target = out / "student-init"
    if is_main and not (target / "config.json").exists():
        from .model.convert import convert_teacher
        convert_teacher(teacher_dir(student, is_main=True, barrier=lambda: None,
                                    prepare_embedded=prepare_embedded),
                        student.pattern, target, seed=student.init_seed, overwrite=True)
    barrier()
    return str(target)


def student_config(student: StudentConfig, out: Path, *, resume_from: Path | None,
                   fresh: bool, is_main: bool, barrier,
                   prepare_embedded: Callable[[], Path] | None = None
                   ) -> tuple[object, str | None, str | None]:
    """The config of the student a run will train, without converting or loading any
    weights: (config, the student's directory or None if it is still to be built, the
    directory holding its tokenizer). ``fresh``: a conversion left in ``out`` is not reused."""
    from transformers import AutoConfig

    from . import KDAHybridConfig  # registers the student's config class
    if resume_from is not None:
        path = str(resume_from / "model")
    elif student.path is not None:
        if not (Path(student.path) / "config.json").exists():
            raise ConfigError(f"student.path {student.path}: no config.json (not a checkpoint)")
        path = student.path
    elif not fresh and (out / "student-init" / "config.json").exists():
        path = str(out / "student-init")
    else:
        from .model.convert import load_teacher_config, student_config_from_teacher
        teacher = teacher_dir(student, is_main=is_main, barrier=barrier,
                              prepare_embedded=prepare_embedded)
        config = student_config_from_teacher(load_teacher_config(teacher), student.pattern)
        return config, None, str(teacher)
    config = AutoConfig.from_pretrained(path)
    if not isinstance(config, KDAHybridConfig):
        raise ConfigError(f"{path}: a {type(config).__name__} checkpoint; the trainer distills "
                          f"into KDA hybrid students (kdpipe student init --teacher ...)")
    return config, path, path


class Trainer:
    def __init__(self, cfg: Config, *, resume: bool = False, overwrite: bool = False,
                 prepare_embedded: Callable[[], Path] | None = None,
                 student: torch.nn.Module | None = None) -> None:
        """``prepare_embedded`` prepares the embedded teacher if the run needs it and it is
        missing (training never imports capture code; the CLI passes capture's).
        ``student``: the checkpoint ``student.path`` names, already loaded (trained in place;
        a caller that trains one student under several configs loads it once)."""
        if student is not None and (resume or cfg.student.path is None):
            raise ConfigError("a student given in memory needs student.path (its checkpoint) "
                              "and cannot be resumed")
        self.cfg = cfg
        self.prepare_embedded = prepare_embedded
        self.dist = dist = init_distributed(parallel=cfg.parallel, device=cfg.train.device)
        self.device = dist.device
        self.bf16 = cfg.train.precision == "bf16" or (
            cfg.train.precision == "auto" and auto_dtype(self.device) == "bfloat16")
        self.out = Path(cfg.out)

        # everything is checked, reading only, before anything is written or deleted: the out
        # directory, the resume point, the datasets against the student's config, every shard
        self.resume_from = self._check_out(resume=resume, overwrite=overwrite)
        meta = ckpt.read_meta(self.resume_from) if self.resume_from else {}
        if self.resume_from:
            self._check_resumable(meta)
        self.dataset = Dataset(cfg.data.path)
        manifest = self.dataset.manifest
        eval_manifest = Dataset(cfg.eval.data).manifest if cfg.eval.data else None
        config, student_dir, tokenizer_dir = student_config(
            cfg.student, self.out, resume_from=self.resume_from, fresh=overwrite,
            is_main=dist.is_main, barrier=dist.barrier, prepare_embedded=prepare_embedded)
        layer_map = resolve_layer_map(cfg.loss.layer_map,
                                      student_layers=config.num_hidden_layers,
                                      captured=manifest.capture.hidden_layers)
        student_name = f"student {student_dir or '(built from the teacher)'}"
        head = dense_at = None
        # one-line refusals before the others: a dense term on data that is not dense, a dense
        # dataset without its head (also when no term uses it: the dataset is damaged)
        if cfg.loss.uses_dense or manifest.codec.dense:
            head, dense_at = load_dense_head(self.dataset, student_vocab=config.vocab_size,
                                             student=student_name)
        if not cfg.loss.uses_dense:
            head = dense_at = None
        self.eval_head = self.eval_layer = None
        if eval_manifest is not None and eval_manifest.codec.dense:
            self.eval_head, self.eval_layer = load_dense_head(
                Dataset(cfg.eval.data), student_vocab=config.vocab_size, student=student_name)
        check_dataset(manifest, where=cfg.data.path, student_config=config,
                      student_dir=student_dir, tokenizer_dir=tokenizer_dir, data=cfg.data,
                      loss=cfg.loss, layer_map=layer_map)
        if eval_manifest is not None:
            check_same_teacher(manifest, eval_manifest, train_where=cfg.data.path,
                               other_where=cfg.eval.data)
        index = build_index(self.dataset, on_corrupt=cfg.data.on_corrupt_shard, dist=dist,
                            skipped=meta.get("skipped_shards"))
        self.skipped = index.skipped
        self._check_skipped(meta)
        self.eval_stream = None
        if cfg.eval.data:
            self.eval_stream = eval_stream(
                cfg.eval.data, seq_len=cfg.eval.seq_len or cfg.data.seq_len,
                micro_batch=cfg.eval.micro_batch, max_tokens=cfg.eval.max_tokens, dist=dist,
                hidden_layers=[] if self.eval_head is None else [self.eval_layer])
            if self.eval_head is not None:
                self.eval_head = self.eval_head.to(self.device)

        # then the out directory and the student
        if not self.resume_from:
            self._prepare_out(overwrite=overwrite)
        torch.manual_seed(cfg.train.seed)
        init_dir = prepare_student(cfg.student, self.out, is_main=dist.is_main,
                                   barrier=dist.barrier, prepare_embedded=prepare_embedded)
        self.tokenizer_src = init_dir
        if student is None:
            student = load_student(str(self.resume_from / "model") if self.resume_from
                                   else init_dir, kda_backend=cfg.student.kda_backend)

        # objective, projections, frozen parameters, memory savers
        self.objective = training_objective(cfg.loss, layer_map=layer_map, dense_layer=dense_at)
        module = DistillModule(student, objective=self.objective,
                               teacher_hidden_size=manifest.teacher.hidden_size,
                               projection=cfg.loss.projection,
                               hidden_source=manifest.capture.hidden_source,
                               teacher_head=None if head is None else head.to(self.device))
        if self.resume_from:
            ckpt.load_projections(module, self.resume_from)
        self.trainable, self.frozen = freeze(student, cfg.train.frozen)
        if cfg.train.gradient_checkpointing:
            enable_activation_checkpointing(student, cfg.train.checkpoint_layers)
        module.to(self.device)
        if wants_compile(cfg.train.compile, self.device):
            compile_decoder_layers(student)

        # parallelism, then the optimizer over the (possibly sharded) parameters
        self.strategy = strategy_of(cfg.parallel, dist, module)
        if self.bf16 and self.strategy != "fsdp":     # FSDP2 wants one dtype per parameter group
            frozen_linears_to_bf16(student)
        self.model = parallelize(module, parallel=cfg.parallel, dist=dist)
        self.module = unwrap(self.model)
        self.optimizer = build_optimizer(self.module, optim=cfg.optim)
        self.seq_per_step = global_batch(world_size=dist.world_size,
                                         grad_accum=cfg.train.grad_accum,
                                         micro_batch=cfg.train.micro_batch)
        self.total_steps = cfg.train.max_steps or math.ceil(
            cfg.train.max_tokens / (self.seq_per_step * cfg.data.seq_len))
        warmup = cfg.optim.warmup_steps or int(cfg.optim.warmup_ratio * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, partial(
            lr_multiplier, warmup=warmup, total=self.total_steps,
            min_ratio=cfg.optim.min_lr_ratio, schedule=cfg.optim.schedule))

        # resume state
        self.step, self.tokens_seen = 0, 0
        self.last_train, self.last_eval = meta.get("metrics", {}), meta.get("eval", {})
        state = StreamState(seed=cfg.data.seed)
        if self.resume_from:
            self.step, self.tokens_seen = meta["step"], meta["tokens_seen"]
            state = StreamState(**meta["data_state"])
            ckpt.load_training_state(self.resume_from, module=self.module,
                                     optimizer=self.optimizer, scheduler=self.scheduler,
                                     dist=dist)

        # data streams and metrics
        d = cfg.data
        stream = DistillStream(
            d.path, index, seq_len=d.seq_len, packing=d.packing, shuffle=d.shuffle,
            shuffle_block=d.shuffle_block, streams=d.streams, seed=d.seed, rank=dist.rank,
            world_size=dist.world_size, grad_accum=cfg.train.grad_accum,
            micro_batch=cfg.train.micro_batch, hidden_layers=self.objective.teacher_layers,
            decode_in_worker=d.decode_on == "worker" or self.device.type != "cuda",
            cache_row_groups=d.cache_row_groups)
        self.batches = TrainBatches(stream, state, workers=d.workers, device=self.device)
        self.metrics = MetricsLog(self.out, enabled=dist.is_main, tensorboard=cfg.log.tensorboard,
                                  resume_step=self.step if self.resume_from else None)
        # seconds of evaluation and checkpointing not yet in a train record (see one_step)
        self._between_steps = {"eval": 0.0, "checkpoint": 0.0}
        if self.skipped and not self.resume_from:   # a resumed run keeps its first start's
            self.metrics.log("data", 0, {
                "documents": index.num_documents, "skipped_shards": len(self.skipped),
                "skipped_files": sorted(self.skipped),
                "skipped_documents": sum(e.documents for e in self.dataset.shards
                                         if e.file in self.skipped)})

    # -- setup helpers ----------------------------------------------------------------------

    def _inputs(self) -> dict[str, Path]:
        """The local directories the run reads, by config key."""
        cfg = self.cfg
        found = {"data.path": local_path(cfg.data.path), "eval.data": local_path(cfg.eval.data),
                 "student.path": local_path(cfg.student.path)}
        if is_embedded_teacher(cfg.student.teacher):
            found["student.teacher"] = embedded_teacher_dir()
        elif cfg.student.teacher:
            found["student.teacher"] = Path(cfg.student.teacher)
        return {k: v for k, v in found.items() if v is not None}

    def _check_out(self, *, resume: bool, overwrite: bool) -> Path | None:
        """The checkpoint to resume from, after checking (reading only) that ``out`` may be
        written and, with ``overwrite``, deleted (``run_dir.check_out``)."""
        check_out(self.out, self._inputs(), overwrite=overwrite)
        existing = ckpt.latest_checkpoint(self.out)
        if resume:
            return existing
        if existing is not None and not overwrite:
            raise ConfigError(f"{self.out} already holds checkpoints (latest "
                              f"{existing.name}); pass --resume to continue that run or "
                              f"--overwrite to start over")
        return None

    def _prepare_out(self, *, overwrite: bool) -> None:
        """A fresh run: the previous run in ``out`` deleted (with ``overwrite``; checked
        before), the directory marked as a run and the config written."""
        if self.dist.is_main:
            if overwrite and self.out.is_dir() and any(self.out.iterdir()):
                remove_run(self.out)
            mark_run(self.out)
            (self.out / "config.yaml").write_text(dump_config(self.cfg))
        self.dist.barrier()

    def _check_skipped(self, meta: dict) -> None:
        """Report shards left out; refuse to resume if a shard went bad after the checkpoint,
        since leaving it out would change the order of data the checkpoint's position is in."""
        new = sorted(set(self.skipped) - set(meta.get("skipped_shards", {})))
        if self.resume_from and new:
            raise DatasetError(
                f"shard(s) {new} failed their checks but did not when {self.resume_from} was "
                f"written; leaving them out now would change the run's data order. Restore them "
                f"(rerunning a capture part rewrites its shards byte-identical) or start a new "
                f"run: " + "; ".join(self.skipped[f] for f in new))
        if self.skipped and self.dist.is_main:
            tqdm.write(f"warning: training without {len(self.skipped)} corrupt shard(s) "
                       f"(data.on_corrupt_shard=skip): " + "; ".join(self.skipped.values()),
                       file=sys.stderr)

    def _check_resumable(self, meta: dict) -> None:
        old = meta.get("config", {}).get("data", {})
        keys = ("path", "seq_len", "packing", "shuffle", "shuffle_block", "streams", "seed")
        changed = [k for k in keys if k in old and old[k] != getattr(self.cfg.data, k)]
        if changed:
            raise ConfigError(f"cannot resume {self.resume_from}: data settings {changed} differ "
                              f"from the checkpoint's, so its position in the data means nothing")

    # -- the loop ---------------------------------------------------------------------------

    def train(self) -> dict:
        cfg, dist = self.cfg, self.dist
        if dist.is_main and cfg.log.progress:
            tqdm.write(f"student: {self.trainable:,} trainable and {self.frozen:,} frozen "
                       f"parameters; {self.total_steps} steps of {self.seq_per_step} sequences "
                       f"x {cfg.data.seq_len} tokens on {dist.world_size} x {self.device}"
                       + (f" ({self.strategy})" if dist.distributed else ""))
        if self.eval_stream is not None and cfg.eval.at_start and self.step == 0:
            self.evaluate()
        bar = tqdm(total=self.total_steps, initial=self.step, unit="step", dynamic_ncols=True,
                   disable=not (dist.is_main and cfg.log.progress), desc="train")
        notice = (lambda sig: tqdm.write(f"{sig.name}: checkpointing after this step, then "
                                         f"stopping; again to stop at once", file=sys.stderr)
                  ) if dist.is_main else None
        try:
            with StopSignals(graceful=True, notice=notice) as stop:
                while self.step < self.total_steps:
                    last = self.one_step()
                    bar.update(1)
                    bar.set_postfix(loss=f"{last['loss']:.4f}",
                                    tok_s=f"{last['tokens_per_s']:.0f}")
                    # every rank must stop at the same step: the signals are agreed like metrics
                    got = self.dist.all_reduce_sum({s.name: float(stop.signum == s)
                                                    for s in StopSignals.SIGNALS})
                    if any(got.values()):
                        self.batches.close()
                        self.save(self.batches.state)
                        self.metrics.close()
                        return self._summary(stopped=max(got, key=got.get))
        except BaseException:
            self.batches.close()      # no loader thread left waiting on its workers at exit
            raise
        finally:
            bar.close()
        self.batches.close()
        if self.eval_stream is not None and cfg.eval.at_end and \
                self.last_eval.get("step") != self.step:
            self.evaluate()
        # a run resumed from its final checkpoint (killed before final/ was linked) has
        # nothing new to save
        done = self.resume_from is not None and self.resume_from.name == ckpt.step_name(self.step)
        saved = self.resume_from if done else self.save(self.batches.state)
        if dist.is_main:                    # the student alone, as the last checkpoint has it
            ckpt.link_tree(saved / "model", self.out / "final")
        dist.barrier()
        self.metrics.close()
        return self._summary()

    def _summary(self, **extra) -> dict:
        return {"step": self.step, "train": self.last_train, "eval": self.last_eval,
                "skipped_shards": sorted(self.skipped), **extra}

    def one_step(self) -> dict:
        """One optimizer step as ``kdpipe train`` runs it: its data, the step, its train record
        and, when due, evaluation and a checkpoint. Returns the train record, whose ``stage_s``
        holds the step's ``data_wait``, ``forward_backward`` and ``optimizer`` seconds and the
        ``eval`` and ``checkpoint`` seconds spent since the previous record (written before
        that checkpoint, a record survives a kill that follows it)."""
        cfg = self.cfg
        t0 = time.perf_counter()
        batches, state = self.batches.next_step(prefetch_next=self.step + 1 < self.total_steps)
        waited = time.perf_counter() - t0
        last = self.train_step(batches)
        self.step += 1
        self.tokens_seen += int(last["tokens"])
        last["tokens_per_s"] = last["tokens"] / max(time.perf_counter() - t0, 1e-9)
        last["epoch"], last["sample_in_epoch"] = state.epoch, state.sample_in_epoch
        last["stage_s"] = {"data_wait": waited, **last["stage_s"], **self._between_steps}
        self.last_train = last
        if self.step % cfg.train.log_every == 0 or self.step == self.total_steps:
            self.metrics.log("train", self.step, dict(last, tokens_seen=self.tokens_seen))
            self._between_steps = {"eval": 0.0, "checkpoint": 0.0}
        if self.eval_stream is not None and cfg.eval.every and \
                self.step % cfg.eval.every == 0 and self.step < self.total_steps:
            self.evaluate()
        if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0 and \
                self.step < self.total_steps:
            self.save(state)
        return last

    def forward_backward(self, batches: list[PackedBatch], counts: dict[str, float]
                         ) -> dict[str, torch.Tensor]:
        """Forward and backward of a step's micro-batches (gradients accumulated); returns the
        loss terms' sums on the device. Nothing here waits for the device: the host queues the
        backward while the GPU still runs the forward."""
        self.model.train()
        acc: dict[str, torch.Tensor] = {}
        for i, b in enumerate(batches):
            b = b.to(self.device)
            with no_sync(self.model, skip=i < len(batches) - 1):
                with autocast_for(self.device, self.bf16):
                    out = self.model(b)
                    loss = weighted_loss(out, self.objective, counts) * self.dist.world_size
                loss.backward()
            for k, v in out.items():
                acc[k] = acc[k] + v.detach().double() if k in acc else v.detach().double()
        return acc

    def train_step(self, batches: list[PackedBatch]) -> dict:
        """One optimizer step over this rank's micro-batches; returns global metrics, with
        ``stage_s``: seconds of ``forward_backward`` and ``optimizer`` (clipping, the update,
        the schedule), each ending in a device sync the step makes anyway."""
        t0 = time.perf_counter()
        counts = defaultdict(float)
        for b in batches:
            for k, v in b.counts().items():
                counts[k] += v
        counts = self.dist.all_reduce_sum(counts)            # normalizers of the global batch
        sums = {k: float(v) for k, v in self.forward_backward(batches, counts).items()}
        t1 = time.perf_counter()
        params = [p for p in self.module.parameters() if p.requires_grad]
        max_norm = self.cfg.optim.max_grad_norm
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf)
        if hasattr(grad_norm, "full_tensor"):                 # a DTensor under FSDP2
            grad_norm = grad_norm.full_tensor()
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        grad_norm = float(grad_norm)                          # waits for the update too
        t2 = time.perf_counter()
        sums = self.dist.all_reduce_sum(sums)
        metrics = {"loss": 0.0}
        for t in self.objective.terms:
            layers = len(self.objective.layer_map) if t.normalizer == "hidden_tokens" else 1
            value = sums[t.name] / max(counts[t.normalizer] * layers, 1)
            metrics[f"loss_{t.name}"] = value
            metrics["loss"] += t.weight * value
        metrics.update(grad_norm=grad_norm, lr=lr, tokens=counts["tokens"],
                       stage_s={"forward_backward": t1 - t0, "optimizer": t2 - t1})
        return metrics

    def evaluate(self) -> dict:
        t0 = time.perf_counter()
        result = evaluate(self.model, self.eval_stream, dist=self.dist, bf16=self.bf16,
                          chunk_size=self.cfg.loss.chunk_size or 1024,
                          progress=self.dist.is_main and self.cfg.log.progress,
                          teacher_head=self.eval_head, dense_layer=self.eval_layer)
        result["step"] = self.step
        self.last_eval = result
        self.metrics.log("eval", self.step, result)
        self._between_steps["eval"] += time.perf_counter() - t0
        if self.dist.is_main and self.cfg.log.progress:
            full = f" kl_full {result['kl_full']:.4f}" if "kl_full" in result else ""
            tqdm.write(f"eval step {self.step}: kl {result['kl']:.4f}{full} "
                       f"top1 {result['top1']:.3f} ce {result['ce']:.4f}")
        return result

    def save(self, state: StreamState) -> Path:
        """A checkpoint of everything a resumed run needs to continue exactly, including the
        shards left out (so they stay out) and the last evaluation (so it is not redone)."""
        t0 = time.perf_counter()
        meta = {"tokens_seen": self.tokens_seen, "data_state": state.to_dict(),
                "metrics": self.last_train, "eval": self.last_eval,
                "skipped_shards": self.skipped, "config": self.cfg.to_dict()}
        saved = ckpt.save_checkpoint(self.out, self.step, module=self.module,
                                     optimizer=self.optimizer, scheduler=self.scheduler,
                                     meta=meta, dist=self.dist,
                                     keep_last=self.cfg.checkpoint.keep_last,
                                     tokenizer_src=self.tokenizer_src)
        self._between_steps["checkpoint"] += time.perf_counter() - t0
        return saved
