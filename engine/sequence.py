"""One generated sequence: its tokens, how many have KV in the cache, and its block table."""

from __future__ import annotations

from enum import Enum, auto
from itertools import count
from typing import Any

from engine.sampling_params import SamplingParams


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class Sequence:
    """A prompt plus the tokens sampled after it (one of the n samples of a request)."""

    _ids = count()

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        index: int = 0,
        arrival_time: float = 0.0,
    ) -> None:
        self.seq_id = next(Sequence._ids)
        self.request_id = request_id
        self.index = index
        self.params = params
        self.arrival_time = arrival_time
        self.status = SequenceStatus.WAITING
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_computed_tokens = 0  # tokens whose K/V sit in the cache
        self.num_cached_tokens = 0  # of those, how many came from prefix-cache hits
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []  # chained hashes of the full blocks registered so far
        self.num_pending_forks = params.n - 1 if index == 0 else 0
        self.finish_reason: str | None = None
        self.logprobs: list[dict[int, float]] | None = [] if params.logprobs is not None else None
        self.cumulative_logprob = 0.0
        # Detokenization state (vLLM's incremental scheme) and the stop-string-trimmed text.
        self.output_text = ""
        self.prefix_offset = max(len(prompt_token_ids) - 5, 0)
        self.read_offset = len(prompt_token_ids)
        self.stop_reason: str | int | None = None
        self.first_token_time: float | None = None
        # (stop token ids, min length to stop, max length), set by the engine on first sample
        self.stop_limits: tuple[frozenset[int], int, int] | None = None
        self.plain_greedy: bool | None = None  # set by the sampler on first use
        self.grammar: Any = None  # its xgrammar GrammarMatcher, when the output is constrained

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    def append_token(self, token_id: int, logprobs: dict[int, float] | None = None) -> None:
        self.token_ids.append(token_id)
        if logprobs is not None and self.logprobs is not None:
            self.logprobs.append(logprobs)
            self.cumulative_logprob += logprobs[token_id]

    def fork(self, index: int) -> Sequence:
        """A sibling sample sharing this sequence's tokens so far (blocks are forked separately)."""
        child = Sequence(
            self.request_id, self.prompt_token_ids, self.params, index, self.arrival_time
        )
        child.token_ids = list(self.token_ids)
        child.num_computed_tokens = self.num_computed_tokens
        child.num_cached_tokens = self.num_cached_tokens
        child.block_hashes = list(self.block_hashes)
        child.status = self.status
        child.num_pending_forks = 0
        if self.grammar is not None:
            child.grammar = self.grammar.fork()
        return child
