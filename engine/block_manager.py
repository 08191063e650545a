"""The KV cache's bookkeeping: fixed-size blocks, ref counts, free list, prefix cache, CoW.

A full block is keyed by a hash chained from its parent block's hash and its own token ids,
so equal prefixes map to equal blocks. Blocks whose ref count drops to 0 keep their K/V and
their hash (a later request may hit them) until they are needed: uncached free blocks are
handed out first, then cached ones least-recently-freed first (lazy LRU eviction).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from engine.sequence import Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: int | None = None
    token_ids: tuple[int, ...] = ()


def hash_block(parent_hash: int | None, token_ids: tuple[int, ...]) -> int:
    return hash((parent_hash, token_ids))


class NoFreeBlocksError(RuntimeError):
    pass


class BlockManager:
    """Allocates cache blocks to sequences; shares them by prefix hash and by fork."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_uncached: list[int] = list(range(num_blocks - 1, -1, -1))
        self.free_cached: OrderedDict[int, None] = OrderedDict()
        self.hash_to_block: dict[int, int] = {}
        self.prefix_queries = 0  # tokens looked up in the prefix cache
        self.prefix_hits = 0  # of those, tokens found

    # -- counts --------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_uncached) + len(self.free_cached)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0

    # -- allocation ----------------------------------------------------------------------
    def _take_free_block(self) -> int:
        if self.free_uncached:
            block_id = self.free_uncached.pop()
        elif self.free_cached:
            block_id, _ = self.free_cached.popitem(last=False)
            block = self.blocks[block_id]
            if self.hash_to_block.get(block.block_hash) == block_id:
                del self.hash_to_block[block.block_hash]
            block.block_hash, block.token_ids = None, ()
        else:
            raise NoFreeBlocksError("no free KV cache block")
        self.blocks[block_id].ref_count = 1
        return block_id

    def _ref(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_cached[block_id]
        block.ref_count += 1

    def _unref(self, block_id: int) -> None:
        block = self.blocks[block_id]
        block.ref_count -= 1
        if block.ref_count == 0:
            if block.block_hash is not None and self.enable_prefix_caching:
                self.free_cached[block_id] = None
            else:
                block.block_hash, block.token_ids = None, ()
                self.free_uncached.append(block_id)

    def get_computed_blocks(self, seq: Sequence) -> tuple[list[int], list[int]]:
        """Prefix-cache hits for a sequence about to be admitted: (block ids, their hashes).

        At least one token is always left to compute (its logits sample the next token), and
        that token never lands in a shared block.
        """
        if not self.enable_prefix_caching:
            return [], []
        bs = self.block_size
        max_blocks = (len(seq) - 1) // bs
        block_ids: list[int] = []
        hashes: list[int] = []
        parent: int | None = None
        for i in range(max_blocks):
            tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            h = hash_block(parent, tokens)
            block_id = self.hash_to_block.get(h)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            block_ids.append(block_id)
            hashes.append(h)
            parent = h
        return block_ids, hashes

    def num_blocks_needed(self, seq: Sequence, num_new_tokens: int, num_hit_blocks: int = 0) -> int:
        """Fresh blocks that `allocate_slots` would take from the free pool."""
        bs = self.block_size
        table_len = len(seq.block_table) or num_hit_blocks
        start = seq.num_computed_tokens or num_hit_blocks * bs
        needed = max(0, -(-(start + num_new_tokens) // bs) - table_len)
        if (
            start % bs
            and seq.block_table
            and self.blocks[seq.block_table[start // bs]].ref_count > 1
        ):
            needed += 1  # copy-on-write of the shared partial block
        return needed

    def can_allocate(
        self, seq: Sequence, num_new_tokens: int, hit_blocks: list[int] | tuple[()] = ()
    ) -> bool:
        reclaimed = sum(1 for b in hit_blocks if self.blocks[b].ref_count == 0)
        needed = self.num_blocks_needed(seq, num_new_tokens, len(hit_blocks))
        return needed <= self.num_free_blocks - reclaimed

    def allocate_slots(
        self,
        seq: Sequence,
        num_new_tokens: int,
        hit_blocks: list[int] | tuple[()] = (),
        hit_hashes: list[int] | tuple[()] = (),
    ) -> list[tuple[int, int]]:
        """Give `seq` room for `num_new_tokens` more tokens; return the (src, dst) block copies
        that copy-on-write needs before the step runs. Call `can_allocate` first."""
        bs = self.block_size
        if hit_blocks:
            assert not seq.block_table and seq.num_computed_tokens == 0
            for block_id in hit_blocks:
                self._ref(block_id)
            seq.block_table = list(hit_blocks)
            seq.block_hashes = list(hit_hashes)
            seq.num_computed_tokens = seq.num_cached_tokens = len(hit_blocks) * bs
        copies: list[tuple[int, int]] = []
        start = seq.num_computed_tokens
        if start % bs and start // bs < len(seq.block_table):
            idx = start // bs
            old = seq.block_table[idx]
            if self.blocks[old].ref_count > 1:
                new = self._take_free_block()
                self._unref(old)
                seq.block_table[idx] = new
                copies.append((old, new))
        total_blocks = -(-(start + num_new_tokens) // bs)
        while len(seq.block_table) < total_blocks:
            seq.block_table.append(self._take_free_block())
        return copies

    def record_prefix_query(self, num_tokens: int, num_hit_tokens: int) -> None:
        self.prefix_queries += num_tokens
        self.prefix_hits += num_hit_tokens

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register the blocks of `seq` that became full and computed (after a step)."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        num_full = min(seq.num_computed_tokens // bs, len(seq.block_table))
        parent = seq.block_hashes[-1] if seq.block_hashes else None
        for i in range(len(seq.block_hashes), num_full):
            tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            h = hash_block(parent, tokens)
            block = self.blocks[seq.block_table[i]]
            if block.block_hash is None and h not in self.hash_to_block:
                block.block_hash, block.token_ids = h, tokens
                self.hash_to_block[h] = block.block_id
            seq.block_hashes.append(h)
            parent = h

    def fork(self, parent: Sequence, child: Sequence) -> None:
        child.block_table = list(parent.block_table)
        for block_id in child.block_table:
            self._ref(block_id)

    def free(self, seq: Sequence) -> None:
        # Reverse order: a prefix's tail blocks are evicted before its head blocks.
        for block_id in reversed(seq.block_table):
            self._unref(block_id)
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed_tokens = 0
        seq.num_cached_tokens = 0
