"""LLMEngine: requests in, one scheduling + model step at a time, RequestOutputs out."""

from __future__ import annotations

import atexit
import contextlib
import gc
import logging
import multiprocessing as mp
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine.block_manager import BlockManager
from engine.config import EngineArgs, ModelConfig
from engine.input_batch import InputBatch, StepInputs
from engine.loader import load_generation_config, load_model_config
from engine.metrics import Counters, EngineMetrics, StepLog, StepStats
from engine.model_runner import ModelRunner, free_port, worker_main
from engine.outputs import CompletionOutput, RequestOutput
from engine.sampler import Sampler
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Sequence
from engine.structured_output import StructuredOutputManager, accept, fill_masks
from engine.tokenizer import EngineTokenizer, detokenize_incrementally

logger = logging.getLogger(__name__)


@dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    seqs: list[Sequence] = field(default_factory=list)
    first_token_time: float | None = None

    @property
    def finished(self) -> bool:
        return len(self.seqs) == self.params.n and all(s.is_finished for s in self.seqs)


class LLMEngine:
    def __init__(self, args: EngineArgs) -> None:
        self.args = args
        self.model_config: ModelConfig = load_model_config(args.model)
        cfg = self.model_config
        self.model_name = args.served_model_name or Path(args.model).name.removesuffix(".gguf")
        self.max_model_len = min(
            args.max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings
        )
        self.tokenizer = EngineTokenizer.from_pretrained(args.model)
        self.generation_config = load_generation_config(args.model)
        eos = set(cfg.eos_token_ids)
        gen_eos = self.generation_config.get("eos_token_id")
        eos |= set([gen_eos] if isinstance(gen_eos, int) else gen_eos or [])
        if self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = eos
        self._workers: list[mp.Process] = []
        init_method = None
        if args.tensor_parallel_size > 1:
            init_method = f"tcp://127.0.0.1:{free_port()}"
            ctx = mp.get_context("spawn")
            for rank in range(1, args.tensor_parallel_size):
                p = ctx.Process(
                    target=worker_main,
                    args=(args, cfg, self.max_model_len, rank, init_method),
                    daemon=True,
                )
                p.start()
                self._workers.append(p)
        self.runner = ModelRunner(args, cfg, self.max_model_len, 0, init_method)
        num_blocks = self.runner.num_blocks
        if num_blocks * args.block_size < self.max_model_len:
            self.shutdown()
            raise ValueError(
                f"kv_cache_gib is too small: the KV cache holds {num_blocks * args.block_size} "
                f"tokens, fewer than max_model_len={self.max_model_len}; raise kv_cache_gib or "
                f"lower max_model_len"
            )
        self.block_manager = BlockManager(num_blocks, args.block_size, args.enable_prefix_caching)
        self.scheduler = Scheduler(
            self.block_manager, args.max_num_seqs, args.max_num_batched_tokens
        )
        self.sampler = Sampler(self.runner.device, args.seed)
        self.input_batch = InputBatch(args.block_size, -(-self.max_model_len // args.block_size))
        self.requests: dict[str, Request] = {}
        self.structured_output = StructuredOutputManager(
            self.tokenizer, cfg.vocab_size, self.eos_token_ids
        )
        # constrained sequences whose grammar is being compiled: scheduled once it is
        self._compiling: list[tuple[Sequence, Future]] = []
        self.counters = Counters()
        self.step_log = StepLog(args.step_log) if args.step_log else None
        self._closed = False
        atexit.register(self.shutdown)

    @classmethod
    def from_args(cls, args: EngineArgs) -> LLMEngine:
        return cls(args)

    def shutdown(self) -> None:
        if getattr(self, "_closed", True) and not self._workers:
            return
        self._closed = True
        if hasattr(self, "structured_output"):
            self.structured_output.shutdown()
        if getattr(self, "step_log", None) is not None:
            self.step_log.close()
        if self._workers and hasattr(self, "runner"):
            self.runner.call("exit")
        for p in self._workers:
            p.join(timeout=30)
        self._workers = []

    # -- requests ------------------------------------------------------------------------
    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        arrival_time: float | None = None,
    ) -> None:
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt must not be empty")
            text, ids = prompt, self.tokenizer.encode(prompt)
        elif isinstance(prompt, list | tuple) and all(isinstance(t, int) for t in prompt):
            text, ids = None, list(prompt)
        else:
            raise ValueError("prompt must be a string or a list of token ids")
        if not ids:
            raise ValueError("prompt must not be empty")
        vocab = self.model_config.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            raise ValueError(
                f"prompt token ids must be in [0, {vocab}), got {min(ids)}..{max(ids)}"
            )
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"prompt is {len(ids)} tokens, but max_model_len is {self.max_model_len} "
                f"(prompt plus at least one generated token must fit)"
            )
        arrival = time.monotonic() if arrival_time is None else arrival_time
        req = Request(request_id, text, ids, params, arrival)
        seq = Sequence(request_id, ids, params, 0, arrival)
        req.seqs.append(seq)
        self.requests[request_id] = req
        if params.structured_outputs is None:
            self.scheduler.add(seq)
        else:
            self._compiling.append((seq, self.structured_output.submit(params.structured_outputs)))

    def abort_request(self, request_id: str) -> None:
        req = self.requests.pop(request_id, None)
        if req is None:
            return
        self._compiling = [(s, f) for s, f in self._compiling if s.request_id != request_id]
        for seq in req.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq, "abort")
                self.sampler.forget(seq)
                self.input_batch.release(seq)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def get_num_unfinished_requests(self) -> int:
        return len(self.requests)

    # -- the step ------------------------------------------------------------------------
    def step(self, only_finished: bool = False) -> list[RequestOutput]:
        """Schedule and run one step; outputs of the requests it touched (cumulative text).

        `only_finished=True` (the offline `LLM.generate`) returns just the requests that
        finished, and detokenizes a sequence once, when it finishes, unless its stop strings
        need the text every step.
        """
        t0 = time.perf_counter()
        failed = self._admit_compiled() if self._compiling else []
        out = self.scheduler.schedule()
        if out.is_empty:
            if self._compiling and not failed:  # nothing else to run: wait for a grammar
                wait([f for _, f in self._compiling], timeout=0.05, return_when=FIRST_COMPLETED)
            return self._finished_outputs(failed)
        inputs, sampling = self._prepare_inputs(out)
        seqs = out.seqs
        logits = self.runner.call("execute", inputs)
        # filled while a GPU still runs the step (execute does not wait for it); before forks
        masks = fill_masks([seqs[i] for i in sampling], self.model_config.vocab_size)
        bm = self.block_manager
        bs = bm.block_size if bm.enable_prefix_caching else 1 << 62
        for seq, n in zip(seqs, out.num_scheduled_tokens, strict=True):
            seq.num_computed_tokens += n
            if seq.num_computed_tokens >= (len(seq.block_hashes) + 1) * bs:
                bm.cache_full_blocks(seq)  # a block became full
        touched = {} if only_finished else {s.request_id: self.requests[s.request_id] for s in seqs}
        shape = self._step_shape(out)  # before a finishing sequence frees its blocks
        rows: list[int] = []
        sample_seqs: list[Sequence] = []
        for row, i in enumerate(sampling):
            seq = seqs[i]
            rows.append(row)
            sample_seqs.append(seq)
            if seq.num_pending_forks:
                req = self.requests[seq.request_id]
                for index in range(1, seq.num_pending_forks + 1):
                    child = seq.fork(index)
                    self.block_manager.fork(seq, child)
                    self.scheduler.running.append(child)
                    req.seqs.append(child)
                    rows.append(row)
                    sample_seqs.append(child)
                seq.num_pending_forks = 0
        finished: list[Request] = []
        if sample_seqs:
            if len(rows) != logits.shape[0] or rows[-1] != len(rows) - 1:
                logits = logits[rows]
            with torch.inference_mode():  # logits are an inference tensor the sampler edits
                tokens, logprobs = self.sampler(
                    logits, sample_seqs, self.eos_token_ids, masks and masks.expand(rows)
                )
            finished = self._append_and_check_stops(sample_seqs, tokens, logprobs, only_finished)
        self._record_step(out, shape, time.perf_counter() - t0)
        if only_finished:
            outputs = [self._make_output(req) for req in finished + failed]
        else:
            outputs = [self._make_output(req) for req in [*touched.values(), *failed]]
        return self._retire(outputs)

    def _retire(self, outputs: list[RequestOutput]) -> list[RequestOutput]:
        for o in outputs:
            if o.finished:
                del self.requests[o.request_id]
                self.counters.requests_finished_total += 1
        return outputs

    def _finished_outputs(self, reqs: list[Request]) -> list[RequestOutput]:
        return self._retire([self._make_output(req) for req in reqs])

    def _admit_compiled(self) -> list[Request]:
        """Schedule the constrained sequences whose grammar is compiled (each with a matcher
        of its own); a grammar that failed to compile ends its request ("abort")."""
        pending, failed = [], []
        for seq, fut in self._compiling:
            if not fut.done():
                pending.append((seq, fut))
            elif fut.exception() is not None:
                logger.error("request %s: grammar compilation failed: %s", seq.request_id,
                             fut.exception())  # fmt: skip
                self._finish(seq, "abort")
                failed.append(self.requests[seq.request_id])
            else:
                seq.grammar = self.structured_output.matcher(fut.result())
                self.scheduler.add(seq)
        self._compiling = pending
        return failed

    def _prepare_inputs(self, out) -> tuple[StepInputs, list[int]]:
        return self.input_batch.prepare(out)

    def _append_and_check_stops(
        self,
        seqs: list[Sequence],
        tokens: list[int],
        logprobs: list[dict[int, float] | None],
        defer_text: bool,
    ) -> list[Request]:
        """Append each sampled token, stop what must stop; return the requests that finished."""
        now = time.monotonic()
        finished: list[Request] = []
        self.counters.generation_tokens_total += len(seqs)
        for seq, token, lp in zip(seqs, tokens, logprobs, strict=True):
            if lp is None:
                seq.token_ids.append(token)
            else:
                seq.append_token(token, lp)
            if seq.first_token_time is None:
                seq.first_token_time = now
                req = self.requests[seq.request_id]
                if req.first_token_time is None:
                    req.first_token_time = now
            limits = seq.stop_limits
            if limits is None:
                limits = seq.stop_limits = self._stop_limits(seq)
            stop_ids, min_len, max_len = limits
            n = len(seq.token_ids)
            reason: str | None = None
            if seq.params.stop or not defer_text:
                reason = self._check_text(seq, token, n >= min_len)
            if reason is None and n >= min_len and token in stop_ids:
                reason = "stop"
                if token in seq.params.stop_token_ids and token not in self._eos_for(seq):
                    seq.stop_reason = token
            if seq.grammar is not None:  # advanced even when the token ends it otherwise
                ended = accept(seq, token, self.eos_token_ids)
                reason = reason or ended
            if reason is None and n >= max_len:
                reason = "length"
            if reason is not None:
                self._finish(seq, reason)
                req = self.requests[seq.request_id]
                if req.finished:
                    finished.append(req)
        return finished

    def _eos_for(self, seq: Sequence) -> set[int] | frozenset[int]:
        return frozenset() if seq.params.ignore_eos else self.eos_token_ids

    def _stop_limits(self, seq: Sequence) -> tuple[frozenset[int], int, int]:
        """(token ids that stop it, the length from which it may stop, the length it stops at)."""
        p = seq.params
        max_len = self.max_model_len
        if p.max_tokens is not None:
            max_len = min(max_len, seq.num_prompt_tokens + p.max_tokens)
        stop_ids = frozenset(self._eos_for(seq)) | frozenset(p.stop_token_ids)
        return stop_ids, seq.num_prompt_tokens + p.min_tokens, max_len

    def _finish(self, seq: Sequence, reason: str) -> None:
        self._catch_up_text(seq)
        self.scheduler.finish(seq, reason)
        self.sampler.forget(seq)
        self.input_batch.release(seq)

    def _catch_up_text(self, seq: Sequence) -> None:
        """Detokenize the tokens not yet turned into text (all at once when the text allows)."""
        if seq.read_offset >= len(seq.token_ids):
            return
        skip = seq.params.skip_special_tokens
        ids = seq.token_ids
        delta, seq.prefix_offset, seq.read_offset = detokenize_incrementally(
            self.tokenizer, ids, seq.prefix_offset, seq.read_offset, skip
        )
        seq.output_text += delta
        for end in range(seq.read_offset + 1, len(ids) + 1) if not delta else ():
            delta, seq.prefix_offset, seq.read_offset = detokenize_incrementally(
                self.tokenizer, ids[:end], seq.prefix_offset, seq.read_offset, skip
            )
            seq.output_text += delta

    def _check_text(self, seq: Sequence, token: int, can_stop: bool) -> str | None:
        """Detokenize the new token; "stop" when a stop string completed (text cut before it)."""
        p = seq.params
        prev_len = len(seq.output_text)
        delta, seq.prefix_offset, seq.read_offset = detokenize_incrementally(
            self.tokenizer,
            seq.token_ids,
            seq.prefix_offset,
            seq.read_offset,
            p.skip_special_tokens,
        )
        seq.output_text += delta
        if can_stop and p.stop and delta:
            if token in self._eos_for(seq) or token in p.stop_token_ids:
                return None  # a stop token ends it first (and names its own reason)
            start = max(0, prev_len - max(len(s) for s in p.stop) + 1)
            hits = [(seq.output_text.find(s, start), s) for s in p.stop]
            hits = [(i, s) for i, s in hits if i >= 0]
            if hits:
                idx, stop = min(hits)
                seq.output_text = seq.output_text[:idx]
                seq.stop_reason = stop
                return "stop"
        return None

    def _make_output(self, req: Request) -> RequestOutput:
        by_index = {s.index: s for s in req.seqs}
        completions = []
        for i in range(req.params.n):
            seq = by_index.get(i)
            if seq is None:
                completions.append(CompletionOutput(index=i))
                continue
            completions.append(
                CompletionOutput(
                    index=i,
                    text=seq.output_text,
                    token_ids=seq.output_token_ids,
                    finish_reason=seq.finish_reason,
                    logprobs=list(seq.logprobs) if seq.logprobs is not None else None,
                    cumulative_logprob=seq.cumulative_logprob if seq.logprobs is not None else None,
                    stop_reason=seq.stop_reason,
                )
            )
        return RequestOutput(
            request_id=req.request_id,
            prompt=req.prompt,
            prompt_token_ids=req.prompt_token_ids,
            outputs=completions,
            finished=req.finished,
            arrival_time=req.arrival_time,
            first_token_time=req.first_token_time,
            num_cached_tokens=req.seqs[0].num_cached_tokens,
        )

    @staticmethod
    def _step_shape(out) -> tuple[int, float]:
        """(context tokens, prefill attention pairs) of the step just run."""
        ctx = sum(s.num_computed_tokens for s in out.seqs)
        pairs = sum(
            n * (s.num_computed_tokens - n / 2)
            for s, n in zip(out.prefill_seqs, out.num_prefill_tokens, strict=True)
        )
        return ctx, pairs

    def _record_step(self, out, shape: tuple[int, float], duration: float) -> None:
        c = self.counters
        c.num_steps += 1
        c.prompt_tokens_total += sum(out.num_prefill_tokens)
        ctx, pairs = shape
        st = StepStats(
            len(out.decode_seqs),
            len(out.prefill_seqs),
            sum(out.num_prefill_tokens),
            ctx,
            duration,
            pairs,
        )
        c.recent_steps.append(st)
        if self.step_log is not None:
            self.step_log.write(st)

    def get_metrics(self) -> EngineMetrics:
        bm, c = self.block_manager, self.counters
        return EngineMetrics(
            kv_blocks_total=bm.num_blocks,
            kv_blocks_used=bm.num_used_blocks,
            kv_blocks_free=bm.num_free_blocks,
            kv_waste=self.scheduler.kv_waste(),
            prefix_cache_hit_rate=bm.prefix_hit_rate,
            num_preemptions=self.scheduler.num_preemptions,
            num_waiting=len(self.scheduler.waiting),
            num_running=len(self.scheduler.running),
            num_steps=c.num_steps,
            prompt_tokens_total=c.prompt_tokens_total,
            generation_tokens_total=c.generation_tokens_total,
            requests_finished_total=c.requests_finished_total,
            recent_steps=list(c.recent_steps),
        )


@contextlib.contextmanager
def heap_frozen() -> Iterator[None]:
    """Objects alive on entry left out of the collector's walks until exit (`gc.freeze`, then
    `gc.unfreeze`): an offline `generate` pays no full collection over the startup heap and
    nothing stays frozen after it. A heap already frozen (`freeze_heap`) is left as it is."""
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def freeze_heap() -> None:
    """Collect, then move every object alive now (the model, compiled code, imports) into the
    collector's permanent generation, as vLLM's engine core does once it has started: a full
    collection while serving then walks only what serving allocated, not the whole startup
    heap (measured: a 478 ms pause over 840K objects in one step of a 32-layer CPU model).
    Only for a process that serves until it exits: frozen objects that later become cyclic
    garbage are not collected until `gc.unfreeze()` (called when serving ends)."""
    gc.collect()
    gc.freeze()
