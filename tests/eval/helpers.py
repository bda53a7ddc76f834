"""What the evaluation tests share: a tiny model with the OLMo tokenizer's vocabulary, cheap to
run, in which every real token id fits."""

from __future__ import annotations

from tests.conftest import tiny_model

SMALL = {
    "vocab_size": 50304, "eos_token_id": 50279, "max_position_embeddings": 4096,
    "num_hidden_layers": 1, "hidden_size": 16, "num_attention_heads": 2, "num_experts": 4,
    "num_experts_per_tok": 1, "intermediate_size": 8,
}  # fmt: skip


def small_model(**overrides):
    """A float32 model of SMALL's shape, with `overrides` (a shorter window, say)."""
    return tiny_model(**{**SMALL, **overrides}).float()
