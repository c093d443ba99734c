"""Held-out evaluation: how close the student is to the teacher on captured data.

Metrics, per teacher row (each row is one predicted token):

* ``kl``: KL(teacher || student) over the teacher's top-k ids plus one bucket for the rest,
  at T = 1 (``missing: tail``); a lower bound of the full-vocabulary KL, exact up to how
  each side spreads its tail.
* ``kl_topk``: the same with the teacher renormalized on its top-k (``missing: zero``).
* ``top1``: fraction of rows where the student's argmax is the teacher's most likely id.
* ``ce``: next-token cross-entropy of the student on the text (per label row).
* on a dense held-out set (captured with a dense codec; ``dense-exact`` is the reference),
  ``kl_full``: the exact KL(teacher || student) over the whole vocabulary at T = 1, the
  teacher's distribution rebuilt from its stored last layer and head; ``top1_full``: the
  fraction of rows where the student's argmax is the teacher's full argmax.

The same code serves the trainer's periodic evaluation (any world size; sequences are
dealt over ranks and the sums reduced) and ``kdpipe eval`` on any checkpoint.
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import nullcontext

import torch
from tqdm import tqdm

from kdpipe.compress import Dataset
from kdpipe.compress.dense import TeacherHead
from kdpipe.runtime import auto_dtype, resolve_device
from kdpipe.schemas import ConfigError

from .stream import StreamState
from .stream_loader import DistillStream, RawBatch, build_index
from .train_dist import DistInfo
from .train_objective import DistillModule, eval_objective


def eval_stream(uri: str, *, seq_len: int, micro_batch: int = 1, max_tokens: int = 0,
                dist: DistInfo = DistInfo(), decode_in_worker: bool = True,
                hidden_layers: list[int] = ()) -> DistillStream:
    """The held-out data in dataset order, packed whole, dealt over the ranks (with the
    teacher's ``hidden_layers``: a dense set's last layer)."""
    index = build_index(Dataset(uri))
    return DistillStream(uri, index, seq_len=seq_len, packing="whole", shuffle=False,
                         shuffle_block=1, streams=1, seed=0, rank=dist.rank,
                         world_size=dist.world_size, grad_accum=1, micro_batch=micro_batch,
                         hidden_layers=hidden_layers, decode_in_worker=decode_in_worker,
                         limit_tokens=max_tokens)


def autocast_for(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


@torch.no_grad()
def evaluate(model, stream: DistillStream, *, dist: DistInfo, bf16: bool = False,
             chunk_size: int = 1024, progress: bool = False,
             teacher_head: TeacherHead | None = None, dense_layer: int | None = None
             ) -> dict[str, float]:
    """Held-out metrics of ``model`` (a ``DistillModule``, wrapped or not) over ``stream``;
    ``progress`` shows a bar of micro-batches on stderr (an evaluation can take minutes).
    ``teacher_head`` (on the device) and ``dense_layer``: a dense held-out set's, for the
    full-vocabulary metrics; the stream must carry that layer."""
    objective = eval_objective(chunk_size, dense_layer if teacher_head is not None else None)
    was_training = model.training
    model.eval()
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, float] = defaultdict(float)
    stream.set_state(StreamState(seed=stream.seed))
    bar = tqdm(stream, total=stream.micro_batches(), desc="eval", unit="batch",
               dynamic_ncols=True, leave=False, disable=not progress)
    for item in bar:
        batch = stream.materialize(item, dist.device) if isinstance(item, RawBatch) else item
        batch = batch.to(dist.device)
        with autocast_for(dist.device, bf16):
            out = model(batch, objective, teacher_head)
        for k, v in out.items():
            sums[k] = sums[k] + v.double() if k in sums else v.double()
        for k, v in batch.counts().items():
            counts[k] += v
    model.train(was_training)
    totals = dist.all_reduce_sum({**{k: float(v) for k, v in sums.items()}, **counts})
    rows, labels = max(totals.get("kd_rows", 0), 1), max(totals.get("ce_rows", 0), 1)
    dense = {k: totals.get(k, 0.0) / rows for k in ("kl_full", "top1_full")} \
        if objective.dense_layer is not None else {}
    return {"kl": totals.get("kl", 0.0) / rows, "kl_topk": totals.get("kl_topk", 0.0) / rows,
            "top1": totals.get("top1", 0.0) / rows, "ce": totals.get("ce", 0.0) / labels,
            **dense, "rows": int(totals.get("kd_rows", 0)),
            "tokens": int(totals.get("tokens", 0))}


def load_student(path: str, *, kda_backend: str = "auto", dtype=torch.float32):
    """A student checkpoint as a ``KDAHybridForCausalLM`` in ``dtype``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from . import KDAHybridConfig, KDAHybridForCausalLM  # registers the Auto classes
    config = AutoConfig.from_pretrained(path)
    if not isinstance(config, KDAHybridConfig):
        raise ConfigError(f"{path}: a {type(config).__name__} checkpoint; the trainer distills "
                          f"into KDA hybrid students (kdpipe student init --teacher ...)")
    config.kda_backend = kda_backend
    model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype)
    assert isinstance(model, KDAHybridForCausalLM)
    return model


def evaluate_student(student_dir: str, data: str, *, seq_len: int = 2048, max_tokens: int = 0,
                     micro_batch: int = 1, device: str = "auto", precision: str = "auto",
                     chunk_size: int = 1024, check_tokenizer: bool = True,
                     progress: bool = False) -> dict[str, float]:
    """``kdpipe eval``: metrics of any student checkpoint on a captured dataset (with the
    full-vocabulary ones on a dense dataset)."""
    from .train_checks import check_dataset, load_dense_head
    from .train_config import DataConfig, LossConfig
    try:
        dev = resolve_device(device)
    except ValueError as e:
        raise ConfigError(f"--device {e}") from e
    student = load_student(student_dir)
    ds = Dataset(data)
    if ds.codec.signal == "sampled":
        raise ConfigError(f"--data {data}: holds the sampled teacher signal; evaluation "
                          f"measures KL on top-k rows: capture the held-out set with a top-k "
                          f"codec (e.g. --codec exact)")
    head, layer = load_dense_head(ds, student_vocab=student.config.vocab_size,
                                  student=f"student {student_dir}") \
        if ds.manifest.codec.dense else (None, None)
    check_dataset(ds.manifest, where=data, student_config=student.config, student_dir=student_dir,
                  data=DataConfig(path=data, check_tokenizer=check_tokenizer),
                  loss=LossConfig(), layer_map=[])
    module = DistillModule(student, objective=eval_objective(chunk_size),
                           teacher_hidden_size=ds.manifest.teacher.hidden_size).to(dev)
    bf16 = precision == "bf16" or (precision == "auto" and auto_dtype(dev) == "bfloat16")
    stream = eval_stream(data, seq_len=seq_len, micro_batch=micro_batch, max_tokens=max_tokens,
                         dist=DistInfo(device=dev), hidden_layers=[] if head is None else [layer])
    return evaluate(module, stream, dist=DistInfo(device=dev), bf16=bf16, chunk_size=chunk_size,
                    progress=progress, teacher_head=None if head is None else head.to(dev),
                    dense_layer=layer)
