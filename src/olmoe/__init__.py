"""olmoe: OLMoE, Allen AI's open Mixture-of-Experts language model, in one PyTorch package."""

from olmoe.cache import KVCache
from olmoe.config import OlmoeConfig
from olmoe.errors import CheckpointError, ConfigError, DataError, InputError, OlmoeError
from olmoe.generation import SamplingParams, generate
from olmoe.model import OlmoeForCausalLM, OlmoeModel
from olmoe.moe import RouterOutput, route, switch_aux_loss
from olmoe.outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from olmoe.streaming import IncrementalDecoder, TextStream, TextStreamer
from olmoe.tokenizer import BatchEncoding, Tokenizer

# transformers' name, so code written for it (the OLMoE model card) runs with only its imports
# changed.
AutoTokenizer = Tokenizer

__version__ = "0.1.0"

__all__ = [
    "AutoTokenizer",
    "BatchEncoding",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "IncrementalDecoder",
    "InputError",
    "KVCache",
    "MoeCausalLMOutputWithPast",
    "MoeModelOutputWithPast",
    "OlmoeError",
    "OlmoeConfig",
    "OlmoeForCausalLM",
    "OlmoeModel",
    "RouterOutput",
    "SamplingParams",
    "TextStream",
    "TextStreamer",
    "Tokenizer",
    "generate",
    "route",
    "switch_aux_loss",
]
