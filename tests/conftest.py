"""Shared helpers: tiny random OLMoE models, an offline hub; transformers' side is in parity.py."""

from __future__ import annotations

import huggingface_hub
import pytest
import torch

from olmoe import OlmoeConfig, OlmoeForCausalLM


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """Give every parameter (norms and biases too) random values, so that no feature of the
    model can hide behind an initial value of one or zero."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=generator) * std
        param.copy_(noise + (1.0 if "norm" in name else 0.0))
    return model


def tiny_model(seed: int = 0, **overrides) -> OlmoeForCausalLM:
    torch.manual_seed(seed)
    return randomize(OlmoeForCausalLM(OlmoeConfig.tiny(**overrides)), seed).eval()


def use_offline_hub(monkeypatch, home, cache) -> None:
    """Make huggingface_hub read only the local cache `cache` (with `home` as HF_HOME)."""
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the environment once, at import.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HOME", str(home))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run a module's tiny models on one thread: their matrices gain nothing from threads, and
    on a busy machine OpenMP's waiting threads cost more than they bring."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(1234)
    yield
