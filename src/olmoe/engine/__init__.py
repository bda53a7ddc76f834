"""The CPU engine: olmoe's fast path, applied to a reference model from outside.

    model = olmoe.engine.apply(OlmoeForCausalLM.from_pretrained(path, dtype="bfloat16"))

`apply` swaps the class of each module that has a faster CPU version (linear layers, RMSNorm,
the router, attention, the experts, their int8 forms, and the decoder stack) for an engine
subclass with the same parameters and checkpoint keys. Those subclasses send the calls that
native kernels (AVX-512 BF16/VNNI, or AVX2) do well to them (see olmoe/engine/layers.py for
which calls) and run one decode step's layers in one native call (olmoe/engine/decode.py);
every other call goes to the reference code they inherit. They compute what the reference computes, in bf16 with float32
sums; tests/engine compares each path with the reference.

`generate`, the command line, the server, evaluation and the trainer apply it themselves.
Where it cannot run (neither AVX-512 BF16/VNNI nor AVX2, no compiler, or OLMOE_KERNELS=0), and
for a model with any of the paper's design switches off the released architecture, `apply`
changes nothing; `remove` gives the reference modules back.
"""

from __future__ import annotations

from torch import nn

from olmoe.config import OlmoeConfig
from olmoe.engine import native
from olmoe.engine.decode import CpuOlmoeModel
from olmoe.engine.layers import ENGINE_CLASSES
from olmoe.model import OlmoeModel

_TO_ENGINE: dict[type[nn.Module], type[nn.Module]] = {**ENGINE_CLASSES, OlmoeModel: CpuOlmoeModel}
_TO_REFERENCE = {engine: reference for reference, engine in _TO_ENGINE.items()}


def available() -> bool:
    """Whether the native kernels run on this machine (compiling them on first use)."""
    return native.compiled() is not None


def apply(model: nn.Module) -> nn.Module:
    """Give `model`'s modules their engine classes, in place, where the engine runs here;
    returns `model`. Safe to call again, e.g. after quantising or replacing modules."""
    if available() and released_design(model):
        _swap(model, _TO_ENGINE)
    return model


def released_design(model: nn.Module) -> bool:
    """Whether `model` has the released architecture, the one the engine's modules implement
    (the paper's design switches, olmoe.config.DESIGN_SWITCHES, run on the reference code)."""
    config = getattr(model, "config", None)
    return not isinstance(config, OlmoeConfig) or not config.transformers_unsupported()


def remove(model: nn.Module) -> nn.Module:
    """Give `model` its reference module classes back, in place; returns `model`."""
    _swap(model, _TO_REFERENCE)
    return model


def applied(model: nn.Module) -> bool:
    """Whether any of `model`'s modules runs on the engine."""
    return any(type(module) in _TO_REFERENCE for module in model.modules())


def _swap(model: nn.Module, classes: dict[type[nn.Module], type[nn.Module]]) -> None:
    # Exact types only: a user's own subclass of a reference module keeps its forward.
    for module in model.modules():
        replacement = classes.get(type(module))
        if replacement is not None:
            module.__class__ = replacement


__all__ = ["applied", "apply", "available", "native", "released_design", "remove"]
