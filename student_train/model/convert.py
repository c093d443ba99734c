"""Build a KDA hybrid student from a teacher checkpoint (RADLADS-style initialization).

Copied from the teacher: embeddings, LM head, all norms, all MLPs, and q/k/v/o of the
full-attention layers (their GQA kept). KDA layers take q_proj and o_proj from the teacher and
k_proj/v_proj repeated from the KV heads to every head, whole heads at a time, so KDA head j
starts from teacher KV head ``j // (num_heads / num_kv_heads)``. Everything only KDA has (short
convs, f/b/g projections, A_log, dt_bias, o_norm) starts from fla's initialization.

The student is built on the meta device and materialized once, in the teacher's dtype, and
teacher tensors are read one at a time from the safetensors files: converting a 4.5B teacher
needs memory for the student only. Parameter counts come from meta models and allocate nothing.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from kdpipe.compress import check_writable, publish_dir, share_tree
from kdpipe.schemas import ConfigError

from .configuration import LAYER_TYPES, MODEL_TYPE, KDAHybridConfig, parse_layer_pattern
from .modeling import KDAHybridForCausalLM

# Teacher model_type -> (architecture, whether its MLP is gated (Llama) or ReLU^2 (Arcee)).
SUPPORTED_TEACHERS = {"llama": ("LlamaForCausalLM", True), "arcee": ("ArceeForCausalLM", False)}
COPY, REPEAT_KV, FRESH = "copy", "repeat_kv", "fresh"
# What a conversion writes: save_pretrained's files and a tokenizer's.
STUDENT_FILES = re.compile(
    r"(config|generation_config|tokenizer|tokenizer_config|special_tokens_map|added_tokens|"
    r"vocab)\.json|model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json|"
    r"tokenizer\.model|merges\.txt|chat_template\.jinja")


def teacher_architecture(teacher_config) -> str:
    """The teacher's architecture name (from ``architectures``, else its model type)."""
    archs = getattr(teacher_config, "architectures", None) or []
    if archs:
        return archs[0]
    known = SUPPORTED_TEACHERS.get(teacher_config.model_type)
    return known[0] if known else f"model_type {teacher_config.model_type!r}"


def student_config_from_teacher(teacher_config, pattern: str | list[str]) -> KDAHybridConfig:
    """The student config for a teacher config and a layer pattern (see ``parse_layer_pattern``)."""
    arch = teacher_architecture(teacher_config)
    supported = {name for name, _ in SUPPORTED_TEACHERS.values()}
    if arch not in supported or teacher_config.model_type not in SUPPORTED_TEACHERS:
        raise ConfigError(f"teacher architecture {arch} is not supported; supported: "
                          f"{', '.join(sorted(supported))}")
    tc = teacher_config
    layer_types = parse_layer_pattern(pattern, tc.num_hidden_layers)
    if getattr(tc, "attention_bias", False) and "kda" in layer_types:
        raise ConfigError(f"the {arch} teacher has attention biases, which KDA projections lack; "
                          "use a pattern without KDA layers")
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    return KDAHybridConfig(
        vocab_size=tc.vocab_size, hidden_size=tc.hidden_size,
        intermediate_size=tc.intermediate_size, num_hidden_layers=tc.num_hidden_layers,
        num_attention_heads=tc.num_attention_heads,
        num_key_value_heads=tc.num_key_value_heads or tc.num_attention_heads, head_dim=head_dim,
        hidden_act=tc.hidden_act, mlp_gated=SUPPORTED_TEACHERS[tc.model_type][1],
        mlp_bias=getattr(tc, "mlp_bias", False),
        attention_bias=getattr(tc, "attention_bias", False),
        rms_norm_eps=tc.rms_norm_eps, max_position_embeddings=tc.max_position_embeddings,
        rope_parameters=dict(tc.rope_parameters), initializer_range=tc.initializer_range,
        tie_word_embeddings=bool(getattr(tc, "tie_word_embeddings", False)),
        bos_token_id=tc.bos_token_id, eos_token_id=tc.eos_token_id, pad_token_id=tc.pad_token_id,
        layer_types=layer_types, kda_num_heads=tc.num_attention_heads, kda_head_dim=head_dim,
        dtype=getattr(tc, "dtype", None))


def _meta_model(config) -> torch.nn.Module:
    with torch.device("meta"):
        if isinstance(config, KDAHybridConfig):
            return KDAHybridForCausalLM(config)
        return AutoModelForCausalLM.from_config(config)


def _unique_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return dict(model.named_parameters())          # tied parameters appear once


