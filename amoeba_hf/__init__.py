"""amoeba_hf: one fine-tuned Llama-style LLM, any subnet (depth x width) on demand, for Hugging Face Transformers."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .modeling.configuration_amoeba import SUPPORTED_SOURCE_TYPES, AmoebaConfig, AmoebaConfigError
from .modeling.modeling_amoeba import AmoebaForCausalLM, AmoebaModel, AmoebaPreTrainedModel, Shape
from .modeling.shape_space import LayerWidth, ShapeSpace

AutoConfig.register("amoeba", AmoebaConfig, exist_ok=True)
AutoModel.register(AmoebaConfig, AmoebaModel, exist_ok=True)
AutoModelForCausalLM.register(AmoebaConfig, AmoebaForCausalLM, exist_ok=True)
AmoebaConfig.register_for_auto_class()
AmoebaModel.register_for_auto_class("AutoModel")
AmoebaForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__version__ = "0.1.0"

__all__ = [
    "SUPPORTED_SOURCE_TYPES",
    "AmoebaConfig",
    "AmoebaConfigError",
    "AmoebaForCausalLM",
    "AmoebaModel",
    "AmoebaPreTrainedModel",
    "LayerWidth",
    "Shape",
    "ShapeSpace",
]
