"""Student training: the KDA hybrid student (``model``) and its training from captured shards.

Importing this package registers the student with transformers' Auto classes (through
``model``), so ``AutoModelForCausalLM.from_pretrained(dir)`` loads a trained student.
"""

from .model import (LAYER_TYPES, MODEL_TYPE, KDAHybridCache, KDAHybridConfig,
                    KDAHybridForCausalLM, KDAHybridModel, parse_layer_pattern)

__all__ = ["LAYER_TYPES", "MODEL_TYPE", "KDAHybridCache", "KDAHybridConfig",
           "KDAHybridForCausalLM", "KDAHybridModel", "parse_layer_pattern"]
