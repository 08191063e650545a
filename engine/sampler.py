"""Turn a step's logits into next tokens: penalties, greedy or seeded random sampling, logprobs."""

from __future__ import annotations

import torch

from engine.sequence import Sequence
from engine.structured_output import GrammarMasks, apply_grammar_masks

_NEG_INF = float("-inf")


def _plain_greedy(seq: Sequence) -> bool:
    """Greedy with nothing else to apply (cached on the sequence: its params never change)."""
    plain = seq.plain_greedy
    if plain is None:
        p = seq.params
        plain = (
            p.greedy
            and not p.needs_penalties
            and not p.min_tokens
            and p.logprobs is None
            and not p.logit_bias
        )
        seq.plain_greedy = plain
    return plain


class Sampler:
    def __init__(self, device: torch.device, seed: int = 0) -> None:
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self._seq_generators: dict[int, torch.Generator] = {}

    def _generator(self, seq: Sequence) -> torch.Generator:
        if seq.params.seed is None:
            return self.generator
        g = self._seq_generators.get(seq.seq_id)
        if g is None:
            g = torch.Generator(device=self.device).manual_seed(seq.params.seed + seq.index)
            self._seq_generators[seq.seq_id] = g
        return g

    def forget(self, seq: Sequence) -> None:
        self._seq_generators.pop(seq.seq_id, None)

    @staticmethod
    def _apply_penalties(row: torch.Tensor, seq: Sequence) -> None:
        p = seq.params
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(seq.token_ids)), device=row.device)
            vals = row[seen]
            row[seen] = torch.where(
                vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty
            )
        if (p.presence_penalty or p.frequency_penalty) and seq.num_output_tokens:
            out = torch.tensor(seq.output_token_ids, device=row.device)
            counts = torch.bincount(out, minlength=row.shape[0]).to(row.dtype)
            row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)

    @staticmethod
    def _filter(row: torch.Tensor, seq: Sequence) -> torch.Tensor:
        p = seq.params
        row = row / p.temperature
        if 0 < p.top_k < row.shape[0]:
            kth = torch.topk(row, p.top_k).values[-1]
            row = row.masked_fill(row < kth, _NEG_INF)
        if p.top_p < 1.0:
            sorted_logits, idx = torch.sort(row, descending=True)
            probs = sorted_logits.softmax(-1)
            # drop a token when the tokens ranked above it already reach top_p; the top token
            # always stays (a top_p that float32 rounds to 0 would drop every token)
            drop = probs.cumsum(-1) - probs >= p.top_p
            drop[0] = False
            row = row.masked_fill(torch.zeros_like(drop).scatter(0, idx, drop), _NEG_INF)
        if p.min_p > 0.0:
            probs = row.softmax(-1)
            row = row.masked_fill(probs < p.min_p * probs.max(), _NEG_INF)
        return row

    def __call__(
        self,
        logits: torch.Tensor,
        seqs: list[Sequence],
        eos_token_ids: set[int],
        grammar_masks: GrammarMasks | None = None,
    ) -> tuple[list[int], list[dict[int, float] | None]]:
        """logits `[len(seqs), vocab]` fp32 (modified in place). Returns tokens and logprobs."""
        apply_grammar_masks(logits, seqs, grammar_masks)
        if all(map(_plain_greedy, seqs)):
            return logits.argmax(dim=-1).tolist(), [None] * len(seqs)
        for i, seq in enumerate(seqs):
            p = seq.params
            if p.needs_penalties:
                self._apply_penalties(logits[i], seq)
            if p.logit_bias:
                ids = list(p.logit_bias)
                logits[i, ids] += torch.tensor(list(p.logit_bias.values()), device=logits.device)
            if seq.num_output_tokens < p.min_tokens and seq.grammar is None:  # grammar decides
                banned = list(p.stop_token_ids) + ([] if p.ignore_eos else list(eos_token_ids))
                if banned:
                    logits[i, banned] = _NEG_INF
        tokens = logits.argmax(dim=-1).tolist()
        for i, seq in enumerate(seqs):
            if seq.params.greedy:
                continue
            probs = self._filter(logits[i], seq).softmax(-1)
            noise = torch.empty_like(probs).exponential_(generator=self._generator(seq))
            tokens[i] = int((probs / noise).argmax())  # Gumbel-style race == multinomial
        logprobs: list[dict[int, float] | None] = [None] * len(seqs)
        want = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        if want:
            lp = torch.log_softmax(logits[want], dim=-1)
            for row, i in enumerate(want):
                k = seqs[i].params.logprobs
                entry = {tokens[i]: float(lp[row, tokens[i]])}
                if k:
                    top = torch.topk(lp[row], k)
                    entry.update(zip(top.indices.tolist(), top.values.tolist(), strict=True))
                logprobs[i] = entry
        return tokens, logprobs
