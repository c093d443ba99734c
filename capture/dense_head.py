"""The teacher's final norm and LM head, taken from a transformers model for a dense dataset.

The rebuild (``compress.dense.TeacherHead``) knows RMSNorm and LayerNorm; a teacher whose
final norm computes something else (Gemma's ``1 + weight``, say) would be rebuilt wrongly, so
the extracted head is checked against the model's own norm and head on random states before
anything is written, and refused with the difference when it does not match.
"""

from __future__ import annotations

import torch

from kdpipe.compress.dense import TeacherHead
from kdpipe.schemas import ConfigError

# relative max logit difference tolerated between the rebuild and the model's own modules
HEAD_CHECK_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def _norm_of(model) -> torch.nn.Module:
    norm = getattr(model.get_decoder(), "norm", None)
    if norm is None:
        norm = getattr(model.get_decoder(), "final_layernorm", None)
    if norm is None:
        raise ConfigError(f"{type(model).__name__}: cannot locate its final norm (a `norm` or "
                          f"`final_layernorm` of its decoder); dense codecs need it")
    return norm


def extract_head(model, *, logit_scale: float | None, softcap: float | None) -> TeacherHead:
    """The final norm and LM head of a causal LM, checked to reproduce its logits."""
    norm, lm_head = _norm_of(model), model.get_output_embeddings()
    if isinstance(norm, torch.nn.LayerNorm):
        kind, eps = "layernorm", norm.eps
    elif type(norm).__name__.endswith("RMSNorm"):
        kind = "rmsnorm"
        eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    else:
        kind, eps = None, None
    if kind is None or eps is None or getattr(norm, "weight", None) is None:
        raise ConfigError(f"{type(model).__name__}: its final norm {type(norm).__name__} is "
                          f"neither RMSNorm nor LayerNorm with a weight; dense codecs cannot "
                          f"rebuild its distribution")
    head = TeacherHead(norm=kind, norm_weight=norm.weight.detach(), eps=float(eps),
                       weight=lm_head.weight.detach(),
                       norm_bias=None if getattr(norm, "bias", None) is None
                       else norm.bias.detach(),
                       bias=None if lm_head.bias is None else lm_head.bias.detach(),
                       logit_scale=logit_scale, softcap=softcap)
    _check(model, norm, lm_head, head)
    return head


@torch.inference_mode()
def _check(model, norm, lm_head, head: TeacherHead) -> None:
    weight = lm_head.weight
    gen = torch.Generator().manual_seed(0)
    h = (torch.randn(8, head.hidden_size, generator=gen) * 4).to(weight.device, weight.dtype)
    want = lm_head(norm(h)).float()
    if head.logit_scale is not None:
        want = want * head.logit_scale
    if head.softcap is not None:
        want = torch.tanh(want / head.softcap) * head.softcap
    got = head.logits(h)
    err = float((got - want).abs().max() / want.abs().max().clamp(min=1e-6))
    if not err <= HEAD_CHECK_TOLERANCE.get(weight.dtype, 2e-2):
        raise ConfigError(f"{type(model).__name__}: the final norm and LM head rebuilt from "
                          f"its weights differ from its own by {err:.2e} (relative max logit "
                          f"difference); dense codecs do not support this teacher")
