"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM) over a paged KV cache.

Attention heads and the MLP's intermediate dimension are split across tensor-parallel ranks
(column-parallel qkv/gate_up, row-parallel o/down followed by an all-reduce); embeddings, norms
and the LM head are replicated. The hot-path ops come from `kernels.ops`; under `torch.compile`
norms and RoPE are plain torch (the compiler fuses them) and attention is the opaque
`torch.ops.skybroker.paged_attention`, which reads the step's cache layout from
`kernels.attention_op.step_context`: the traced graph depends only on the token count. Each
decoder layer is one `nested_compile_region` whose attention call names no layer
(`NEXT_LAYER`), so the layers trace to one graph.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from engine.config import ModelConfig
from kernels import attention_op, ops, reference

_compiling = torch.compiler.is_compiling


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual=None):
    if _compiling():
        return reference.rms_norm(x, weight, eps, residual)
    return ops.rms_norm(x, weight, eps, residual)


def apply_rotary(q, k, positions: torch.Tensor, rope: torch.Tensor):
    if _compiling():
        cos, sin = rope[positions].unsqueeze(1).chunk(2, dim=-1)
        return reference._rotate(q, cos, sin), reference._rotate(k, cos, sin)
    return ops.apply_rotary(q, k, positions, rope)


class TPGroup:
    """This process's place in the tensor-parallel group."""

    def __init__(self, rank: int = 0, size: int = 1) -> None:
        self.rank, self.size = rank, size

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(x)
        return x


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        return rms_norm(x, self.weight, self.eps, residual)


def _linear(in_features: int, out_features: int, bias: bool) -> nn.Linear:
    layer = nn.Linear(in_features, out_features, bias=bias)
    layer.requires_grad_(False)
    return layer


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, tp: TPGroup) -> None:
        super().__init__()
        if cfg.num_attention_heads % tp.size or cfg.num_key_value_heads % tp.size:
            raise ValueError(
                f"tensor_parallel_size must divide the attention heads "
                f"({cfg.num_attention_heads}) and KV heads ({cfg.num_key_value_heads}); "
                f"got {tp.size}"
            )
        self.tp = tp
        self.num_heads = cfg.num_attention_heads // tp.size
        self.num_kv_heads = cfg.num_key_value_heads // tp.size
        self.head_dim = cfg.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim**-0.5
        self.sliding_window = cfg.layer_sliding_windows[layer_idx]
        self.qkv_proj = _linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, cfg.qkv_bias)
        self.o_proj = _linear(self.q_size, cfg.hidden_size, cfg.o_bias)
        self.layer_idx = layer_idx

    def forward(self, positions: torch.Tensor, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        q, k = apply_rotary(q, k, positions, rope)
        if _compiling():  # no layer index in the graph: one compiled layer serves every layer
            layer = attention_op.NEXT_LAYER
            o = torch.ops.skybroker.paged_attention(q, k, v, layer, self.scale, self.sliding_window)
        else:
            o = attention_op.attend(q, k, v, self.layer_idx, self.scale, self.sliding_window)
        out = F.linear(o.reshape(-1, self.q_size), self.o_proj.weight)
        out = self.tp.all_reduce(out)
        if self.o_proj.bias is not None:
            out += self.o_proj.bias
        return out


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPGroup) -> None:
        super().__init__()
        if cfg.intermediate_size % tp.size:
            raise ValueError(
                f"tensor_parallel_size must divide intermediate_size ({cfg.intermediate_size}); "
                f"got {tp.size}"
            )
        self.tp = tp
        self.inter = cfg.intermediate_size // tp.size
        self.gate_up_proj = _linear(cfg.hidden_size, 2 * self.inter, cfg.mlp_bias)
        self.down_proj = _linear(self.inter, cfg.hidden_size, cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.inter, dim=-1)
        out = F.linear(F.silu(gate) * up, self.down_proj.weight)
        out = self.tp.all_reduce(out)
        if self.down_proj.bias is not None:
            out += self.down_proj.bias
        return out


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, tp: TPGroup) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(cfg, layer_idx, tp)
        self.mlp = LlamaMLP(cfg, tp)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, positions, x, residual, rope):
        if residual is None:
            residual = x
            x = self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x, rope)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


