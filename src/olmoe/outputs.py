"""Forward-pass results: dataclasses that also behave like transformers' `ModelOutput`.

Fields read by name (`out.logits`), by key (`out["logits"]`) or by position over the fields that
are set (`out[0]`), and `return_dict=False` gives the same values as a plain tuple.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from olmoe.cache import KVCache
from olmoe.moe import RouterOutput


class ModelOutput:
    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(
            getattr(self, f.name)
            for f in dataclasses.fields(self)
            if getattr(self, f.name) is not None
        )

    def __getitem__(self, key: int | str) -> Any:
        if isinstance(key, str):
            return getattr(self, key)
        return self.to_tuple()[key]


@dataclass
class MoeModelOutputWithPast(ModelOutput):
    last_hidden_state: torch.Tensor | None = None
    past_key_values: KVCache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    router_logits: tuple[torch.Tensor, ...] | None = None
    routing: tuple[RouterOutput, ...] | None = None


@dataclass
class MoeCausalLMOutputWithPast(ModelOutput):
    loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    past_key_values: KVCache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    router_logits: tuple[torch.Tensor, ...] | None = None
    routing: tuple[RouterOutput, ...] | None = None
