"""Grammar-constrained decoding with xgrammar: JSON schema, any JSON, regex, choice, EBNF.

`StructuredOutputsParams` (vLLM's name) says what the output must match; it is checked when
made (the grammar is built without the tokenizer, which is cheap), so a bad schema is a
ValueError naming the problem before the request reaches the engine. The engine compiles the
grammar against its vocabulary on a worker thread when the request arrives
(`StructuredOutputManager.submit`, an LRU of compiled grammars keyed by the spec) and schedules
the request once it is compiled; each sequence then carries an `xgrammar.GrammarMatcher`. Per
step one bitmask is filled for the whole batch (`fill_masks`: a row per constrained row, in
one call, right after the model step is launched, so on CUDA it overlaps the forward pass),
and the sampler applies it to the logits of those rows only (`apply_grammar_masks`); the matcher is advanced with the sampled token (`accept`), and
a terminated matcher ends the sequence with "stop".
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    import xgrammar as xgr

    from engine.sequence import Sequence
    from engine.tokenizer import EngineTokenizer

logger = logging.getLogger(__name__)

KINDS = ("json", "regex", "choice", "grammar", "json_object")
# Whitespace between JSON tokens: at most this many characters per gap (a newline and the
# indent of JSON four levels deep at 2-4 spaces a level fits). Without a bound, a model that
# favours whitespace never gets to the values.
MAX_JSON_WHITESPACE = 16
# xgrammar's messages start "[hh:mm:ss] /path/file.cc:123: "; the rest names the problem.
_XGR_PREFIX = re.compile(r"^\[[0-9:]+\] [^ ]+:[0-9]+: ")


@dataclass
class StructuredOutputsParams:
    """What the output must match: exactly one of `json` (a JSON schema, as a dict or JSON
    text), `regex`, `choice` (one of these strings), `grammar` (EBNF, llama.cpp's GBNF
    dialect) or `json_object=True` (any JSON object). vLLM's names and meaning."""

    json: str | dict[str, Any] | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False
    _key: tuple[str, str, bool] | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        given = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError(
                f"structured_outputs must set exactly one of {', '.join(KINDS)}; got "
                f"{given or 'none'}"
            )
        kind = given[0]
        if isinstance(self.json, str):
            try:
                self.json = _loads(self.json)
            except ValueError as e:
                raise ValueError(f"structured_outputs: json is not valid JSON: {e}") from None
        if self.json is not None and not isinstance(self.json, dict | bool):
            raise ValueError("structured_outputs: json must be a JSON schema (an object)")
        if self.regex is not None and not isinstance(self.regex, str):
            raise ValueError("structured_outputs: regex must be a string")
        if self.grammar is not None and not isinstance(self.grammar, str):
            raise ValueError("structured_outputs: grammar must be a string")
        if self.choice is not None and (
            not isinstance(self.choice, list | tuple)
            or not self.choice
            or not all(isinstance(c, str) and c for c in self.choice)
        ):
            raise ValueError("structured_outputs: choice must be a non-empty list of strings")
        if self.json_object is not None and self.json_object is not True:
            raise ValueError("structured_outputs: json_object must be true")
        spec = {
            "json": lambda: json.dumps(self.json),  # key order is property order
            "regex": lambda: self.regex,
            "choice": lambda: json.dumps(list(self.choice or [])),
            "grammar": lambda: self.grammar,
            "json_object": lambda: "",
        }[kind]()
        self._key = (kind, spec, not self.disable_any_whitespace)
        build_grammar(self._key)  # raises ValueError naming what is wrong

    @property
    def key(self) -> tuple[str, str, bool]:
        """(kind, canonical spec text, any whitespace): what the compiled grammar depends on."""
        assert self._key is not None
        return self._key


GuidedDecodingParams = StructuredOutputsParams  # vLLM's earlier name


def _loads(text: str) -> Any:
    return json.loads(text)


def _xgr() -> Any:
    import xgrammar

    return xgrammar


def build_grammar(key: tuple[str, str, bool]) -> xgr.Grammar:
    """The grammar of a spec, without a tokenizer; ValueError says what is wrong with it."""
    xgr = _xgr()
    kind, spec, any_ws = key
    try:
        if kind == "json":
            schema = json.loads(spec)
            if schema is False:
                raise ValueError("the schema `false` matches nothing")
            text = "{}" if schema is True else spec
        elif kind == "json_object":
            text = '{"type": "object"}'
        if kind in ("json", "json_object"):
            ws = MAX_JSON_WHITESPACE if any_ws else None
            grammar = xgr.Grammar.from_json_schema(
                text, any_whitespace=any_ws, max_whitespace_cnt=ws
            )
            return _no_control_chars(grammar)
        if kind == "regex":
            return xgr.Grammar.from_regex(spec)
        if kind == "choice":
            alternatives = " | ".join(json.dumps(c) for c in json.loads(spec))
            return xgr.Grammar.from_ebnf(f"root ::= {alternatives}")
        return xgr.Grammar.from_ebnf(spec)
    except Exception as e:  # xgrammar's parse and conversion errors (RuntimeError mostly)
        what = {"json": "JSON schema", "json_object": "JSON object", "regex": "regex",
                "choice": "choice", "grammar": "grammar"}[kind]  # fmt: skip
        message = _XGR_PREFIX.sub("", str(e).strip()).strip()
        raise ValueError(f"structured_outputs: invalid {what}: {message}") from None


# xgrammar writes the characters of a string with minLength/maxLength as this class, which lets
# control characters through (JSON forbids them unescaped in a string); its plain strings
# exclude them.
_LENGTH_BOUNDED_CHAR = r"[^\"\\\r\n]"
_JSON_STRING_CHAR = r"[^\0-\x1f\"\\\r\n]"


