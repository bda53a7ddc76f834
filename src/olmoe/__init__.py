"""olmoe: OLMoE, Allen AI's open Mixture-of-Experts language model, in one PyTorch package."""

from olmoe.cache import KVCache
from olmoe.checkpoint import CheckpointError
from olmoe.config import OlmoeConfig
from olmoe.generation import SamplingParams, generate
from olmoe.model import OlmoeForCausalLM, OlmoeModel
from olmoe.moe import RouterOutput, load_balancing_loss, route
from olmoe.outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from olmoe.streaming import IncrementalDecoder, TextStream, TextStreamer

__version__ = "0.1.0"

__all__ = [
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
    "generate",
    "load_balancing_loss",
    "route",
]
