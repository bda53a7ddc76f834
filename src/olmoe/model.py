"""The OLMoE decoder: RMSNorm, rotary embeddings, attention with KV cache, decoder layers, LM head.

Letters used in shape comments: B batch, L new positions in this call, P cached positions plus L,
H hidden size, N attention heads, G key/value heads, D head dimension, V vocabulary.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from olmoe.cache import KVCache
from olmoe.config import OlmoeConfig
from olmoe.errors import InputError
from olmoe.head_loss import causal_lm_loss, causal_lm_loss_from_hidden
from olmoe.moe import (
    OlmoeExperts,
    OlmoeMLP,
    OlmoeRouter,
    OlmoeSparseMoeBlock,
    RouterOutput,
    switch_aux_loss,
)
from olmoe.outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast


class OlmoeRMSNorm(nn.Module):
    def __init__(self, width: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Statistics in float32 whatever the activations' dtype; the weight multiplies after the
        # cast back, as the reference does, so bf16 results round the same way.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class OlmoLayerNorm(nn.Module):
    """OLMo's non-parametric LayerNorm (no weight, no bias), statistics in float32: the norm
    of the dense OLMo models and of the paper's norm ablation."""

    def __init__(self, width: int, eps: float = 1e-5):
        super().__init__()
        self.width, self.eps = width, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), (self.width,), eps=self.eps).to(x.dtype)


def make_norm(config: OlmoeConfig, width: int) -> nn.Module:
    """The config's norm over `width` features."""
    if config.norm_type == "nonparametric_layernorm":
        return OlmoLayerNorm(width)
    return OlmoeRMSNorm(width, config.rms_norm_eps)


class OlmoeRotaryEmbedding(nn.Module):
    """cos/sin tables for the positions of a call. Holds no state: the frequencies are recomputed
    per call (D/2 numbers), so loading onto any device or dtype never leaves a stale buffer."""

    def __init__(self, config: OlmoeConfig):
        super().__init__()
        self.dim = config.head_dim
        self.base = config.rope_theta
        self.max_positions = config.max_position_embeddings
        scaling = config.rope_scaling or {}
        self.scaling_type = scaling.get("type")
        self.factor = scaling.get("factor", 1.0)

    def inv_freq(self, position_ids: torch.Tensor) -> torch.Tensor:
        base = self.base
        if self.scaling_type == "dynamic":
            # NTK-aware scaling: past the trained length, raise the base with the sequence length.
            seq_len = int(position_ids.max()) + 1
            if seq_len > self.max_positions:
                growth = self.factor * seq_len / self.max_positions - (self.factor - 1)
                base = base * growth ** (self.dim / (self.dim - 2))
        exponents = torch.arange(0, self.dim, 2, dtype=torch.float, device=position_ids.device)
        inv_freq = 1.0 / (base ** (exponents / self.dim))  # (D/2,)
        if self.scaling_type == "linear":
            inv_freq = inv_freq / self.factor
        return inv_freq

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype):
        freqs = position_ids[..., None].float() * self.inv_freq(position_ids)  # (B, L, D/2)
        angles = torch.cat((freqs, freqs), dim=-1)  # (B, L, D)
        return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, heads, L, D); cos, sin: (B, L, D)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, L, D)
    return x * cos + rotate_half(x) * sin


