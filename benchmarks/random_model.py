"""Write an HF model directory with random weights in the shape of a well-known model.

Step times do not depend on weight values, so a random-weight copy of e.g. Llama-3.1-8B
profiles the same as the real one: this is how the shipped GPU profiles were measured on
machines that cannot download the real weights.

    python benchmarks/random_model.py Llama-3.1-8B-Instruct /tmp/models [--device cuda]

The directory is named after the model (the profile's model name comes from it) and holds
config.json, model.safetensors (bf16, HF LlamaForCausalLM names) and a small trained
tokenizer (the tests' fixture: its vocabulary is not the model's, which is fine for timing).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from skybroker.models import lookup


def hf_config(name: str) -> dict:
    arch = lookup(name)
    if arch is None:
        raise SystemExit(f"unknown model {name!r}: use a name from skybroker.models.KNOWN_MODELS")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": arch.hidden_size,
        "intermediate_size": arch.intermediate_size,
        "num_hidden_layers": arch.num_layers,
        "num_attention_heads": arch.num_heads,
        "num_key_value_heads": arch.num_kv_heads,
        "head_dim": arch.head_dim,
        "vocab_size": arch.vocab_size,
        "max_position_embeddings": arch.max_position_embeddings,
        "tie_word_embeddings": arch.tie_word_embeddings,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "torch_dtype": "bfloat16",
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


def random_weights(cfg: dict, device: str) -> dict[str, torch.Tensor]:
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    d, q, kv = cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    g = torch.Generator(device=device).manual_seed(0)

    def w(*shape: int) -> torch.Tensor:
        t = torch.empty(shape, dtype=torch.bfloat16, device=device)
        return t.normal_(0, 0.02, generator=g).cpu()

    out = {"model.embed_tokens.weight": w(cfg["vocab_size"], h), "model.norm.weight": w(h) + 1}
    if not cfg["tie_word_embeddings"]:
        out["lm_head.weight"] = w(cfg["vocab_size"], h)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out |= {
            p + "input_layernorm.weight": w(h) + 1,
            p + "post_attention_layernorm.weight": w(h) + 1,
            p + "self_attn.q_proj.weight": w(q * d, h),
            p + "self_attn.k_proj.weight": w(kv * d, h),
            p + "self_attn.v_proj.weight": w(kv * d, h),
            p + "self_attn.o_proj.weight": w(h, q * d),
            p + "mlp.gate_proj.weight": w(inter, h),
            p + "mlp.up_proj.weight": w(inter, h),
            p + "mlp.down_proj.weight": w(h, inter),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name", help="a known model, e.g. Llama-3.1-8B-Instruct")
    ap.add_argument("parent", type=Path, help="directory to create the model directory in")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    from fixtures_models import build_tokenizer

    d = args.parent / args.name.rsplit("/", 1)[-1]
    d.mkdir(parents=True, exist_ok=True)
    cfg = hf_config(args.name)
    (d / "config.json").write_text(json.dumps(cfg, indent=1))
    build_tokenizer(d, vocab_size=384)
    save_file(random_weights(cfg, args.device), str(d / "model.safetensors"))
    print(d)


if __name__ == "__main__":
    main()
