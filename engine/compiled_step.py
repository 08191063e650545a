"""The compiled model step: `torch.compile` of the model's forward, with attention and the KV
writes left opaque (`kernels.attention_op`), so one graph serves every context length.

The token count is the graph's only dynamic size. It is padded up to one of a few capture
sizes (powers of two to 512, then multiples of 512), which keeps the set of shapes small and is
what CUDA graphs need. Inductor's on-disk cache (`compile_cache_dir`) lets a restart skip code
generation. A failure to compile or to run compiled code warns once, naming the error, and the
runner goes on eager. On CPU the op's kernel is C++ (`kernels.cpu_attention`, built into the
same cache directory), so a step runs no Python per layer (with `cpp_wrapper` the graph's own
launch code is C++ too). Dynamo traces one decoder layer (the model's compile region); with
inductor's Python wrapper one compiled layer serves every layer, with the C++ wrapper the layer
is inlined for each (that wrapper cannot call a region), so only tracing is saved there.
On CUDA, `cuda_graphs` replays decode-only steps at the capture sizes as CUDA graphs (static
input buffers updated in place, no Python per layer).
"""

from __future__ import annotations

import bisect
import logging
import os
import threading
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from kernels import cpu_attention, ops
from kernels.attention_op import StepContext, step_context

if TYPE_CHECKING:
    from engine.input_batch import StepInputs
    from engine.model_runner import ModelRunner

logger = logging.getLogger(__name__)

MAX_GRAPH_BATCH = 256
# The C++ wrapper's launch code (one long function) built at -O1 apart from the fused kernels
# (-O3): at -O3 it was most of a first start's compile on a 32-layer model. Headers are not
# precompiled: a first start compiles each kind of file once, so making the header costs more
# than it saves.
_CPP_WRAPPER = {
    "cpp_wrapper": True,
    "cpp_wrapper_build_separate": True,
    "cpp_cache_precompile_headers": False,
}


def capture_sizes(max_tokens: int) -> list[int]:
    """Token counts a step is padded to: 2, 4, ..., 512, then every 512 up to `max_tokens`."""
    sizes = [2**i for i in range(1, 10)]
    sizes += list(range(1024, max_tokens + 512, 512))
    return [s for s in sizes if s < max_tokens] + [max(max_tokens, 2)]


def _warn(what: str, err: BaseException) -> None:
    msg = f"{what} failed ({type(err).__name__}: {err}); the engine runs the model eager"
    warnings.warn(msg, RuntimeWarning, stacklevel=3)
    logger.warning(msg)


class CpuAttentionBuild:
    """The C++ attention kernel for the CPU op built in a thread while the model step compiles
    (the compiler is a subprocess: on a first start the two overlap), loaded by `finish`; or
    a warning and the op's torch path."""

    def __init__(self, cache_dir: str) -> None:
        self.result: tuple[Path, float] | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(cache_dir,), daemon=True)
        self.thread.start()

    def _run(self, cache_dir: str) -> None:
        try:
            self.result = cpu_attention.build(cache_dir)
        except BaseException as e:  # reported by finish, in the caller's thread
            self.error = e

    def finish(self) -> bool:
        """Wait for the build and load it (outside any step); True if the kernel is in use."""
        self.thread.join()
        try:
            if self.error is not None:
                raise self.error
            assert self.result is not None
            so, seconds = self.result
            cpu_attention.load_built(so)
        except Exception as e:  # no compiler, no headers: slower, not wrong
            msg = f"the C++ attention kernel is not used ({type(e).__name__}: {e}); "
            warnings.warn(msg + "attention runs torch", RuntimeWarning, stacklevel=3)
            logger.warning(msg + "attention runs torch")
            return False
        if seconds:
            logger.info("C++ attention kernel built in %.1f s", seconds)
        return True


def load_cpu_attention(cache_dir: str) -> bool:
    """Build and load the C++ attention kernel now (see `CpuAttentionBuild`)."""
    return CpuAttentionBuild(cache_dir).finish()


def use_cache_dir(path: str, explicit: bool) -> None:
    """Point inductor's on-disk caches at `path`: always when it was asked for by name, else
    unless TORCHINDUCTOR_CACHE_DIR is already set."""
    os.makedirs(path, exist_ok=True)
    if explicit or "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = path