class OlmoeAttention(nn.Module):
    def __init__(self, config: OlmoeConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.clip_qkv = config.clip_qkv
        self.dropout = config.attention_dropout
        h, kv, bias = config.hidden_size, self.num_kv_heads * self.head_dim, config.attention_bias
        self.q_proj = nn.Linear(h, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(h, kv, bias=bias)
        self.v_proj = nn.Linear(h, kv, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, h, bias=bias)
        # OLMoE normalises the whole q and k projections (all heads together), before the split
        # into heads and before RoPE. Per-head norms would be a different model.
        self.q_norm = make_norm(config, self.num_heads * self.head_dim) if config.qk_norm else None
        self.k_norm = make_norm(config, kv) if config.qk_norm else None

    def forward(
        self,
        x: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        cache: KVCache | None,
        cache_position: torch.Tensor,
        output_attentions: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        b, length, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # (B, L, N*D), (B, L, G*D) x2
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            q, k, v = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        q = q.view(b, length, self.num_heads, self.head_dim).transpose(1, 2)  # (B, N, L, D)
        k = k.view(b, length, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, G, L, D)
        v = v.view(b, length, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, G, L, D)
        cos, sin = rotary
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v, cache_position)  # (B, G, P, D)
        dropout = self.dropout if self.training else 0.0
        out, weights = self.attend(q, k, v, mask, dropout, output_attentions)  # (B, N, L, D)
        out = out.transpose(1, 2).reshape(b, length, -1)  # (B, L, N*D)
        return self.o_proj(out), weights

    def attend(self, q, k, v, mask, dropout: float, output_attentions: bool):
        """softmax(q k^T / sqrt(D) + mask) v, causal when no mask is given: q (B, N, L, D); k, v
        (B, G, P, D); mask additive (B, 1, L, P) or None -> (B, N, L, D) and the attention
        probabilities when `output_attentions`, else None."""
        causal = mask is None and q.shape[2] > 1
        if output_attentions:
            return self._attention_with_weights(q, k, v, mask, causal, dropout)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=dropout,
            is_causal=causal,
            enable_gqa=self.num_heads != self.num_kv_heads,
        )
        return out, None

    def _attention_with_weights(self, q, k, v, mask, causal, dropout):
        """Explicit softmax(QK^T/sqrt(D)) V, for callers who want the attention probabilities."""
        groups = self.num_heads // self.num_kv_heads
        k = k.repeat_interleave(groups, dim=1)  # (B, N, P, D)
        v = v.repeat_interleave(groups, dim=1)
        scores = q @ k.transpose(2, 3) / math.sqrt(self.head_dim)  # (B, N, L, P)
        if causal:
            mask = causal_mask(q.shape[2], q.dtype, q.device)
        if mask is not None:
            scores = scores + mask
        weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        weights = F.dropout(weights, p=dropout, training=dropout > 0)
        return weights @ v, weights


def causal_mask(length: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Additive (L, L) mask: 0 on and below the diagonal, the dtype's minimum above it."""
    blocked = torch.ones(length, length, dtype=torch.bool, device=device).triu(1)
    return torch.zeros(length, length, dtype=dtype, device=device).masked_fill(
        blocked, torch.finfo(dtype).min
    )


def build_attention_mask(
    attention_mask: torch.Tensor | None,
    cache_position: torch.Tensor,
    kv_length: int,
    dtype: torch.dtype,
) -> torch.Tensor | None:
    """Additive (B, 1, L, P) mask from a (B, P) padding mask and causality, or None when plain
    causal attention over the whole sequence is all that is needed.

    Blocked scores get the dtype's minimum (not -inf), as the reference does: a query whose keys
    are all padding then attends uniformly instead of producing NaN.
    """
    if attention_mask is not None and attention_mask.dim() == 4:  # a custom mask, used as given
        if attention_mask.dtype == torch.bool:
            return torch.zeros_like(attention_mask, dtype=dtype).masked_fill(
                ~attention_mask, torch.finfo(dtype).min
            )
        return attention_mask.to(dtype)
    length = cache_position.shape[0]
    if attention_mask is None and (length == 1 or kv_length == length):
        return None  # one new token sees everything cached; or an uncached causal pass
    device = cache_position.device
    allowed = torch.arange(kv_length, device=device) <= cache_position[:, None]  # (L, P)
    allowed = allowed[None, None]  # (1, 1, L, P)
    if attention_mask is not None:
        if attention_mask.dim() != 2 or attention_mask.shape[1] < kv_length:
            raise InputError(
                f"attention_mask must have shape (batch, {kv_length}) covering the cached and new "
                f"positions, got {tuple(attention_mask.shape)}"
            )
        padding = attention_mask[:, :kv_length].to(device=device, dtype=torch.bool)  # (B, P)
        allowed = allowed & padding[:, None, None, :]  # (B, 1, L, P)
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )


class OlmoeDecoderLayer(nn.Module):
    """Pre-norm block: h = x + Attn(RMSNorm(x)); out = h + MoE(RMSNorm(h)). A layer listed in
    `mlp_only_layers` has a dense MLP in place of the MoE, and no routing."""

    def __init__(self, config: OlmoeConfig, layer_idx: int):
        super().__init__()
        self.self_attn = OlmoeAttention(config, layer_idx)
        if layer_idx in config.mlp_only_layers:
            self.mlp = OlmoeMLP(config, config.dense_width)
        else:
            self.mlp = OlmoeSparseMoeBlock(config)
        self.input_layernorm = make_norm(config, config.hidden_size)
        self.post_attention_layernorm = make_norm(config, config.hidden_size)

    def forward(self, x, rotary, mask, cache, cache_position, output_attentions):
        """-> the layer's output, its attention probabilities (or None) and its routing (None
        for a dense layer)."""
        attn_out, attn_weights = self.self_attn(
            self.input_layernorm(x), rotary, mask, cache, cache_position, output_attentions
        )
        h = x + attn_out
        mlp_out = self.mlp(self.post_attention_layernorm(h))
        routing = None
        if isinstance(mlp_out, tuple):
            mlp_out, routing = mlp_out
        return h + mlp_out, attn_weights, routing


class OlmoePreTrainedModel(nn.Module):
    """Shared by the base model and the LM: initialisation, loading, saving, counting."""

    def __init__(self, config: OlmoeConfig):
        super().__init__()
        self.config = config

    @torch.no_grad()
    def init_weights(self) -> None:
        """OLMoE's initialisation: truncated normal (std `initializer_range`, cut at
        `init_cutoff_factor` = 3 std) for every matrix (embeddings, attention, router, experts,
        lm_head), norms at one, biases zero. (transformers uses an untruncated normal, what
        `init_cutoff_factor=None` gives; the released model was trained from this.)"""
        for module in self.modules():
            self._init_module(module)

    @torch.no_grad()
    def _init_module(self, module: nn.Module) -> None:
        if isinstance(module, OlmoeRMSNorm):
            module.weight.fill_(1.0)
        elif isinstance(module, (nn.Linear, nn.Embedding, OlmoeRouter, OlmoeExperts)):
            std, cutoff = self.config.initializer_range, self.config.init_cutoff_factor
            for name, param in module.named_parameters(recurse=False):
                if param.is_meta:  # no values to set (from_pretrained reads them in)
                    continue
                if name == "bias":
                    param.zero_()
                elif cutoff is None:
                    nn.init.normal_(param, mean=0.0, std=std)
                else:
                    nn.init.trunc_normal_(param, 0.0, std, a=-cutoff * std, b=cutoff * std)

    def check_can_generate(self) -> None:
        """Raise InputError for a model that cannot decode one token at a time."""
        if self.config.moe_routing == "expert_choice":
            raise InputError(
                "this model routes by expert choice (moe_routing: expert_choice), a training "
                "ablation: each expert picks among all the tokens of a sequence, future ones "
                "included, so it cannot generate token by token. Score whole texts with it "
                "(olmoe eval, perplexity), or train a token-choice model to generate"
            )

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def num_parameters(self) -> int:
        """Parameters actually held (a tied embedding counted once)."""
        return sum(p.numel() for p in self.parameters())

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | os.PathLike,
        revision: str | None = None,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str = "cpu",
        quantize: str | None = None,
    ):
        """Load a hub-layout checkpoint: a local directory, or a hub repo id (with `revision`,
        e.g. an intermediate `step10000-tokens41B` branch). `dtype=None` keeps the stored dtype.
        `quantize="int8"` quantises the weights after loading (see olmoe.quantize; a checkpoint
        written by `olmoe quantize` loads as int8 without it, and with less memory)."""
        from olmoe.checkpoint import load_pretrained

        return load_pretrained(
            cls, path_or_repo_id, revision=revision, dtype=dtype, device=device, quantize=quantize
        )

    def save_pretrained(self, directory: str | os.PathLike, max_shard_size: int | str = "5GB"):
        """Write config.json and safetensors weights in the hub layout (per-expert keys)."""
        from olmoe.checkpoint import save_pretrained

        save_pretrained(self, directory, max_shard_size=max_shard_size)


