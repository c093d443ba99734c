"""Training configuration: dataclasses loaded from YAML, with ``--set key=value`` overrides.

Every section is a keyword-only dataclass, converted by ``kdpipe.schemas.convert``: unknown
keys and values of the wrong type are refused with the key's full path, at any depth, in the
file and on the command line. ``student_train/configs/reference.yaml``
documents every field; ``demo.yaml``, ``stage1.yaml`` and ``stage2.yaml`` are recipes.

Components receive only their own section (``build_stream(data=cfg.data, ...)``); the root
config is read in one place, ``trainer.Trainer.__init__``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kdpipe.schemas import ConfigError
from kdpipe.schemas.convert import from_data, load_file, load_yaml

SPARSE_LOSSES = ("kl", "reverse_kl", "jsd", "tvd")
SAMPLED_LOSSES = ("sampled",)        # on the sampled teacher signal (codec ids: sampled)
TEACHER_LOSSES = SPARSE_LOSSES + SAMPLED_LOSSES
HEAD_LOSSES = TEACHER_LOSSES + ("ce",)
HIDDEN_LOSSES = ("hidden_cosine", "hidden_mse")
DENSE_LOSSES = ("dense_kl", "dense_reverse_kl", "dense_jsd")   # need a dense dataset
TEMPERED_LOSSES = TEACHER_LOSSES + DENSE_LOSSES
LOSS_KINDS = HEAD_LOSSES + HIDDEN_LOSSES + DENSE_LOSSES
MISSING_MODES = ("zero", "tail")


@dataclass(kw_only=True)
class StudentConfig:
    path: str | None = None          # a student checkpoint (save_pretrained directory)
    teacher: str | None = None       # or build one from this teacher ("embedded" or a directory)
    pattern: str = "3:1"             # layer pattern when building from the teacher
    init_seed: int = 0               # seed of the KDA-only parameters when building
    kda_backend: str = "auto"        # auto | torch | fla

    def validate(self) -> None:
        if (self.path is None) == (self.teacher is None):
            raise ConfigError("student: set exactly one of student.path (a student checkpoint) "
                              "and student.teacher (build a student from this teacher)")


@dataclass(kw_only=True)
class DataConfig:
    path: str = "runs/capture"       # dataset directory or filesystem URL
    seq_len: int = 2048              # tokens per packed sequence
    packing: str = "whole"           # whole | concat
    shuffle: bool = True
    shuffle_block: int = 4           # row groups whose documents are shuffled together
    streams: int = 1                 # canonical streams (row-group partitions of the order)
    seed: int = 42
    workers: int = 0                 # DataLoader worker processes per rank
    decode_on: str = "worker"        # worker | device
    cache_row_groups: int = 8        # row groups each reader keeps in memory
    codec: str | None = None         # require this codec (preset name or file)
    check_tokenizer: bool = True
    on_corrupt_shard: str = "error"  # error | skip (leave out shards failing their sha256)

    def validate(self) -> None:
        _positive(self, "seq_len", "shuffle_block", "streams", "cache_row_groups")
        _choice(self, "packing", ("whole", "concat"))
        _choice(self, "decode_on", ("worker", "device"))
        _choice(self, "on_corrupt_shard", ("error", "skip"))
        if self.workers < 0:
            raise ConfigError(f"data.workers must be >= 0, got {self.workers}")


@dataclass(kw_only=True)
class LossTerm:
    kind: str
    weight: float = 1.0
    temperature: float = 1.0
    missing: str | None = None       # zero | tail; None: loss.missing

    def validate(self, where: str) -> None:
        if self.kind not in LOSS_KINDS:
            raise ConfigError(f"{where}.kind: unknown loss {self.kind!r}; known: "
                              f"{', '.join(LOSS_KINDS)}")
        if self.temperature <= 0:
            raise ConfigError(f"{where}.temperature must be positive, got {self.temperature}")
        if self.kind not in TEMPERED_LOSSES and self.temperature != 1.0:
            raise ConfigError(f"{where}: temperature applies to {', '.join(TEMPERED_LOSSES)} "
                              f"only")
        if self.missing is not None and self.missing not in MISSING_MODES:
            raise ConfigError(f"{where}.missing must be one of {MISSING_MODES}, "
                              f"got {self.missing!r}")


@dataclass(kw_only=True)
class LossConfig:
    terms: list[LossTerm] = field(default_factory=lambda: [LossTerm(kind="kl")])
    missing: str = "zero"            # default missing-mass handling of the sparse losses
    chunk_size: int = 1024           # positions per lm_head chunk (0: all at once)
    layer_map: Any = "all"           # "all" or [[student_layer, teacher_layer], ...]
    projection: str = "auto"         # auto | none | always (learned student->teacher linear)

    def validate(self) -> None:
        if not self.terms:
            raise ConfigError("loss.terms is empty")
        for i, t in enumerate(self.terms):
            t.validate(f"loss.terms[{i}]")
        _choice(self, "missing", MISSING_MODES)
        _choice(self, "projection", ("auto", "none", "always"))
        if self.chunk_size < 0:
            raise ConfigError(f"loss.chunk_size must be >= 0, got {self.chunk_size}")
        if not (self.layer_map == "all" or isinstance(self.layer_map, list)):
            raise ConfigError(f"loss.layer_map must be 'all' or a list of [student, teacher] "
                              f"pairs, got {self.layer_map!r}")

    @property
    def uses_hidden(self) -> bool:
        return any(t.kind in HIDDEN_LOSSES and t.weight != 0 for t in self.terms)

    @property
    def uses_dense(self) -> bool:
        return any(t.kind in DENSE_LOSSES for t in self.terms)


@dataclass(kw_only=True)
class OptimConfig:
    lr: float = 1e-3
    min_lr_ratio: float = 0.1        # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 0
    warmup_ratio: float = 0.0        # used when warmup_steps is 0
    schedule: str = "cosine"         # cosine | constant
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0       # 0: no clipping

    def validate(self) -> None:
        _choice(self, "schedule", ("cosine", "constant"))
        if self.lr <= 0 or len(self.betas) != 2:
            raise ConfigError("optim.lr must be positive and optim.betas two numbers")


@dataclass(kw_only=True)
class TrainConfig:
    max_steps: int = 0               # optimizer steps (0: from max_tokens)
    max_tokens: int = 0              # or: stop after about this many tokens
    micro_batch: int = 1             # sequences per forward (packed into one row)
    grad_accum: int = 1              # micro-batches per optimizer step and rank
    precision: str = "auto"          # auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp32
    gradient_checkpointing: bool = False
    checkpoint_layers: int = 0       # with it: how many decoder layers recompute (0: all)
    compile: str = "auto"            # auto (CUDA: torch.compile each decoder layer) | layers | none
    frozen: list[str] = field(default_factory=list)   # regexes of parameter names to freeze
    seed: int = 0
    device: str = "auto"             # auto | cpu | cuda
    log_every: int = 1

    def validate(self) -> None:
        _positive(self, "micro_batch", "grad_accum", "log_every")
        _choice(self, "precision", ("auto", "bf16", "fp32"))
        _choice(self, "compile", ("auto", "layers", "none"))
        if self.checkpoint_layers < 0:
            raise ConfigError("train.checkpoint_layers must be >= 0 (0: every layer)")
        if self.max_steps <= 0 and self.max_tokens <= 0:
            raise ConfigError("set train.max_steps or train.max_tokens")


@dataclass(kw_only=True)
class ParallelConfig:
    strategy: str = "auto"           # auto (fsdp if a replica does not fit a GPU, else ddp)
    backend: str = "auto"            # auto (nccl on CUDA, gloo on CPU) | nccl | gloo

    def validate(self) -> None:
        _choice(self, "strategy", ("auto", "ddp", "fsdp", "none"))
        _choice(self, "backend", ("auto", "nccl", "gloo"))


@dataclass(kw_only=True)
class CheckpointConfig:
    every: int = 0                   # save every N steps (0: only at the end)
    keep_last: int = 2

    def validate(self) -> None:
        if self.every < 0 or self.keep_last < 1:
            raise ConfigError("checkpoint.every must be >= 0 and checkpoint.keep_last >= 1")


@dataclass(kw_only=True)
class EvalConfig:
    data: str | None = None          # held-out dataset (None: no evaluation)
    every: int = 0                   # evaluate every N steps (0: only at start/end)
    at_start: bool = True            # evaluate the initial student (the baseline)
    at_end: bool = True
    max_tokens: int = 0              # evaluate on at most this many tokens (0: all)
    seq_len: int = 0                 # 0: data.seq_len
    micro_batch: int = 1


@dataclass(kw_only=True)
class LogConfig:
    tensorboard: bool = True
    progress: bool = True


@dataclass(kw_only=True)
class Config:
    out: str = "runs/train"
    student: StudentConfig = field(default_factory=StudentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def validate(self) -> "Config":
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if hasattr(section, "validate"):
                section.validate()
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _positive(obj, *names: str) -> None:
    for n in names:
        if getattr(obj, n) < 1:
            raise ConfigError(f"{_section(obj)}.{n} must be at least 1, got {getattr(obj, n)}")


def _choice(obj, name: str, allowed: tuple) -> None:
    if getattr(obj, name) not in allowed:
        raise ConfigError(f"{_section(obj)}.{name} must be one of {', '.join(allowed)}, "
                          f"got {getattr(obj, name)!r}")


def _section(obj) -> str:
    return type(obj).__name__.removesuffix("Config").lower()


# -- plain data -> Config: kdpipe.schemas.convert, with --set overrides on the way -------------

def _is_dataclass_type(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def set_override(raw: dict, key: str, value: Any, cls=None) -> None:
    """Set dotted ``key`` (``loss.terms.1.weight``) in the raw config mapping, checking every
    segment against the dataclass schema so a typo names the valid keys at its level."""
    cls = cls or Config
    parts = key.split(".")
    node: Any = raw
    tp: Any = cls
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        here = ".".join(parts[:i + 1])
        tp = _strip_optional(tp)
        if _is_dataclass_type(tp):
            names = [f.name for f in dataclasses.fields(tp)]
            if part not in names:
                parent = ".".join(parts[:i]) or "the config"
                raise ConfigError(f"--set {key}: {parent} has no key {part!r}; valid keys: "
                                  f"{', '.join(names)}")
            child_tp = typing.get_type_hints(tp)[part]
            if last:
                node[part] = value
                return
            if node.get(part) is None:
                child = _strip_optional(child_tp)
                node[part] = [] if typing.get_origin(child) is list else {}
            node, tp = node[part], child_tp
        elif typing.get_origin(tp) is list:
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"--set {key}: {'.'.join(parts[:i])} is a list of {len(node)} "
                                  f"entries; {part!r} is not an index into it")
            if last:
                node[int(part)] = value
                return
            node, tp = node[int(part)], (typing.get_args(tp) or (Any,))[0]
        else:
            raise ConfigError(f"--set {key}: {'.'.join(parts[:i])} is a value, not a section "
                              f"(at {here!r})")


def _strip_optional(tp):
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def parse_set(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value")
    key, text = item.split("=", 1)
    try:
        value = load_yaml(text, f"--set {key}") if text != "" else ""
    except ConfigError:
        value = text
    return key.strip(), value


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """The config of a YAML file (or the defaults) with ``key=value`` overrides applied.

    The file is converted alone first, so an error names the file only when the file is at
    fault; what goes wrong after the overrides is theirs."""
    raw: dict = {}
    if path is not None:
        raw = load_file(path)
        if raw is None:
            raw = {}
        from_data(Config, raw, file=str(path))
    for item in overrides:
        key, value = parse_set(item)
        set_override(raw, key, value)
    return from_data(Config, raw, file="--set" if overrides else None).validate()


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