def count_parameters(config) -> int:
    """Parameters of the model a config describes (student or teacher), counted on the meta
    device: nothing is allocated, so AFM-4.5B-sized configs take a second."""
    return sum(p.numel() for p in _unique_parameters(_meta_model(config)).values())


def parameter_source(name: str, config: KDAHybridConfig) -> str:
    """Where a student parameter comes from: ``copy`` (same name in the teacher), ``repeat_kv``
    (teacher KV heads repeated to every KDA head) or ``fresh`` (KDA-only, fla's init)."""
    parts = name.split(".")
    if parts[:2] != ["model", "layers"] or parts[3] != "self_attn":
        return COPY                                     # embeddings, head, norms, MLPs
    if config.layer_types[int(parts[2])] != "kda" or parts[4] in ("q_proj", "o_proj"):
        return COPY                                     # full attention keeps q/k/v/o
    if parts[4] in ("k_proj", "v_proj"):
        return REPEAT_KV
    return FRESH


def repeat_kv_heads(weight: torch.Tensor, num_kv_heads: int, num_heads: int) -> torch.Tensor:
    """``[n_kv * D, hidden]`` -> ``[n_heads * D, hidden]``, each KV head repeated as a whole
    (rows of one head stay together; a row-wise repeat would interleave heads)."""
    if num_heads % num_kv_heads:
        raise ConfigError(f"{num_heads} heads are not a multiple of {num_kv_heads} KV heads")
    head_dim = weight.shape[0] // num_kv_heads
    heads = weight.reshape(num_kv_heads, head_dim, weight.shape[1])
    return heads.repeat_interleave(num_heads // num_kv_heads, dim=0).reshape(-1, weight.shape[1])


@dataclass
class ConversionReport:
    """What a conversion did, for the CLI's table and for tests."""

    teacher_architecture: str
    teacher_parameters: int
    layer_types: list[str]
    counts: dict[str, int] = field(default_factory=dict)   # copy / repeat_kv / fresh -> numel
    out_dir: Path | None = None
    tokenizer_written: bool = False

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def copied(self) -> int:
        return self.counts.get(COPY, 0) + self.counts.get(REPEAT_KV, 0)

    def table(self) -> str:
        def row(label: str, n: int) -> str:
            return f"{label:<28}{n:>16,}{n / self.total:>9.1%}"
        kinds = ", ".join(f"{sum(t == k for t in self.layer_types)} {k}" for k in LAYER_TYPES)
        lines = [f"teacher: {self.teacher_architecture}, {self.teacher_parameters:,} parameters",
                 f"student layers: {kinds}",
                 f"{'parameters':<28}{'count':>16}{'share':>9}",
                 row("copied from the teacher", self.copied),
                 row("  of which k/v heads repeated", self.counts.get(REPEAT_KV, 0)),
                 row("fresh (KDA init)", self.counts.get(FRESH, 0)),
                 row("total", self.total)]
        return "\n".join(lines)


class TeacherTensors:
    """Read a teacher's tensors by name from its safetensors file(s), one at a time."""

    def __init__(self, teacher_dir: Path) -> None:
        index = teacher_dir / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {k: teacher_dir / f for k, f in weight_map.items()}
        elif (teacher_dir / "model.safetensors").exists():
            with safe_open(teacher_dir / "model.safetensors", framework="pt") as f:
                self.files = dict.fromkeys(f.keys(), teacher_dir / "model.safetensors")
        else:
            raise ConfigError(f"{teacher_dir}: no model.safetensors or "
                              "model.safetensors.index.json "
                              "(teacher weights must be in safetensors format)")

    def get(self, name: str) -> torch.Tensor:
        if name not in self.files:
            raise ConfigError(f"teacher checkpoint has no tensor {name!r}")
        with safe_open(self.files[name], framework="pt") as f:
            return f.get_tensor(name)


def plan_student(teacher_dir: str | Path,
                 pattern: str | list[str]) -> tuple[KDAHybridConfig, ConversionReport]:
    """Student config and parameter accounting from the teacher's config alone (no weights read)."""
    teacher_config = load_teacher_config(Path(teacher_dir))
    return _plan(teacher_config, pattern)


def _plan(teacher_config, pattern) -> tuple[KDAHybridConfig, ConversionReport]:
    config = student_config_from_teacher(teacher_config, pattern)
    counts = dict.fromkeys((COPY, REPEAT_KV, FRESH), 0)
    for name, param in _unique_parameters(_meta_model(config)).items():
        counts[parameter_source(name, config)] += param.numel()
    report = ConversionReport(teacher_architecture(teacher_config),
                              count_parameters(teacher_config), list(config.layer_types), counts)
    return config, report


def load_teacher_config(teacher_dir: Path):
    """The teacher's transformers config (read from its config.json alone)."""
    if not (teacher_dir / "config.json").exists():
        raise ConfigError(f"{teacher_dir}: not a Hugging Face model directory (no config.json)")
    return AutoConfig.from_pretrained(teacher_dir)


def convert_teacher(teacher_dir: str | Path, pattern: str | list[str], out_dir: str | Path, *,
                    seed: int = 0, overwrite: bool = False) -> ConversionReport:
    """Write a student checkpoint (safetensors, config, tokenizer) initialized from the teacher."""
    teacher_dir, out_dir = Path(teacher_dir), Path(out_dir)
    check_student_out(out_dir, teacher_dir, overwrite=overwrite)
    teacher_config = load_teacher_config(teacher_dir)
    config, report = _plan(teacher_config, pattern)
    tensors = TeacherTensors(teacher_dir)
    dtype = config.dtype if isinstance(config.dtype, torch.dtype) else torch.float32

    with torch.device("meta"):
        student = KDAHybridForCausalLM._from_config(config, dtype=dtype)
    student.to_empty(device="cpu")
    student.tie_weights()                           # to_empty unties shared parameters
    params = _unique_parameters(student)
    plan = {name: parameter_source(name, config) for name in params}
    n_heads, n_kv = config.kda_num_heads, config.num_key_value_heads
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(seed)
        for name, param in params.items():
            if plan[name] == FRESH:
                continue
            source = tensors.get(name)
            if plan[name] == REPEAT_KV:
                source = repeat_kv_heads(source, n_kv, n_heads)
            if source.shape != param.shape:
                raise ConfigError(f"teacher tensor {name} has shape {tuple(source.shape)}, "
                                  f"the student expects {tuple(param.shape)}")
            param.copy_(source)
        # Modules whose own parameters are all fresh get the model's initializer (fla's init).
        for prefix, module in student.named_modules():
            own = [f"{prefix}.{n}" if prefix else n
                   for n, _ in module.named_parameters(recurse=False)]
            if own and all(plan.get(n) == FRESH for n in own):
                student._init_weights(module)
        if student.model.rotary_emb is not None:
            student._init_weights(student.model.rotary_emb)

    # an existing out_dir is replaced: check_student_out accepted it (empty or a converted
    # student); a crash never leaves a partial student behind
    with publish_dir(out_dir) as tmp:
        student.save_pretrained(tmp)
        report.tokenizer_written = _copy_tokenizer(teacher_dir, tmp)
        if (teacher_dir / "generation_config.json").exists():
            GenerationConfig.from_pretrained(teacher_dir).save_pretrained(tmp)
        share_tree(tmp)
    report.out_dir = out_dir
    return report


def check_student_out(out_dir: Path, teacher_dir: Path, *, overwrite: bool) -> None:
    """Refuse an ``out_dir`` whose replacement could lose data: the teacher or a directory
    above it, the working directory or one above it, a file, or a non-empty directory unless
    ``overwrite`` is given and it holds a kdpipe student and nothing else (``STUDENT_FILES``).
    Reads only."""
    where = out_dir.resolve()
    if teacher_dir.resolve() == where or where in teacher_dir.resolve().parents:
        raise ConfigError(f"--out {out_dir} is or contains the teacher {teacher_dir}; choose "
                          f"another directory")
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir} is a file, not a directory")
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        check_writable(out_dir)
        return
    if not overwrite:
        raise ConfigError(f"--out {out_dir} exists and is not empty (use --overwrite to "
                          f"replace a student written by kdpipe student init)")
    cwd = Path.cwd().resolve()
    if where == cwd or where in cwd.parents:
        raise ConfigError(f"--out {out_dir} is the working directory or a directory above it; "
                          f"--overwrite never deletes it")
    foreign = sorted(p.name + ("/" if p.is_dir() else "") for p in out_dir.iterdir()
                     if p.is_dir() or not STUDENT_FILES.fullmatch(p.name))
    if foreign or _model_type(out_dir) != MODEL_TYPE:
        why = (f"it holds files a conversion does not write ({', '.join(foreign[:5])})"
               if foreign else f"its config.json is not a {MODEL_TYPE} student's")
        raise ConfigError(f"--overwrite replaces only a student written by kdpipe student init; "
                          f"{out_dir} is not one: {why}")
    check_writable(out_dir)


def _model_type(model_dir: Path) -> str | None:
    try:
        return json.loads((model_dir / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def _copy_tokenizer(teacher_dir: Path, out_dir: Path) -> bool:
    """Save the teacher's tokenizer beside the student; ``False`` if the teacher has none."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    except (OSError, ValueError):
        return False
    tokenizer.save_pretrained(out_dir)
    return True