class OlmoeModel(OlmoePreTrainedModel):
    def __init__(self, config: OlmoeConfig):
        super().__init__(config)
        # Without nn.Embedding's own random init, which init_weights replaces: on the meta
        # device (from_pretrained) its normal_ imports torch._dynamo, seconds per process.
        shape = (config.vocab_size, config.hidden_size)
        self.embed_tokens = nn.Embedding(*shape, _weight=torch.empty(shape))
        self.layers = nn.ModuleList(
            [OlmoeDecoderLayer(config, i) for i in range(config.num_hidden_layers)]
        )
        self.norm = make_norm(config, config.hidden_size)
        self.rotary_emb = OlmoeRotaryEmbedding(config)
        self.init_weights()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: KVCache | tuple | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        output_router_logits: bool | None = None,
        return_dict: bool = True,
        cache_position: torch.LongTensor | None = None,
        output_routing: bool = False,
    ) -> MoeModelOutputWithPast | tuple:
        """`output_routing=True` returns each layer's RouterOutput as `routing`;
        `output_router_logits=True` returns their logits as `router_logits` (transformers' field)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise InputError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            self._check_token_ids(input_ids)
            inputs_embeds = self.embed_tokens(input_ids)  # (B, L, H)
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.config.hidden_size:
            raise InputError(
                f"inputs_embeds must have shape (batch, length, {self.config.hidden_size}), "
                f"got {tuple(inputs_embeds.shape)}"
            )
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        cache = past_key_values
        if isinstance(cache, (tuple, list)):
            cache = KVCache.from_legacy(cache)
        if cache is None and use_cache:
            cache = KVCache(self.config.num_hidden_layers)
        length = inputs_embeds.shape[1]
        past = cache.get_seq_length() if cache is not None else 0
        if cache_position is None:
            cache_position = torch.arange(past, past + length, device=inputs_embeds.device)
        if position_ids is None:
            position_ids = cache_position.unsqueeze(0)  # (1, L), shared by the batch
        kv_length = int(cache_position[-1]) + 1 if cache is not None else length
        mask = build_attention_mask(attention_mask, cache_position, kv_length, inputs_embeds.dtype)
        rotary = self.rotary_emb(position_ids, inputs_embeds.dtype)

        hidden, all_hidden, all_attentions, routing = self.run_layers(
            inputs_embeds, rotary, mask, cache, cache_position,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            output_routing=output_routing or output_router_logits,
        )  # fmt: skip
        hidden = self.norm(hidden)
        if output_hidden_states:
            all_hidden.append(hidden)

        out = MoeModelOutputWithPast(
            last_hidden_state=hidden,
            past_key_values=cache if use_cache else None,
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
            attentions=tuple(all_attentions) if output_attentions else None,
            router_logits=tuple(r.logits for r in routing) if output_router_logits else None,
            routing=tuple(routing) if output_routing else None,
        )
        return out if return_dict else out.to_tuple()

    def run_layers(
        self,
        hidden: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        cache: KVCache | None,
        cache_position: torch.Tensor,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        output_routing: bool = False,
    ) -> tuple[torch.Tensor, list, list, list[RouterOutput]]:
        """The decoder layers in order. Returns the last layer's output (before the final norm)
        and, per layer, its input hidden states, attention probabilities and routing, each list
        empty unless asked for. The CPU engine overrides this to run a decode step's layers in
        one native call."""
        all_hidden, all_attentions, all_routing = [], [], []
        for layer in self.layers:
            if output_hidden_states:
                all_hidden.append(hidden)
            hidden, attn_weights, routing = layer(
                hidden, rotary, mask, cache, cache_position, output_attentions
            )
            if output_attentions:
                all_attentions.append(attn_weights)
            if output_routing and routing is not None:
                all_routing.append(routing)
        return hidden, all_hidden, all_attentions, all_routing

    def _check_token_ids(self, input_ids: torch.Tensor) -> None:
        if input_ids.dim() != 2:
            raise InputError(
                f"input_ids must have shape (batch, length), got {tuple(input_ids.shape)}"
            )
        if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= self.config.vocab_size):
            raise InputError(
                f"input_ids must lie in [0, {self.config.vocab_size}) (vocab_size), got values in "
                f"[{int(input_ids.min())}, {int(input_ids.max())}]: check the tokenizer matches "
                "the model"
            )


class OlmoeForCausalLM(OlmoePreTrainedModel):
    def __init__(self, config: OlmoeConfig):
        super().__init__(config)
        self.model = OlmoeModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        else:
            self._init_module(self.lm_head)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def generate(self, input_ids, attention_mask=None, **kwargs) -> torch.Tensor:
        """Prompt plus new tokens, like transformers' `generate`; see `olmoe.generation.generate`
        for the arguments (max_length, max_new_tokens, do_sample, temperature, top_k, top_p,
        repetition_penalty, eos_token_id, pad_token_id, stop_strings, generator, streamer)."""
        from olmoe.generation import generate

        return generate(self, input_ids, attention_mask, **kwargs)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: KVCache | tuple | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        output_router_logits: bool | None = None,
        return_dict: bool = True,
        cache_position: torch.LongTensor | None = None,
        num_logits_to_keep: int | torch.Tensor = 0,
        logits_to_keep: int | torch.Tensor | None = None,
        output_routing: bool = False,
        skip_logits: bool = False,
        loss_reduction: str = "mean",
    ) -> MoeCausalLMOutputWithPast | tuple:
        """`num_logits_to_keep`: 0 computes logits at every position, n > 0 at the last n only
        (generation needs one), a tensor of indices at those positions. `logits_to_keep` is the
        same argument under transformers 5's name.

        `output_routing=True` returns each layer's RouterOutput as `routing` and adds nothing
        to the loss. `output_router_logits=True` is transformers' switch: the router logits, and
        its auxiliary loss (`switch_aux_loss`) as `aux_loss`, added to `loss` with
        `router_aux_loss_coef` when labels are given.

        `skip_logits=True` (with labels) returns the loss without the (B, L, V) logits: the LM
        head and the cross-entropy run a chunk of positions at a time
        (olmoe.head_loss), and `logits` is None. Training needs only the loss.
        `loss_reduction="none"` makes `loss` each position's (B, L) next-token loss, 0 where
        nothing is scored (the auxiliary loss then stays in `aux_loss` alone)."""
        if skip_logits and labels is None:
            raise InputError(
                "skip_logits=True needs labels: without them there is nothing to return"
            )
        if logits_to_keep is not None:
            num_logits_to_keep = logits_to_keep
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        base = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            output_router_logits=output_router_logits,
            cache_position=cache_position,
            output_routing=output_routing or output_router_logits,
        )
        hidden = base.last_hidden_state  # (B, L, H)
        if isinstance(num_logits_to_keep, torch.Tensor):
            hidden = hidden[:, num_logits_to_keep]
        elif num_logits_to_keep:
            hidden = hidden[:, -num_logits_to_keep:]
        loss = aux_loss = logits = None
        if skip_logits and _plain_head(self.lm_head):
            # An engine's head may exponentiate each chunk's logits in one pass (olmoe.engine).
            fused = getattr(self.lm_head, "exp_logits", None)
            loss = causal_lm_loss_from_hidden(
                hidden, self.lm_head.weight, labels, loss_reduction, fused
            )
        else:
            logits = self.logits_from_hidden(hidden)  # (B, L or kept, V)
            if labels is not None:
                loss = causal_lm_loss(logits, labels, loss_reduction)
            if skip_logits:
                logits = None
        if output_router_logits:
            aux_loss = switch_aux_loss(
                base.routing,
                self.config.num_experts,
                attention_mask
                if attention_mask is not None and attention_mask.dim() == 2
                else None,
            )
            if loss is not None and loss_reduction == "mean":
                loss = loss + self.config.router_aux_loss_coef * aux_loss
        out = MoeCausalLMOutputWithPast(
            loss=loss,
            aux_loss=aux_loss,
            logits=logits,
            past_key_values=base.past_key_values,
            hidden_states=base.hidden_states,
            attentions=base.attentions,
            router_logits=base.router_logits,
            routing=base.routing if output_routing else None,
        )
        return out if return_dict else out.to_tuple()

    def forward_hidden(self, input_ids=None, **kwargs) -> MoeModelOutputWithPast:
        """The decoder without the LM head: `last_hidden_state` (B, L, H) after the final norm,
        and whatever else the arguments ask for (the base model's: attention_mask,
        past_key_values, use_cache, output_routing, ...). With `logits_from_hidden` it scores
        chosen positions without computing a vocabulary's logits at every position."""
        return self.model(input_ids=input_ids, **kwargs)

    def logits_from_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head: (..., H) final hidden states -> (..., V) logits."""
        return self.lm_head(hidden)


def _plain_head(head: nn.Module) -> bool:
    """Whether the LM head is a bias-free linear layer with a float weight (not a quantised
    one), which olmoe.head_loss can multiply by itself."""
    return isinstance(head, nn.Linear) and head.bias is None
