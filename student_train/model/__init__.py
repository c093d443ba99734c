"""The KDA hybrid student: configuration, modeling, layers, kernels, cache and its conversion
from a teacher. It never imports training code.

Importing it registers the student with transformers' Auto classes, so
``AutoModelForCausalLM.from_pretrained(dir)`` loads a student without remote code.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .cache import KDAHybridCache
from .configuration import LAYER_TYPES, MODEL_TYPE, KDAHybridConfig, parse_layer_pattern
from .modeling import KDAHybridForCausalLM, KDAHybridModel

AutoConfig.register(MODEL_TYPE, KDAHybridConfig, exist_ok=True)
AutoModel.register(KDAHybridConfig, KDAHybridModel, exist_ok=True)
AutoModelForCausalLM.register(KDAHybridConfig, KDAHybridForCausalLM, exist_ok=True)

__all__ = ["LAYER_TYPES", "MODEL_TYPE", "KDAHybridCache", "KDAHybridConfig",
           "KDAHybridForCausalLM", "KDAHybridModel", "parse_layer_pattern"]
