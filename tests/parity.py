"""The transformers side of the parity tests, in one place: its config for a tiny olmoe config,
its copy of an olmoe model (always crossing through olmoe's checkpoint code), and the comparison
of two forward outputs."""

from __future__ import annotations

import torch
import transformers
from torch.testing import assert_close

from olmoe import OlmoeConfig, OlmoeForCausalLM

TOL = dict(atol=1e-5, rtol=1e-5)  # float32


def reference_config(**overrides) -> transformers.OlmoeConfig:
    """transformers' config for `OlmoeConfig.tiny(**overrides)`."""
    return transformers.OlmoeConfig.from_dict(OlmoeConfig.tiny(**overrides).to_dict())


def reference_from(
    model: OlmoeForCausalLM, directory, attn_implementation: str | None = "eager"
) -> transformers.OlmoeForCausalLM:
    """transformers' float32 copy of `model`, saved by olmoe into `directory` and loaded by
    transformers (`attn_implementation=None`: its default, SDPA)."""
    model.save_pretrained(directory)
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    return transformers.OlmoeForCausalLM.from_pretrained(
        directory, dtype=torch.float32, **kwargs
    ).eval()


def run_both(ours, ref, **inputs):
    kwargs = dict(output_router_logits=True, output_hidden_states=True, output_attentions=True)
    with torch.no_grad():
        return ours(**inputs, **kwargs), ref(**inputs, **kwargs)


def assert_outputs_match(mine, theirs, labels: bool = True):
    assert_close(mine.logits, theirs.logits, **TOL)
    if labels:
        assert_close(mine.loss, theirs.loss, **TOL)
    assert_close(mine.aux_loss, theirs.aux_loss, **TOL)
    for name in ("router_logits", "hidden_states", "attentions"):
        ours_t, ref_t = getattr(mine, name), getattr(theirs, name)
        assert len(ours_t) == len(ref_t), name
        for a, b in zip(ours_t, ref_t):
            assert_close(a, b, **TOL)