def _no_control_chars(grammar: xgr.Grammar) -> xgr.Grammar:
    text = str(grammar)
    if _LENGTH_BOUNDED_CHAR not in text:
        return grammar
    return _xgr().Grammar.from_ebnf(text.replace(_LENGTH_BOUNDED_CHAR, _JSON_STRING_CHAR))


def tokenizer_info(
    tokenizer: EngineTokenizer, vocab_size: int, stop_token_ids: set[int]
) -> xgr.TokenizerInfo:
    """xgrammar's view of the vocabulary: every id up to the model's vocab size (ids past the
    tokenizer's and special tokens are never allowed; the stop tokens end a grammar)."""
    xgr = _xgr()
    tok = tokenizer.tokenizer
    special = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
    encoded = [""] * vocab_size
    for text, i in tok.get_vocab(with_added_tokens=True).items():
        if i < vocab_size and i not in special:
            encoded[i] = text
    # The encoding of the vocabulary (byte-level BPE, byte fallback, raw) and whether a space
    # is prepended, read from tokenizer.json as xgrammar's from_huggingface does.
    meta = xgr.TokenizerInfo._detect_metadata_from_hf(tok.to_str())
    return xgr.TokenizerInfo(
        encoded,
        vocab_type=meta["vocab_type"],
        vocab_size=vocab_size,
        stop_token_ids=sorted(stop_token_ids),
        add_prefix_space=meta["add_prefix_space"],
    )


class StructuredOutputManager:
    """Compiles grammars off the step loop and hands out matchers; compiled grammars are kept
    in an LRU keyed by `StructuredOutputsParams.key`."""

    def __init__(
        self,
        tokenizer: EngineTokenizer,
        vocab_size: int,
        stop_token_ids: set[int],
        cache_size: int = 128,
    ) -> None:
        self.vocab_size = vocab_size
        self._tokenizer = tokenizer
        self._stop_token_ids = stop_token_ids
        self._compiler: Any = None  # built on the worker thread, at first use
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="grammar-compile")
        self._cache: OrderedDict[tuple[str, str, bool], Future[Any]] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def submit(self, params: StructuredOutputsParams) -> Future[Any]:
        """The compiled grammar of `params`, as a future (done at once on a cache hit)."""
        key = params.key
        with self._lock:
            fut = self._cache.get(key)
            if fut is not None and not (fut.done() and fut.exception() is not None):
                self._cache.move_to_end(key)
                return fut  # compiled or compiling (a failed compile is tried again)
            fut = self._executor.submit(self._compile, key)
            self._cache[key] = fut
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return fut

    def _compile(self, key: tuple[str, str, bool]) -> Any:
        xgr = _xgr()
        if self._compiler is None:
            info = tokenizer_info(self._tokenizer, self.vocab_size, self._stop_token_ids)
            self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        return self._compiler.compile_grammar(build_grammar(key))

    @staticmethod
    def matcher(compiled: Any) -> xgr.GrammarMatcher:
        return _xgr().GrammarMatcher(compiled)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


@dataclass
class GrammarMasks:
    """One step's bitmask (int32, one bit per token, a row per sampled row) and the rows that
    have a grammar."""

    bitmask: torch.Tensor
    rows: list[int]

    def expand(self, parents: list[int]) -> GrammarMasks:
        """The masks of a batch whose row j samples from row `parents[j]` (n > 1 forks: a
        fork's matcher is in its parent's state, so it shares the parent's mask)."""
        if parents == list(range(len(parents))):
            return self
        has = set(self.rows)
        return GrammarMasks(self.bitmask[parents], [j for j, p in enumerate(parents) if p in has])


_FILLER = threading.local()  # a BatchGrammarMatcher per thread that fills masks


def fill_masks(seqs: list[Sequence], vocab_size: int) -> GrammarMasks | None:
    """The masks of each constrained sequence's next token; None if none is constrained."""
    rows = [i for i, s in enumerate(seqs) if s.grammar is not None]
    if not rows:
        return None
    filler = getattr(_FILLER, "matcher", None)
    if filler is None:
        filler = _FILLER.matcher = _xgr().BatchGrammarMatcher(max_threads=1)
    bitmask = torch.full((len(seqs), (vocab_size + 31) // 32), -1, dtype=torch.int32)
    filler.batch_fill_next_token_bitmask([seqs[i].grammar for i in rows], bitmask, indices=rows)
    return GrammarMasks(bitmask, rows)


def apply_grammar_masks(
    logits: torch.Tensor, seqs: list[Sequence], masks: GrammarMasks | None = None
) -> None:
    """Set to -inf the logits of the tokens each constrained row's grammar forbids now (rows
    without a grammar are left as they are). `logits` is `[len(seqs), vocab]`; `masks`, when
    given, were filled by `fill_masks` for the rows' parents (`GrammarMasks.expand`)."""
    if masks is None:
        masks = fill_masks(seqs, logits.shape[1])
        if masks is None:
            return
    bitmask = masks.bitmask if logits.device.type == "cpu" else masks.bitmask.to(logits.device)
    _xgr().apply_token_bitmask_inplace(
        logits, bitmask, vocab_size=logits.shape[1], indices=masks.rows
    )


def accept(seq: Sequence, token: int, stop_token_ids: set[int]) -> str | None:
    """Advance `seq`'s matcher by its sampled token: "stop" once the grammar has ended (a
    matcher ends only by accepting one of its stop tokens, the engine's EOS ids), "abort" if
    the token breaks the grammar (it cannot, once masked)."""
    matcher = seq.grammar
    if not matcher.accept_token(token):
        logger.warning("request %s: token %d rejected by its grammar", seq.request_id, token)
        return "abort"
    return "stop" if token in stop_token_ids and matcher.is_terminated() else None
