"""Free-running evaluation: does the student *generate* what the teacher generates?

Teacher-forced KL scores every position given the teacher's own text, so a student that drifts
once it conditions on its own tokens can look close to its teacher. Here both models continue
the same held-out prompts greedily, each from its own previous tokens, and we compare:

* ``gen_agreement``: the fraction of the first ``n`` generated tokens where the student's token
  equals the teacher's at the same position;
* ``gen_match``: the fraction of prompts whose whole ``n``-token continuations are equal;
* ``gen_ce``: the student's cross-entropy (nats per token) on the teacher's continuations,
  teacher-forced: how likely the student finds what the teacher says.

Prompts are cut from the held-out dataset's documents, all of one length so that a batch needs
no padding (the student packs documents and has no padding mask): the ``prompt_len`` tokens
before a chat document's first trained (assistant) token, else its first ``prompt_len`` tokens.
End-of-sequence is suppressed for ``n`` tokens, so every continuation has exactly ``n``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from kdpipe.compress import Dataset
from kdpipe.runtime import resolve_device
from kdpipe.schemas import ConfigError
from kdpipe.schemas.layout import embedded_teacher_dir, is_embedded_teacher


@dataclass
class GenerationMetrics:
    gen_agreement: float     # per-token agreement over the first n generated tokens
    gen_match: float         # fraction of prompts whose n-token continuations are equal
    gen_ce: float            # student CE on the teacher's continuations (nats/token)
    prompts: int
    prompt_len: int
    new_tokens: int

    def to_dict(self) -> dict:
        return asdict(self)


def heldout_prompts(uri: str, *, prompts: int, prompt_len: int) -> torch.Tensor:
    """``[P, prompt_len]`` prompts from the first documents of a captured dataset that are
    long enough (see the module docstring); refuses a dataset with none."""
    if prompts < 1 or prompt_len < 1:
        raise ConfigError(f"generation eval: prompts ({prompts}) and prompt length "
                          f"({prompt_len}) must be at least 1")
    found: list[np.ndarray] = []
    for doc in Dataset(uri).iter_documents(hidden_layers=[]):
        ids = np.asarray(doc.input_ids, dtype=np.int64)
        start = prompt_len
        if doc.loss_mask is not None and doc.loss_mask.any():
            start = int(np.argmax(doc.loss_mask))          # first trained (assistant) token
        if start < prompt_len or len(ids) < prompt_len:
            continue
        found.append(ids[start - prompt_len:start])
        if len(found) == prompts:
            break
    if not found:
        raise ConfigError(f"{uri}: no document has {prompt_len} tokens to use as a prompt; "
                          f"lower the prompt length")
    return torch.from_numpy(np.stack(found))


def default_teacher(uri: str) -> str:
    """The teacher a dataset was captured from, where it can be found without a download:
    the embedded teacher (prepared by ``kdpipe teacher prepare``)."""
    name = Dataset(uri).manifest.teacher.name_or_path
    if not is_embedded_teacher(name):
        raise ConfigError(f"{uri} was captured from {name!r}: pass its model directory with "
                          f"--teacher (only the embedded teacher is found by default)")
    path = embedded_teacher_dir()
    if not (path / "config.json").exists():
        raise ConfigError(f"the embedded teacher is not prepared at {path}; run "
                          f"`kdpipe teacher prepare` first")
    return str(path)


def load_teacher(path: str, *, dtype: torch.dtype = torch.float32):
    """A teacher checkpoint (any transformers causal LM) for generation."""
    from transformers import AutoModelForCausalLM

    if not (Path(path) / "config.json").exists():
        raise ConfigError(f"--teacher {path}: not a model directory (no config.json)")
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


@torch.no_grad()
def greedy(model, prompts: torch.Tensor, new_tokens: int, *, batch_size: int = 8) -> torch.Tensor:
    """``[P, new_tokens]`` greedy continuations (the model's incremental decoding cache, end
    of sequence suppressed so that every continuation has ``new_tokens`` tokens)."""
    from transformers import GenerationConfig

    eos = model.config.eos_token_id
    config = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              do_sample=False, use_cache=True, eos_token_id=eos,
                              pad_token_id=eos[0] if isinstance(eos, list) else eos)
    device = next(model.parameters()).device
    out = []
    for start in range(0, prompts.shape[0], batch_size):
        ids = prompts[start:start + batch_size].to(device)
        seq = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
        out.append(seq[:, ids.shape[1]:].cpu())
    return torch.cat(out)


@torch.no_grad()
def continuation_ce(model, prompts: torch.Tensor, continuations: torch.Tensor, *,
                    batch_size: int = 8) -> float:
    """Mean cross-entropy (nats per token) of ``model`` on ``continuations`` after ``prompts``."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    L, n = prompts.shape[1], continuations.shape[1]
    for start in range(0, prompts.shape[0], batch_size):
        p, c = prompts[start:start + batch_size], continuations[start:start + batch_size]
        seq = torch.cat([p, c], 1).to(device)
        logits = model(seq, use_cache=False).logits[:, L - 1:L - 1 + n].float()
        total += float(F.cross_entropy(logits.flatten(0, 1), c.to(device).flatten(),
                                       reduction="sum"))
        count += c.numel()
    return total / max(count, 1)


