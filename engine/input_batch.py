"""The persistent batch: each running sequence's block table kept in one numpy array between
steps and updated for what changed, and a step's input tensors built from it with array ops.

A sequence keeps its row while it runs; `release` frees the row when it finishes. Only new
blocks are copied in (plus the last one: copy-on-write replaces a partial block in place); a
sequence whose table was rebuilt (preempted and re-admitted, forked) is copied in whole.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from engine.scheduler import SchedulerOutput
from engine.sequence import Sequence


def _int64(values: list[int]) -> torch.Tensor:
    return torch.from_numpy(np.array(values, dtype=np.int64))  # ~4x faster than torch.tensor


@dataclass
class StepInputs:
    """Plain CPU tensors describing one step (picklable, so rank 0 can broadcast them)."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    num_decode_tokens: int
    decode_block_tables: torch.Tensor
    decode_context_lens: torch.Tensor
    prefill_block_tables: torch.Tensor
    prefill_cu_seqlens_q: torch.Tensor
    prefill_context_lens: torch.Tensor
    logits_indices: torch.Tensor
    blocks_to_copy: list[tuple[int, int]]


@dataclass
class _Row:
    row: int
    table: list[int]  # the sequence's block_table list object when last copied in
    synced: int  # how many of its entries are in the array
    last: int = -1  # the last of them (copy-on-write replaces it in place)


class InputBatch:
    def __init__(self, block_size: int, max_blocks_per_seq: int, rows: int = 64) -> None:
        self.block_size = block_size
        self.tables = np.zeros((rows, max_blocks_per_seq), dtype=np.int32)
        self._rows: dict[int, _Row] = {}
        self._arange = torch.arange(rows)
        self._free = list(range(rows - 1, -1, -1))
        self._no_prefill = (
            torch.zeros((0, max_blocks_per_seq), dtype=torch.int32),
            torch.zeros(1, dtype=torch.int32),
            torch.zeros(0, dtype=torch.int32),
        )

    def _logits_indices(self, rows: list[int]) -> torch.Tensor:
        """`rows` as a tensor; the usual 0..n-1 (every sequence decodes) is a view of one arange."""
        n = len(rows)
        if n and rows[-1] == n - 1:  # rows ascend without repeats, so this is 0..n-1
            if self._arange.shape[0] < n:
                self._arange = torch.arange(2 * n)
            return self._arange[:n]
        return _int64(rows)

    def release(self, seq: Sequence) -> None:
        row = self._rows.pop(seq.seq_id, None)
        if row is not None:
            self._free.append(row.row)

    def _grow(self) -> None:
        n = self.tables.shape[0]
        self.tables = np.concatenate([self.tables, np.zeros_like(self.tables)])
        self._free.extend(range(2 * n - 1, n - 1, -1))

    def _sync(self, seq: Sequence) -> int:
        table = seq.block_table
        r = self._rows.get(seq.seq_id)
        if r is not None and r.table is table and r.synced == len(table) and table[-1] == r.last:
            return r.row  # most decode steps: no new block
        if r is None:
            if not self._free:
                self._grow()
            r = self._rows[seq.seq_id] = _Row(self._free.pop(), table, 0)
        if r.table is not table:
            r.table, r.synced = table, 0
        start = max(r.synced - 1, 0)
        if start < len(table):
            self.tables[r.row, start : len(table)] = table[start:]
        r.synced, r.last = len(table), table[-1]
        return r.row

    def prepare(self, out: SchedulerOutput) -> tuple[StepInputs, list[int]]:
        """Step tensors for a schedule, and the indices (into out.seqs) of sequences that sample."""
        bs = self.block_size
        dec, pre = out.decode_seqs, out.prefill_seqs
        nd = len(dec)
        rows_l, pos_l, ids_d, sampling = [], [], [], []
        get = self._rows.get
        for i, seq in enumerate(dec):  # one pass, the usual case (table unchanged) inline
            r, table, p = get(seq.seq_id), seq.block_table, seq.num_computed_tokens
            if r is None or r.table is not table or r.synced != len(table) or table[-1] != r.last:
                rows_l.append(self._sync(seq))
            else:
                rows_l.append(r.row)
            pos_l.append(p)
            ids_d.append(seq.token_ids[p])
            if p + 1 == len(seq.token_ids):
                sampling.append(i)
        rows_d = np.array(rows_l, dtype=np.int64)
        pos_d = np.array(pos_l, dtype=np.int64)
        slots_d = self.tables[rows_d, pos_d // bs].astype(np.int64) * bs + pos_d % bs
        width_d = int(pos_d.max()) // bs + 1 if nd else 0
        ids, positions, slots = [ids_d], [pos_d], [slots_d]
        cu, ctx_p, rows_p, logits = [0], [], [], list(sampling)
        for j, (seq, n) in enumerate(zip(pre, out.num_prefill_tokens, strict=True)):
            row = self._sync(seq)
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
            pos = np.arange(start, end, dtype=np.int64)
            ids.append(seq.token_ids[start:end])
            positions.append(pos)
            slots.append(self.tables[row, pos // bs].astype(np.int64) * bs + pos % bs)
            cu.append(cu[-1] + n)
            ctx_p.append(end)
            rows_p.append(row)
            if end == len(seq):
                sampling.append(nd + j)
                logits.append(nd + cu[-1] - 1)
        width_p = max(ctx_p, default=0) and (max(ctx_p) - 1) // bs + 1
        if pre:
            input_ids = torch.tensor(np.concatenate(ids), dtype=torch.int64)
            pos_t = torch.from_numpy(np.concatenate(positions))
            slots_t = torch.from_numpy(np.concatenate(slots))
            pre_tables = torch.from_numpy(self.tables[np.array(rows_p, np.int64), :width_p])
            cu_t = torch.tensor(cu, dtype=torch.int32)
            ctx_t = torch.tensor(ctx_p, dtype=torch.int32)
        else:  # decode only (most steps): no concatenations, the empty prefill tensors reused
            input_ids = _int64(ids_d)
            pos_t, slots_t = torch.from_numpy(pos_d), torch.from_numpy(slots_d)
            pre_tables, cu_t, ctx_t = self._no_prefill
        inputs = StepInputs(
            input_ids=input_ids,
            positions=pos_t,
            slot_mapping=slots_t,
            num_decode_tokens=nd,
            decode_block_tables=torch.from_numpy(self.tables[rows_d, :width_d]),
            decode_context_lens=torch.from_numpy((pos_d + 1).astype(np.int32)),
            prefill_block_tables=pre_tables,
            prefill_cu_seqlens_q=cu_t,
            prefill_context_lens=ctx_t,
            logits_indices=self._logits_indices(logits),
            blocks_to_copy=out.blocks_to_copy,
        )
        return inputs, sampling
