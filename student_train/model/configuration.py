"""Configuration of the KDA hybrid student and the layer-pattern language.

The student is a decoder-only transformer whose token mixer is chosen per layer:

- ``kda``: Kimi Delta Attention (a gated delta-rule linear RNN, fla's parameterization);
- ``full_nope``: the teacher's GQA softmax attention without positional encoding;
- ``full_rope``: the teacher's attention unchanged (with RoPE), so a student built with
  pattern ``teacher`` reproduces the teacher exactly and ablations can keep some layers as is.

The MLP follows the teacher family: gated (Llama: ``down(silu(gate x) * up x)``) or ungated
(Arcee: ``down(relu(up x)^2)``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig
from transformers.modeling_rope_utils import RopeParameters

from kdpipe.schemas import ConfigError

MODEL_TYPE = "kdpipe_hybrid"
LAYER_TYPES = ("kda", "full_nope", "full_rope")
FULL_ATTENTION_TYPES = ("full_nope", "full_rope")
KDA_BACKENDS = ("auto", "torch", "fla")
# One letter per layer in explicit patterns such as "KKKF".
PATTERN_LETTERS = {"K": "kda", "F": "full_nope", "R": "full_rope"}
_RATIO = re.compile(r"^(\d+):1$")


def parse_layer_pattern(pattern: str | Sequence[str], num_layers: int) -> list[str]:
    """Expand a layer pattern into one layer type per layer.

    Accepted forms:

    - ``"3:1"`` (generally ``"n:1"``): n KDA layers then one ``full_nope`` layer, repeated;
      the last layer is always full attention, so a stack whose depth is not a multiple of
      n+1 still ends with global attention.
    - ``"kda"``: every layer KDA. ``"teacher"``: every layer ``full_rope`` (the teacher itself).
    - A letter string with one letter per layer: ``K`` = kda, ``F`` = full_nope, ``R`` = full_rope.
    - A comma-separated string or a sequence of layer-type names.
    """
    if num_layers < 1:
        raise ConfigError(f"num_layers must be at least 1, got {num_layers}")
    if isinstance(pattern, str):
        text = pattern.strip()
        ratio = _RATIO.match(text)
        if ratio:
            n = int(ratio.group(1))
            if n < 1:
                raise ConfigError(f"layer pattern {pattern!r}: the ratio must be at least 1:1")
            return ["full_nope" if (i % (n + 1) == n or i == num_layers - 1) else "kda"
                    for i in range(num_layers)]
        if text == "kda":
            return ["kda"] * num_layers
        if text == "teacher":
            return ["full_rope"] * num_layers
        if "," in text:
            types = [t.strip() for t in text.split(",")]
        elif text and set(text) <= set(PATTERN_LETTERS):
            types = [PATTERN_LETTERS[c] for c in text]
        else:
            raise ConfigError(
                f"unknown layer pattern {pattern!r}: use 'n:1' (e.g. '3:1'), 'kda', 'teacher', "
                f"one letter per layer from {sorted(PATTERN_LETTERS)} (K=kda, F=full_nope, "
                f"R=full_rope), or a comma-separated list of {', '.join(LAYER_TYPES)}")
    else:
        types = [str(t) for t in pattern]
    bad = sorted({t for t in types if t not in LAYER_TYPES})
    if bad:
        raise ConfigError(f"unknown layer type(s) {bad} in pattern; "
                          f"allowed: {', '.join(LAYER_TYPES)}")
    if len(types) != num_layers:
        raise ConfigError(f"layer pattern has {len(types)} entries but the model has "
                          f"{num_layers} layers")
    return types


@strict
class KDAHybridConfig(PreTrainedConfig):
    r"""Configuration of [`KDAHybridForCausalLM`].

    Attention fields (``num_attention_heads``, ``num_key_value_heads``, ``head_dim``,
    ``attention_bias``, ``rope_parameters``) describe the full-attention layers and are the
    teacher's. ``kda_*`` fields describe the KDA layers; their heads default to the attention
    heads, which is what conversion from a teacher needs (q/o are copied head for head).

    Args:
        layer_types: One of ``kda``, ``full_nope``, ``full_rope`` per layer
            (default: the ``3:1`` pattern).
        mlp_gated: ``True`` for Llama's gated MLP (``gate_proj``/``up_proj``/``down_proj``),
            ``False`` for Arcee's ungated one (``up_proj``/``down_proj``).
        hidden_act: MLP activation, a ``transformers.activations`` name (``silu``, ``relu2``).
        kda_num_heads / kda_head_dim: KDA heads (default: ``num_attention_heads`` / ``head_dim``).
        kda_conv_size: Width of the depthwise causal convolutions on q, k, v.
        kda_norm_eps: Epsilon of the gated output RMSNorm.
        kda_backend: ``auto`` (fla kernels for CUDA tensors when fla is installed, else PyTorch),
            ``torch`` (always the PyTorch implementation), or ``fla`` (require fla).
    """

    model_type = MODEL_TYPE
    keys_to_ignore_at_inference = ["cache"]

    vocab_size: int = 32000
    hidden_size: int = 256
    intermediate_size: int = 1024
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    mlp_gated: bool = True
    mlp_bias: bool = False
    attention_bias: bool = False
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 4096
    rope_parameters: RopeParameters | dict | None = None
    initializer_range: float = 0.02
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    tie_word_embeddings: bool = False
    layer_types: list[str] | None = None
    kda_num_heads: int | None = None
    kda_head_dim: int | None = None
    kda_conv_size: int = 4
    kda_norm_eps: float = 1e-5
    kda_backend: str = "auto"

    def __post_init__(self, **kwargs):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.kda_num_heads is None:
            self.kda_num_heads = self.num_attention_heads
        if self.kda_head_dim is None:
            self.kda_head_dim = self.head_dim
        if self.layer_types is None:
            self.layer_types = parse_layer_pattern("3:1", self.num_hidden_layers)
        else:
            self.layer_types = list(self.layer_types)
        super().__post_init__(**kwargs)

    def validate_layer_type(self):
        """Replace the generic check: this model's layer types are kda/full_nope/full_rope."""
        parse_layer_pattern(self.layer_types, self.num_hidden_layers)

    def validate_architecture(self):
        """Reject shapes the layers cannot build, with a message naming the field."""
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ConfigError(f"num_attention_heads ({self.num_attention_heads}) must be a "
                              "multiple of "
                              f"num_key_value_heads ({self.num_key_value_heads})")
        if self.kda_conv_size < 1:
            raise ConfigError(f"kda_conv_size must be at least 1, got {self.kda_conv_size}")
        if self.kda_head_dim > 256:
            raise ConfigError("kda_head_dim must be at most 256 (fla's KDA kernels), "
                              f"got {self.kda_head_dim}")
        if self.kda_backend not in KDA_BACKENDS:
            raise ConfigError(f"kda_backend must be one of {KDA_BACKENDS}, "
                              f"got {self.kda_backend!r}")

    @property
    def full_attention_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t in FULL_ATTENTION_TYPES]

    @property
    def kda_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == "kda"]
