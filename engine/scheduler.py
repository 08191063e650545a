"""Continuous batching: which sequences run this step and how many of their tokens.

Each step has a token budget (`max_num_batched_tokens`) and a cap on running sequences.
Running sequences go first (a decode takes 1 token, an unfinished prefill takes the next
chunk); then waiting ones in FCFS order, starting past their prefix-cache hits, chunked to
fit the budget. When the cache runs out of blocks, the most recently admitted running
sequence is preempted: its blocks are freed and it goes back to the front of the queue, to
be recomputed later (its full blocks usually survive in the prefix cache).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from engine.block_manager import BlockManager
from engine.sequence import Sequence, SequenceStatus


@dataclass
class SchedulerOutput:
    """One step's work. `decode_seqs` run one token each; `prefill_seqs` run a chunk each."""

    decode_seqs: list[Sequence] = field(default_factory=list)
    prefill_seqs: list[Sequence] = field(default_factory=list)
    num_prefill_tokens: list[int] = field(default_factory=list)
    blocks_to_copy: list[tuple[int, int]] = field(default_factory=list)
    num_preempted: int = 0

    @property
    def seqs(self) -> list[Sequence]:
        return self.decode_seqs + self.prefill_seqs

    @property
    def num_scheduled_tokens(self) -> list[int]:
        return [1] * len(self.decode_seqs) + self.num_prefill_tokens

    @property
    def is_empty(self) -> bool:
        return not self.decode_seqs and not self.prefill_seqs


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
    ) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _add_scheduled(self, out: SchedulerOutput, seq: Sequence, n: int) -> None:
        if n == 1:
            out.decode_seqs.append(seq)
        else:
            out.prefill_seqs.append(seq)
            out.num_prefill_tokens.append(n)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        bm = self.block_manager
        budget = self.max_num_batched_tokens
        i = 0
        bs, blocks = bm.block_size, bm.blocks
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed_tokens, budget)
            start = seq.num_computed_tokens
            if n == 1 and start % bs and blocks[seq.block_table[start // bs]].ref_count == 1:
                out.decode_seqs.append(seq)  # room in its own last block: nothing to allocate
                budget -= 1
                i += 1
                continue
            while not bm.can_allocate(seq, n):
                victim = self.running.pop()
                self._preempt(victim)
                out.num_preempted += 1
                if victim is seq:
                    break
            if seq.status != SequenceStatus.RUNNING:
                break
            out.blocks_to_copy += bm.allocate_slots(seq, n)
            self._add_scheduled(out, seq, n)
            budget -= n
            i += 1
        if out.num_preempted:
            return out
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            hit_blocks, hit_hashes = bm.get_computed_blocks(seq)
            num_hit_tokens = len(hit_blocks) * bm.block_size
            n = min(len(seq) - num_hit_tokens, budget)
            if not bm.can_allocate(seq, n, hit_blocks):
                break
            bm.record_prefix_query(len(seq), num_hit_tokens)
            out.blocks_to_copy += bm.allocate_slots(seq, n, hit_blocks, hit_hashes)
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            self._add_scheduled(out, seq, n)
            budget -= n
        return out

    def finish(self, seq: Sequence, reason: str) -> None:
        """Mark `seq` finished and give its blocks back (it may be running or waiting)."""
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self.block_manager.free(seq)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def kv_waste(self) -> float:
        """Share of allocated KV slots that hold no token (shared blocks counted once)."""
        bs = self.block_manager.block_size
        occupancy: dict[int, int] = {}
        for seq in self.running:
            held = min(len(seq), len(seq.block_table) * bs)
            for j, block_id in enumerate(seq.block_table):
                used = max(0, min(bs, held - j * bs))
                occupancy[block_id] = max(occupancy.get(block_id, 0), used)
        slots = len(occupancy) * bs
        return 1.0 - sum(occupancy.values()) / slots if slots else 0.0
