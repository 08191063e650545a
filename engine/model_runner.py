"""Runs the model on one device: owns the weights, the KV cache and the step's input tensors.

With tensor parallelism, rank 0 (in the engine's process) prepares each step's inputs and
broadcasts them; ranks 1.. run `worker_main` in spawned processes and mirror every call.
"""

from __future__ import annotations

import socket

import torch
import torch.distributed as dist

from engine.compiled_step import CompiledStep
from engine.config import EngineArgs, ModelConfig
from engine.input_batch import StepInputs
from engine.loader import iter_weights
from engine.models.llama import LlamaForCausalLM, TPGroup
from kernels import ops
from kernels.attention_op import StepContext, step_context


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ModelRunner:
    def __init__(
        self,
        args: EngineArgs,
        cfg: ModelConfig,
        max_model_len: int,
        rank: int = 0,
        init_method: str | None = None,
    ) -> None:
        self.args, self.cfg, self.rank = args, cfg, rank
        self.max_model_len = max_model_len
        self.world_size = args.tensor_parallel_size
        self.device = args.resolved_device()
        if self.device.type == "cuda":
            self.device = torch.device("cuda", rank)
            torch.cuda.set_device(self.device)
        self.dtype = args.resolved_dtype(self.device)
        if self.world_size > 1:
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            dist.init_process_group(
                backend, init_method=init_method, rank=rank, world_size=self.world_size
            )
        with torch.device("meta"):  # no random init: every weight is loaded below
            model = LlamaForCausalLM(cfg, TPGroup(rank, self.world_size), max_position=1)
        model.to_empty(device=self.device).to(dtype=self.dtype)
        if cfg.tie_word_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
        model.rope = ops.rope_cache(
            cfg.head_dim, max_model_len, cfg.rope_theta, cfg.rope_scaling
        ).to(self.device)
        model.load_weights(iter_weights(args.model, cfg))
        self.model = model.eval()
        self.num_blocks = self._num_kv_blocks()
        self._allocate_kv_cache()
        self.compiled: CompiledStep | None = None
        if args.compiles(self.device):
            self.compiled = CompiledStep.build(self)

    # -- KV cache ------------------------------------------------------------------------
    def _block_bytes(self) -> int:
        attn = self.model.layers[0].self_attn
        per_token = 2 * attn.num_kv_heads * attn.head_dim * self.dtype.itemsize
        return per_token * self.args.block_size * self.cfg.num_hidden_layers

    def _num_kv_blocks(self) -> int:
        if self.args.num_kv_blocks is not None:
            num = self.args.num_kv_blocks
        elif self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            budget = free - (1 - self.args.gpu_memory_utilization) * total
            num = int(budget // self._block_bytes())
        else:
            num = int(self.args.kv_cache_gib * 2**30 // self._block_bytes())
        if self.world_size > 1:
            t = torch.tensor([num], device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MIN)
            num = int(t.item())
        if num < 1:
            raise ValueError("kv_cache_gib / gpu_memory_utilization leave no room for the KV cache")
        return num

    def _allocate_kv_cache(self) -> None:
        attn0 = self.model.layers[0].self_attn
        shape = (self.num_blocks, self.args.block_size, attn0.num_kv_heads, attn0.head_dim)

        def zeros() -> torch.Tensor:
            return torch.zeros(shape, dtype=self.dtype, device=self.device)

        self.kv_caches = [(zeros(), zeros()) for _ in self.model.layers]

    def _copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        if not copies:
            return
        src = torch.tensor([s for s, _ in copies], device=self.device)
        dst = torch.tensor([d for _, d in copies], device=self.device)
        for k_cache, v_cache in self.kv_caches:
            k_cache[dst] = k_cache[src]
            v_cache[dst] = v_cache[src]

    # -- steps ---------------------------------------------------------------------------
    def call(self, method: str, *payload) -> object:
        """Run `method` here and, with tensor parallelism, on every other rank too."""
        if self.world_size > 1 and self.rank == 0:
            dist.broadcast_object_list([(method, payload)], src=0)
        return getattr(self, method)(*payload)

    def step_context(self, inputs: StepInputs) -> StepContext:
        dev = self.device

        def to(t: torch.Tensor) -> torch.Tensor:
            return t if dev.type == "cpu" else t.to(dev, non_blocking=True)

        return StepContext(
            num_tokens=inputs.input_ids.shape[0],
            num_decode_tokens=inputs.num_decode_tokens,
            slot_mapping=to(inputs.slot_mapping),
            decode_block_tables=to(inputs.decode_block_tables),
            decode_context_lens=to(inputs.decode_context_lens),
            prefill_block_tables=to(inputs.prefill_block_tables),
            prefill_cu_seqlens_q=to(inputs.prefill_cu_seqlens_q),
            prefill_context_lens=to(inputs.prefill_context_lens),
            kv_caches=self.kv_caches,
        )

    @torch.inference_mode()
    def execute(self, inputs: StepInputs) -> torch.Tensor:
        """Run one step; logits `[len(logits_indices), vocab]` fp32 on the model's device."""
        self._copy_blocks(inputs.blocks_to_copy)
        ctx = self.step_context(inputs)
        ids, pos = inputs.input_ids.to(self.device), inputs.positions.to(self.device)
        hidden = None
        if self.compiled is not None:
            hidden = self.compiled.run(ids, pos, ctx, inputs)
            if hidden is None:  # it failed and warned: eager from now on
                self.compiled = None
        if hidden is None:
            with step_context(ctx):
                hidden = self.model(ids, pos)
        return self.model.compute_logits(hidden, inputs.logits_indices.to(self.device))

    def exit(self) -> None:
        if self.world_size > 1:
            dist.destroy_process_group()


def worker_main(
    args: EngineArgs, cfg: ModelConfig, max_model_len: int, rank: int, init_method: str
) -> None:
    """Entry point of tensor-parallel ranks 1..N-1: mirror rank 0's calls until `exit`."""
    torch.set_num_threads(1)
    runner = ModelRunner(args, cfg, max_model_len, rank, init_method)
    while True:
        box: list[object] = [None]
        dist.broadcast_object_list(box, src=0)
        method, payload = box[0]
        getattr(runner, method)(*payload)
        if method == "exit":
            break
