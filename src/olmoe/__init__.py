"""olmoe: OLMoE, Allen AI's open Mixture-of-Experts language model, in one PyTorch package.

The public names below are imported on first use (olmoe.lazy): `import olmoe` and the modules
that need no torch (the command line's parser, `olmoe.errors`, `olmoe.formats`) load without
importing it, so `olmoe --help` and a mistyped flag answer at once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from olmoe.lazy import lazy_exports

__version__ = "0.1.0"

# Each public name: the module that defines it, and its name there.
_EXPORTS = {
    # transformers' name, so code written for it (the OLMoE model card) runs with only its
    # imports changed.
    "AutoTokenizer": ("olmoe.tokenizer", "Tokenizer"),
    "BatchEncoding": ("olmoe.tokenizer", "BatchEncoding"),
    "CheckpointError": ("olmoe.errors", "CheckpointError"),
    "ConfigError": ("olmoe.errors", "ConfigError"),
    "DataError": ("olmoe.errors", "DataError"),
    "IncrementalDecoder": ("olmoe.streaming", "IncrementalDecoder"),
    "InputError": ("olmoe.errors", "InputError"),
    "KVCache": ("olmoe.cache", "KVCache"),
    "MoeCausalLMOutputWithPast": ("olmoe.outputs", "MoeCausalLMOutputWithPast"),
    "MoeModelOutputWithPast": ("olmoe.outputs", "MoeModelOutputWithPast"),
    "OlmoeError": ("olmoe.errors", "OlmoeError"),
    "OlmoeConfig": ("olmoe.config", "OlmoeConfig"),
    "OlmoeForCausalLM": ("olmoe.model", "OlmoeForCausalLM"),
    "OlmoeModel": ("olmoe.model", "OlmoeModel"),
    "RouterOutput": ("olmoe.moe", "RouterOutput"),
    "SamplingParams": ("olmoe.generation", "SamplingParams"),
    "TextStream": ("olmoe.streaming", "TextStream"),
    "TextStreamer": ("olmoe.streaming", "TextStreamer"),
    "Tokenizer": ("olmoe.tokenizer", "Tokenizer"),
    "generate": ("olmoe.generation", "generate"),
    "route": ("olmoe.moe", "route"),
    "switch_aux_loss": ("olmoe.moe", "switch_aux_loss"),
}

__all__ = list(_EXPORTS)

if TYPE_CHECKING:  # what type checkers and editors see; tests check it matches _EXPORTS
    from olmoe.cache import KVCache
    from olmoe.config import OlmoeConfig
    from olmoe.errors import CheckpointError, ConfigError, DataError, InputError, OlmoeError
    from olmoe.generation import SamplingParams, generate
    from olmoe.model import OlmoeForCausalLM, OlmoeModel
    from olmoe.moe import RouterOutput, route, switch_aux_loss
    from olmoe.outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
    from olmoe.streaming import IncrementalDecoder, TextStream, TextStreamer
    from olmoe.tokenizer import BatchEncoding, Tokenizer
    from olmoe.tokenizer import Tokenizer as AutoTokenizer


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
