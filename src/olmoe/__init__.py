"""olmoe: OLMoE, Allen AI's open Mixture-of-Experts language model, in one PyTorch package."""

from olmoe.cache import KVCache
from olmoe.checkpoint import CheckpointError
from olmoe.config import OlmoeConfig
from olmoe.generation import SamplingParams, generate
from olmoe.model import OlmoeForCausalLM, OlmoeModel
from olmoe.moe import RouterOutput, load_balancing_loss, route
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
    "IncrementalDecoder",
    "KVCache",
    "MoeCausalLMOutputWithPast",
    "MoeModelOutputWithPast",
    "OlmoeConfig",
    "OlmoeForCausalLM",
    "OlmoeModel",
    "RouterOutput",
    "SamplingParams",
    "TextStream",
    "TextStreamer",
    "Tokenizer",
    "generate",
    "load_balancing_loss",
    "route",
]
