"""Tokenizer: HF `tokenizers` (tokenizer.json, or rebuilt from a GGUF header) + jinja2 chat template."""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from jinja2 import Template
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from engine.loader import gguf_metadata, gguf_reader, is_gguf

_GGUF_SPECIAL_TYPES = (3, 4)  # CONTROL, USER_DEFINED
LONG_TEXT = 16384  # characters: past this, encoding takes milliseconds (see encode)


def _token_str(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


def _raise_exception(message: str) -> None:
    raise ValueError(f"chat template error: {message}")


def _tojson(value: Any, indent: int | None = None, **_: Any) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent)


class EngineTokenizer:
    """encode/decode with a model's own tokenizer, and its chat template."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        bos_token: str | None,
        eos_token: str | None,
        chat_template: str | None,
    ) -> None:
        self.tokenizer = tokenizer
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.bos_token_id = tokenizer.token_to_id(bos_token) if bos_token else None
        self.eos_token_id = tokenizer.token_to_id(eos_token) if eos_token else None
        self.chat_template = chat_template
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    # -- construction --------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path) -> EngineTokenizer:
        return cls.from_gguf(path) if is_gguf(path) else cls.from_hf_dir(path)

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> EngineTokenizer:
        path = Path(path)
        if not (path / "tokenizer.json").exists():
            raise ValueError(f"model directory {path} has no tokenizer.json")
        tok = Tokenizer.from_file(str(path / "tokenizer.json"))
        cfg_file = path / "tokenizer_config.json"
        cfg = json.loads(cfg_file.read_text()) if cfg_file.exists() else {}
        template = cfg.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t["name"]: t["template"] for t in template}
            template = named.get("default") or next(iter(named.values()), None)
        if (path / "chat_template.jinja").exists():
            template = (path / "chat_template.jinja").read_text()
        elif (path / "chat_template.json").exists():
            template = json.loads((path / "chat_template.json").read_text()).get("chat_template")
        return cls(
            tok, _token_str(cfg.get("bos_token")), _token_str(cfg.get("eos_token")), template
        )

    @classmethod
    def from_gguf(cls, path: str | Path) -> EngineTokenizer:
        """Rebuild a byte-level BPE tokenizer (GGUF `gpt2` model) from the file's header."""
        meta = gguf_metadata(gguf_reader(path))
        kind = meta.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise ValueError(
                f"GGUF tokenizer.ggml.model must be 'gpt2' (byte-level BPE), got {kind!r}"
            )
        tokens: list[str] = meta["tokenizer.ggml.tokens"]
        merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
        vocab = {t: i for i, t in enumerate(tokens)}
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        types = meta.get("tokenizer.ggml.token_type") or []
        special = [tokens[i] for i, t in enumerate(types) if t in _GGUF_SPECIAL_TYPES]
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])

        def name(key: str) -> str | None:
            idx = meta.get(key)
            return tokens[idx] if idx is not None else None

        return cls(
            tok,
            name("tokenizer.ggml.bos_token_id"),
            name("tokenizer.ggml.eos_token_id"),
            meta.get("tokenizer.chat_template"),
        )

    # -- use -----------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`. A long text is encoded through `encode_batch`, which releases
        the GIL (`encode` holds it: a megabyte takes about a second), so other threads run."""
        try:
            if len(text) < LONG_TEXT:
                enc = self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
            else:
                enc = self.tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)[0]
        except TypeError:
            if isinstance(text, str):  # tokenizers says "must be str" for a lone surrogate too
                text.encode("utf-8")  # raises UnicodeEncodeError (a ValueError) naming it
            raise
        ids = enc.ids
        # A chat-templated prompt already starts with BOS: do not add a second one.
        bos = self.bos_token_id
        if add_special_tokens and bos is not None and len(ids) > 1 and ids[0] == ids[1] == bos:
            ids = ids[1:]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
        continue_final_message: bool = False,
        **kwargs: Any,
    ) -> str:
        """The prompt text of `messages` (vLLM's arguments): `chat_template` replaces the
        model's own; `continue_final_message` ends the text where the last message's content
        ends, so the model continues it; `kwargs` are the template's own variables."""
        template = chat_template or self.chat_template
        if not template:
            raise ValueError("messages cannot be used: this model's tokenizer has no chat template")
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and "role" in m for m in messages
        ):
            raise ValueError("messages must be a list of {'role': ..., 'content': ...} dicts")
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt exclude each other")
        text = _compiled(template).render(
            **kwargs,
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
        )
        if continue_final_message:
            final = str(messages[-1].get("content") or "") if messages else ""
            if not final or final not in text:
                raise ValueError(
                    "continue_final_message needs a last message whose content the template "
                    "renders verbatim"
                )
            text = text[: text.rindex(final) + len(final)]
        return text


@lru_cache(maxsize=16)
def _compiled(template: str) -> Template:
    """A chat template compiled in a sandbox (a request may bring its own)."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def detokenize_incrementally(
    tokenizer: EngineTokenizer,
    token_ids: list[int],
    prefix_offset: int,
    read_offset: int,
    skip_special_tokens: bool = True,
) -> tuple[str, int, int]:
    """vLLM's scheme: decode a short window before the new tokens so merges and spaces come out
    right; hold text back while it ends in an incomplete UTF-8 sequence. Returns
    (new text, new prefix_offset, new read_offset)."""
    prefix_text = tokenizer.decode(token_ids[prefix_offset:read_offset], skip_special_tokens)
    new_text = tokenizer.decode(token_ids[prefix_offset:], skip_special_tokens)
    if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
        return new_text[len(prefix_text) :], read_offset, len(token_ids)
    return "", prefix_offset, read_offset