# The decoder layer as one compile region: dynamo traces it once and inductor's Python wrapper
# calls one compiled layer for every layer (they differ only in weights; attention takes
# NEXT_LAYER, not an index), so a first compile costs about one layer's, not every layer's.
_LAYER_REGION = torch.compiler.nested_compile_region(LlamaDecoderLayer.forward)


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPGroup | None = None, max_position: int = 0):
        super().__init__()
        tp = tp or TPGroup()
        self.cfg, self.tp = cfg, tp
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.embed_tokens.requires_grad_(False)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(cfg, i, tp) for i in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = _linear(cfg.hidden_size, cfg.vocab_size, False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        rope = ops.rope_cache(
            cfg.head_dim,
            max_position or cfg.max_position_embeddings,
            cfg.rope_theta,
            cfg.rope_scaling,
        )
        self.register_buffer("rope", rope, persistent=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Final hidden states `[T, hidden]` of the step's tokens (inside a `step_context`).

        This is what `torch.compile` traces: its only inputs are the token ids and positions.
        """
        x = self.embed_tokens(input_ids)
        residual = None
        call = _LAYER_REGION if _compiling() else LlamaDecoderLayer.forward
        for layer in self.layers:
            x, residual = call(layer, positions, x, residual, self.rope)
        x, _ = self.norm(x, residual)
        return x

    def compute_logits(self, hidden: torch.Tensor, logits_indices: torch.Tensor) -> torch.Tensor:
        """Logits `[len(logits_indices), vocab]` in fp32 of the rows that sample."""
        return self.lm_head(hidden[logits_indices]).float()

    # -- weights -------------------------------------------------------------------------
    def load_weights(self, weights) -> None:
        """Copy (hf_name, tensor) pairs in, merging q/k/v and gate/up and taking this rank's
        shard. Names follow HF's LlamaForCausalLM (`model.layers.N.self_attn.q_proj.weight`)."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            for target, dst in self._map_weight(name, tensor, params):
                dst.copy_(target)
                loaded.add(name)
        missing = [
            n
            for n in params
            if not any(n.startswith(p) for p in ("lm_head",))
            and self._hf_names(n).isdisjoint(loaded)
        ]
        if missing:
            raise ValueError(f"model weights missing for: {missing[:5]}")
        if not self.cfg.tie_word_embeddings and "lm_head.weight" not in loaded:
            raise ValueError("model weights missing for: lm_head.weight")

    def _hf_names(self, name: str) -> set[str]:
        name = "model." + name if not name.startswith("lm_head") else name
        if "qkv_proj" in name:
            return {name.replace("qkv_proj", p) for p in ("q_proj", "k_proj", "v_proj")}
        if "gate_up_proj" in name:
            return {name.replace("gate_up_proj", p) for p in ("gate_proj", "up_proj")}
        return {name}

    def _map_weight(self, name: str, w: torch.Tensor, params: dict[str, nn.Parameter]):
        """Yield (source slice, destination view) for one HF tensor."""
        if name.startswith("model."):
            name = name[len("model.") :]
        if "rotary_emb" in name:
            return
        if name == "lm_head.weight" and self.cfg.tie_word_embeddings:
            return
        r = self.tp.rank
        attn = self.layers[0].self_attn
        for proj, offset, size in (
            ("q_proj", 0, attn.q_size),
            ("k_proj", attn.q_size, attn.kv_size),
            ("v_proj", attn.q_size + attn.kv_size, attn.kv_size),
        ):
            if f".{proj}." in name:
                dst = params[name.replace(proj, "qkv_proj")]
                yield w[r * size : (r + 1) * size], dst[offset : offset + size]
                return
        for i, proj in enumerate(("gate_proj", "up_proj")):
            if f".{proj}." in name:
                dst = params[name.replace(proj, "gate_up_proj")]
                inter = dst.shape[0] // 2
                yield w[r * inter : (r + 1) * inter], dst[i * inter : (i + 1) * inter]
                return
        dst = params[name]
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            cols = dst.shape[1]
            yield w[:, r * cols : (r + 1) * cols], dst
        else:  # replicated (row-parallel biases are added once, after the all-reduce)
            yield w, dst