class CompiledStep:
    def __init__(self, runner: ModelRunner, max_tokens: int) -> None:
        self.runner = runner
        self.sizes = capture_sizes(max_tokens)
        cpp = runner.args.cpp_wrapper(runner.device)
        # The C++ wrapper cannot call the model's compiled layer region: dynamo still traces
        # one layer, and the graph inductor compiles has it inlined for every layer.
        self.dynamo_config = {"inline_invoke_subgraph": cpp}
        options = _CPP_WRAPPER if cpp else None
        self.fn = torch.compile(runner.model.forward, fullgraph=True, options=options)
        with torch.inference_mode():  # inputs are views of these (one kind of tensor, one graph)
            self.ids = torch.zeros(self.sizes[-1], dtype=torch.int64, device=runner.device)
            self.pos = torch.zeros_like(self.ids)
        self.compile_seconds = 0.0
        self.graphs: CudaGraphs | None = None

    @classmethod
    def build(cls, runner: ModelRunner) -> CompiledStep | None:
        """Compile and warm up, or warn and return None (the runner then runs eager)."""
        if runner.world_size > 1:
            warnings.warn(
                "torch.compile is not used with tensor_parallel_size > 1; the engine runs eager",
                RuntimeWarning,
                stacklevel=2,
            )
            return None
        args = runner.args
        try:
            cache_dir = args.resolved_compile_cache_dir()
            use_cache_dir(cache_dir, args.compile_cache_dir is not None)
            kernel = None
            if runner.device.type == "cpu" and ops.backend_for(torch.empty(0)) == "torch":
                kernel = CpuAttentionBuild(cache_dir)
            step = cls(runner, args.max_num_batched_tokens)
            step.warm_up()
            if kernel is not None and kernel.finish():
                step.warm_up(compile_=False)  # the kernel's first calls, before serving
        except Exception as e:
            _warn("torch.compile of the model step", e)
            return None
        if args.cuda_graphs and runner.device.type == "cuda":
            try:
                step.graphs = CudaGraphs(step, min(args.max_num_seqs, MAX_GRAPH_BATCH))
            except Exception as e:
                warnings.warn(f"CUDA graph capture failed ({e}); decode runs without graphs",
                              RuntimeWarning, stacklevel=2)  # fmt: skip
        return step

    def padded(self, n: int) -> int:
        i = bisect.bisect_left(self.sizes, n)
        return self.sizes[i] if i < len(self.sizes) else n

    def empty_context(self) -> StepContext:
        """A step with no real tokens: attention writes nothing and returns zeros."""
        dev = self.runner.device
        i32 = torch.zeros(0, dtype=torch.int32, device=dev)
        return StepContext(
            num_tokens=0,
            num_decode_tokens=0,
            slot_mapping=torch.zeros(0, dtype=torch.int64, device=dev),
            decode_block_tables=i32.view(0, 1),
            decode_context_lens=i32,
            prefill_block_tables=i32.view(0, 1),
            prefill_cu_seqlens_q=torch.zeros(1, dtype=torch.int32, device=dev),
            prefill_context_lens=i32,
            kv_caches=self.runner.kv_caches,
        )

    @torch.inference_mode()
    def warm_up(self, compile_: bool = True) -> None:
        """Compile once on a dummy step (the token count marked dynamic), then run the
        smallest and the largest capture sizes so a failure shows here, not mid-serving."""
        t0 = time.perf_counter()
        ctx = self.empty_context()
        for i, size in enumerate((self.sizes[1], self.sizes[0], self.sizes[-1])):
            ids, pos = self.ids[:size], self.pos[:size]
            if i == 0 and compile_:
                torch._dynamo.mark_dynamic(ids, 0, min=2, max=self.sizes[-1])
                torch._dynamo.mark_dynamic(pos, 0, min=2, max=self.sizes[-1])
            with step_context(ctx), torch._dynamo.config.patch(self.dynamo_config):
                self.fn(ids, pos)
        if compile_:
            self.compile_seconds = time.perf_counter() - t0
            logger.info("model step compiled in %.1f s", self.compile_seconds)

    def run(
        self, ids: torch.Tensor, pos: torch.Tensor, ctx: StepContext, inputs: StepInputs
    ) -> torch.Tensor | None:
        """Hidden states `[>= T, hidden]` of the step, or None after warning of a failure."""
        try:
            if self.graphs is not None and self.graphs.covers(inputs):
                return self.graphs.replay(ids, pos, ctx)
            n = ids.shape[0]
            size = self.padded(n)
            if size > self.sizes[-1]:  # past the largest size (not in a step the engine makes)
                ids, pos = ids.clone(), pos.clone()
            else:
                self.ids[:n].copy_(ids)
                self.pos[:n].copy_(pos)
                if size > n:
                    self.ids[n:size].zero_()
                    self.pos[n:size].zero_()
                ids, pos = self.ids[:size], self.pos[:size]
            # One graph, called only under inference mode: the guards that tell cache entries
            # apart are enough (evaluating all of them costs ~0.1 ms on a 32-layer model).
            with step_context(ctx), torch.compiler.set_stance(skip_guard_eval_unsafe=True):
                return self.fn(ids, pos)
        except Exception as e:
            _warn("the compiled model step", e)
            return None