def compare(student, teacher, prompts: torch.Tensor, new_tokens: int, *, batch_size: int = 8,
            teacher_tokens: torch.Tensor | None = None) -> GenerationMetrics:
    """The metrics of the module docstring for ``student`` against ``teacher`` on ``prompts``;
    ``teacher_tokens``: the teacher's continuations, when already generated (several students
    against one teacher)."""
    if new_tokens < 1:
        raise ConfigError(f"generation eval: the number of new tokens must be at least 1, "
                          f"got {new_tokens}")
    if teacher_tokens is None:
        teacher_tokens = greedy(teacher, prompts, new_tokens, batch_size=batch_size)
    student_tokens = greedy(student, prompts, new_tokens, batch_size=batch_size)
    same = student_tokens == teacher_tokens
    return GenerationMetrics(
        gen_agreement=float(same.float().mean()), gen_match=float(same.all(1).float().mean()),
        gen_ce=continuation_ce(student, prompts, teacher_tokens, batch_size=batch_size),
        prompts=int(prompts.shape[0]), prompt_len=int(prompts.shape[1]), new_tokens=new_tokens)


def generation_eval(student_dirs: list[str], data: str, *, teacher: str | None = None,
                    prompts: int = 16, prompt_len: int = 32, new_tokens: int = 32,
                    batch_size: int = 8, device: str = "auto",
                    precision: str = "auto") -> list[GenerationMetrics]:
    """``kdpipe eval --generate``: each student against one teacher (generated once) on the
    held-out prompts of ``data``. ``teacher`` None: the dataset's teacher when it is the
    embedded one."""
    from kdpipe.runtime import auto_dtype

    from .evaluate import load_student
    try:
        dev = resolve_device(device)
    except ValueError as e:
        raise ConfigError(f"--device {e}") from e
    bf16 = precision == "bf16" or (precision == "auto" and auto_dtype(dev) == "bfloat16")
    dtype = torch.bfloat16 if bf16 else torch.float32
    teacher_model = load_teacher(teacher or default_teacher(data), dtype=dtype).to(dev)
    batch = heldout_prompts(data, prompts=prompts, prompt_len=prompt_len)
    vocab = teacher_model.get_output_embeddings().weight.shape[0]
    teacher_tokens = greedy(teacher_model, batch, new_tokens, batch_size=batch_size)
    del teacher_model
    results = []
    for path in student_dirs:
        student = load_student(path, dtype=dtype).to(dev).eval()
        if student.config.vocab_size != vocab:
            raise ConfigError(f"student {path} has vocab_size {student.config.vocab_size}, the "
                              f"teacher {vocab}: not the same tokenizer")
        results.append(compare(student, None, batch, new_tokens, batch_size=batch_size,
                               teacher_tokens=teacher_tokens))
        del student
    return results
