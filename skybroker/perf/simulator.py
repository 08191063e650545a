"""Discrete-event simulation of the engine's scheduler on one replica.

The policy is the engine's (vLLM v1 / nano-vllm style):
- continuous batching: every step takes up to `max_num_batched_tokens` tokens, running
  sequences first (in admission order), then waiting ones (FCFS), at most `max_num_seqs`
  running; a prompt longer than the remaining budget is prefilled in chunks;
- a sequence with `num_tokens` known tokens and `computed` of them in the KV cache schedules
  `num_tokens - computed` tokens (1 when decoding); when the cache catches up it emits a token;
- KV cache in blocks of `block_size` tokens, `num_kv_blocks` in all; when a running sequence
  needs a block and none is free, the most recently admitted running sequence is preempted by
  recompute (its blocks freed, it goes back to the head of the waiting queue);
- the step's time comes from a step-time model (roofline or measured profile).

Results per request: TTFT (first token time - arrival) and TPOT ((finish - first token) /
(output tokens - 1)), as vLLM's benchmarks define them.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Protocol

import numpy as np


class StepTimeModel(Protocol):
    source: str

    def step_time(self, num_prefill_tokens: float, num_decode_seqs: float,
                  total_context_tokens: float, prefill_attn_pairs: float = 0.0) -> float: ...  # fmt: skip


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    num_kv_blocks: int = 100_000
    block_size: int = 16


@dataclass(slots=True)
class SimResult:
    ttft: np.ndarray  # seconds per request (inf if it never ran)
    tpot: np.ndarray
    finish: np.ndarray
    num_steps: int
    num_preemptions: int

    def percentile(self, p: float) -> tuple[float, float]:
        """(TTFT, TPOT) at percentile p (0-100)."""
        return float(np.percentile(self.ttft, p)), float(np.percentile(self.tpot, p))


def simulate(model: StepTimeModel, cfg: SchedulerConfig, arrivals: np.ndarray,
             input_lens: np.ndarray, output_lens: np.ndarray, *,
             max_steps: int = 5_000_000) -> SimResult:  # fmt: skip
    """Run the requests (sorted by arrival) through the scheduler; times in seconds.

    State lives in numpy arrays indexed by request; `run` holds the running requests in
    admission order, so one step costs a few vector operations whatever the batch size."""
    n = len(arrivals)
    arrival = np.asarray(arrivals, dtype=float)
    prompt = np.asarray(input_lens, dtype=np.int64)
    out = np.maximum(np.asarray(output_lens, dtype=np.int64), 1)
    computed = np.zeros(n, np.int64)
    generated = np.zeros(n, np.int64)
    blocks = np.zeros(n, np.int64)
    first = np.full(n, -1.0)
    ttft, tpot, finish = np.full(n, np.inf), np.full(n, np.inf), np.full(n, np.inf)
    waiting: deque[int] = deque()
    run = np.zeros(0, np.int64)
    bs, free = cfg.block_size, cfg.num_kv_blocks
    now, nxt, steps, preemptions, done = 0.0, 0, 0, 0, 0

    def retire(idx: np.ndarray) -> None:
        nonlocal free, done
        ttft[idx] = first[idx] - arrival[idx]
        tpot[idx] = np.where(out[idx] > 1, (now - first[idx]) / np.maximum(out[idx] - 1, 1), 0.0)
        finish[idx] = now
        free += int(blocks[idx].sum())
        blocks[idx] = 0
        done += len(idx)

    while done < n and steps < max_steps:
        while nxt < n and arrival[nxt] <= now:
            waiting.append(nxt)
            nxt += 1
        if not len(run) and not waiting:
            now = arrival[nxt]
            continue
        need = prompt[run] + generated[run] - computed[run]
        if len(run) and (not waiting or len(run) >= cfg.max_num_seqs) and (need == 1).all():
            k, dt = _decode_run(model, run, computed, generated, out, blocks, free, bs, cfg,
                                arrival[nxt] - now if nxt < n else math.inf)  # fmt: skip
            if k > 1:
                now += dt
                steps += k
                computed[run] += k
                generated[run] += k
                nb = -(-computed[run] // bs)
                free -= int((nb - blocks[run]).sum())
                blocks[run] = nb
                fin = generated[run] >= out[run]
                if fin.any():
                    retire(run[fin])
                    run = run[~fin]
                continue
        # running requests first, in admission order, within the token budget
        budget = cfg.max_num_batched_tokens
        k = np.clip(budget - (np.cumsum(need) - need), 0, need)
        newb = np.where(k > 0, -(-(computed[run] + k) // bs) - blocks[run], 0)
        preempted = False
        if newb.sum() > free:  # preempt the most recently admitted until the rest fits
            cum_new = np.cumsum(newb)
            held_after = np.concatenate([np.cumsum(blocks[run][::-1])[::-1][1:], [0]])
            fits = cum_new <= free + held_after
            j = int(np.flatnonzero(fits)[-1]) + 1 if fits.any() else 0
            victims = run[j:]
            free += int(blocks[victims].sum())
            blocks[victims] = computed[victims] = 0
            waiting.extendleft(victims[::-1].tolist())
            preemptions += len(victims)
            run, k, newb = run[:j], k[:j], newb[:j]
            preempted = True
        free -= int(newb.sum())
        blocks[run] += newb
        budget -= int(k.sum())
        adm: list[int] = []
        adm_k: list[int] = []
        while not preempted and waiting and budget > 0 and len(run) + len(adm) < cfg.max_num_seqs:
            i = waiting[0]
            ki = min(int(prompt[i] + generated[i] - computed[i]), budget)
            nb = -(-(int(computed[i]) + ki) // bs) - int(blocks[i])
            if nb > free:
                break
            waiting.popleft()
            free -= nb
            blocks[i] += nb
            budget -= ki
            adm.append(i)
            adm_k.append(ki)
        if adm:
            run = np.concatenate([run, np.array(adm, np.int64)])
            k = np.concatenate([k, np.array(adm_k, np.int64)])
        sel = k > 0
        s, ks = run[sel], k[sel]
        if not len(s):  # the head request cannot fit in the whole KV cache: drop it
            i = waiting.popleft()
            free += int(blocks[i])
            blocks[i] = 0
            done += 1
            continue
        c = computed[s]
        dec = (ks == 1) & (c > 0)
        pre = ~dec
        now += model.step_time(int(ks[pre].sum()), int(dec.sum()), int((c + ks).sum()),
                               float((ks[pre] * (c[pre] + ks[pre] / 2)).sum()))  # fmt: skip
        steps += 1
        computed[s] += ks
        emit = s[computed[s] == prompt[s] + generated[s]]
        generated[emit] += 1
        new_first = emit[first[emit] < 0]
        first[new_first] = now
        fin_idx = emit[generated[emit] >= out[emit]]
        if len(fin_idx):
            retire(fin_idx)
            run = run[~np.isin(run, fin_idx)]
    return SimResult(ttft, tpot, finish, steps, preemptions)


def _decode_run(model: StepTimeModel, run: np.ndarray, computed: np.ndarray,
                generated: np.ndarray, out: np.ndarray, blocks: np.ndarray, free: int, bs: int,
                cfg: SchedulerConfig, until_arrival: float) -> tuple[int, float]:  # fmt: skip
    """(k, seconds) of the k identical decode steps that can run before anything changes: a
    sequence finishes, a new request arrives (and could be admitted), or KV blocks run short.
    Step times grow linearly with the context, so their sum is the trapezoid rule."""
    d = len(run)
    if d > cfg.max_num_batched_tokens:
        return 0, 0.0
    c = computed[run]
    ctx = int(c.sum())
    k = int((out[run] - generated[run]).min())
    slack = int((blocks[run] * bs - c).min())
    k = min(k, slack + bs * (free // d), 4096)
    t1 = model.step_time(0, d, ctx + d)
    if until_arrival < math.inf and d < cfg.max_num_seqs:
        k = min(k, max(1, math.ceil(until_arrival / t1)))
    if k <= 1:
        return k, t1
    tk = model.step_time(0, d, ctx + k * d)
    return k, k * (t1 + tk) / 2
