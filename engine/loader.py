"""Model files: HF directories (config.json + *.safetensors) and GGUF files (dequantized).

Both yield weights under HF's LlamaForCausalLM names so the model has one loading path.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.config import ModelConfig

if TYPE_CHECKING:
    import torch

_GGUF_ARCHS = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}
_GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_TOP_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}


def is_gguf(path: str | Path) -> bool:
    return str(path).endswith(".gguf")


def gguf_reader(path: str | Path):
    """Parsing a GGUF header is slow (Python loops over the token arrays): parse once."""
    return _gguf_reader(str(Path(path).resolve()))


@functools.lru_cache(maxsize=2)
def _gguf_reader(path: str):
    import gguf

    return gguf.GGUFReader(path)


def gguf_metadata(reader) -> dict[str, Any]:
    """Scalar/string/array fields of a GGUF header as Python values (token lists included)."""
    out: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        out[key] = field.contents()
    return out


def load_model_config(path: str | Path) -> ModelConfig:
    path = Path(path)
    if is_gguf(path):
        reader = gguf_reader(path)
        return _gguf_config(gguf_metadata(reader), reader)
    if not (path / "config.json").exists():
        raise ValueError(f"model must be an HF directory with config.json or a .gguf file: {path}")
    return ModelConfig.from_hf_dir(path)


def _gguf_config(meta: dict[str, Any], reader) -> ModelConfig:
    arch = meta["general.architecture"]
    if arch not in _GGUF_ARCHS:
        raise ValueError(
            f"GGUF general.architecture must be one of {sorted(_GGUF_ARCHS)}, got {arch!r}"
        )
    tensor_names = {t.name for t in reader.tensors}
    heads = meta[f"{arch}.attention.head_count"]
    hidden = meta[f"{arch}.embedding_length"]
    vocab = meta.get(f"{arch}.vocab_size") or len(meta["tokenizer.ggml.tokens"])
    cfg = {
        "architectures": [_GGUF_ARCHS[arch]],
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": meta[f"{arch}.feed_forward_length"],
        "num_hidden_layers": meta[f"{arch}.block_count"],
        "num_attention_heads": heads,
        "num_key_value_heads": meta.get(f"{arch}.attention.head_count_kv", heads),
        "head_dim": meta.get(f"{arch}.attention.key_length", hidden // heads),
        "rms_norm_eps": meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5),
        "rope_theta": meta.get(f"{arch}.rope.freq_base", 10000.0),
        "max_position_embeddings": meta.get(f"{arch}.context_length", 2048),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": False,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
    }
    if f"{arch}.attention.sliding_window" in meta:
        cfg["sliding_window"] = meta[f"{arch}.attention.sliding_window"]
    return ModelConfig.from_hf_dict(cfg)


def iter_weights(path: str | Path, cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) for every weight of the model at `path`."""
    path = Path(path)
    if is_gguf(path):
        yield from _iter_gguf(path, cfg)
        return
    from safetensors import safe_open

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"model directory {path} has no *.safetensors files")
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                yield name, f.get_tensor(name)


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved rope pairs -> rotate-half halves)."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def _iter_gguf(path: Path, cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    import torch
    from gguf.quants import dequantize

    reader = gguf_reader(path)
    permute = reader.fields["general.architecture"].contents() in ("llama", "mistral")
    for t in reader.tensors:
        base, _, kind = t.name.rpartition(".")
        if base.startswith("blk."):
            _, layer, short = base.split(".", 2)
            if short not in _GGUF_LAYER_NAMES:
                continue
            name = f"model.layers.{layer}.{_GGUF_LAYER_NAMES[short]}.{kind}"
        elif base in _GGUF_TOP_NAMES:
            name = f"{_GGUF_TOP_NAMES[base]}.{kind}"
        else:
            continue  # e.g. rope_freqs
        w = dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        w = w.reshape([int(d) for d in reversed(t.shape)])
        if permute and ".q_proj." in name:
            w = _unpermute(w, cfg.num_attention_heads)
        elif permute and ".k_proj." in name:
            w = _unpermute(w, cfg.num_key_value_heads)
        w = np.ascontiguousarray(w)
        if not w.flags.writeable:  # an F32 tensor is the file's read-only memory map
            w = w.copy()
        yield name, torch.from_numpy(w)


def load_generation_config(path: str | Path) -> dict[str, Any]:
    """HF generation_config.json defaults (empty for GGUF or when absent)."""
    file = Path(path) / "generation_config.json"
    if is_gguf(path) or not file.exists():
        return {}
    return json.loads(file.read_text())