class CudaGraphs:
    """Decode steps replayed as CUDA graphs, one per capture size up to `max_batch`.

    Inputs live in static buffers that each replay's inputs are copied into; padding rows
    write to slot -1 (skipped) and read one cached token, and their outputs are dropped.
    """

    def __init__(self, step: CompiledStep, max_batch: int) -> None:
        runner = step.runner
        dev = runner.device
        max_blocks = -(-runner.max_model_len // runner.args.block_size)
        self.sizes = [s for s in step.sizes if s <= max_batch]
        self.max_batch = self.sizes[-1]
        n = self.max_batch
        with torch.inference_mode():  # the kind of tensor the compiled graph was traced with
            self.ids = torch.zeros(n, dtype=torch.int64, device=dev)
            self.pos = torch.zeros(n, dtype=torch.int64, device=dev)
            self.slots = torch.full((n,), -1, dtype=torch.int64, device=dev)
            self.tables = torch.zeros((n, max_blocks), dtype=torch.int32, device=dev)
            self.lens = torch.ones(n, dtype=torch.int32, device=dev)
        self.out: dict[int, torch.Tensor] = {}
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.pool = None
        empty = step.empty_context()
        with torch.inference_mode():
            for size in reversed(self.sizes):  # largest first: smaller ones reuse its pool
                ctx = StepContext(
                    num_tokens=size,
                    num_decode_tokens=size,
                    slot_mapping=self.slots[:size],
                    decode_block_tables=self.tables[:size],
                    decode_context_lens=self.lens[:size],
                    prefill_block_tables=empty.prefill_block_tables,
                    prefill_cu_seqlens_q=empty.prefill_cu_seqlens_q,
                    prefill_context_lens=empty.prefill_context_lens,
                    kv_caches=runner.kv_caches,
                )
                with step_context(ctx):
                    step.fn(self.ids[:size], self.pos[:size])  # warm this size
                    torch.cuda.synchronize()
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=self.pool):
                        self.out[size] = step.fn(self.ids[:size], self.pos[:size])
                self.pool = graph.pool()
                self.graphs[size] = graph

    def covers(self, inputs: StepInputs) -> bool:
        n = inputs.input_ids.shape[0]
        return n == inputs.num_decode_tokens and n <= self.max_batch

    def replay(self, ids: torch.Tensor, pos: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        n = ids.shape[0]
        size = self.sizes[bisect.bisect_left(self.sizes, n)]
        width = ctx.decode_block_tables.shape[1]
        self.ids[:n].copy_(ids)
        self.pos[:n].copy_(pos)
        self.slots[:n].copy_(ctx.slot_mapping)
        self.slots[n:size].fill_(-1)
        self.tables[:n, :width].copy_(ctx.decode_block_tables)
        self.lens[:n].copy_(ctx.decode_context_lens)
        self.lens[n:size].fill_(1)
        self.graphs[size].replay()
        return self.out[size]
