"""Paged KV block pool with reference counts and an automatic prefix cache (no torch).

The pool is `num_blocks` blocks of `block_size` token slots. A sequence's
`block_table` lists its blocks in order; token position p lives in slot
`block_table[p // block_size] * block_size + p % block_size`.

A FULL block whose K/V have been computed is registered under the chained hash
h_i = hash_fn(h_{i-1}, tokens_i). Later sequences whose leading blocks hash the same
reuse those blocks (ref count + 1) instead of recomputing them. A hash is only a
hint: each registered block also stores its tokens and the registration key of
its parent block, and a lookup checks both, so a hit is exact whatever the hash
quality and a collision is only a miss. A sequence that still needs its prompt's
logprobs (`Sequence.needs_prompt_logprobs`) looks nothing up: a hit would skip the
logits of the cached positions. When its last reference goes, a
registered block keeps its contents and waits in an LRU list; it is evicted
(forgotten) only when no plain free block is left.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Iterable

from model.engine.sequence import Sequence

HashFn = Callable[[int | None, tuple[int, ...]], int]


def hash_block_tokens(parent_hash: int | None, token_ids: tuple[int, ...]) -> int:
    """Chained hash of one full block: depends on every token of the prefix up to it."""
    return hash((parent_hash, token_ids))


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "key", "parent_key", "token_ids")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        # Set while the block is registered in the prefix cache. `key` is unique per
        # registration, so a child can name exactly the parent it was computed after.
        self.hash: int | None = None
        self.key: int | None = None
        self.parent_key: int | None = None
        self.token_ids: tuple[int, ...] | None = None

    def __repr__(self) -> str:
        return f"Block(id={self.block_id}, ref={self.ref_count}, hash={self.hash})"


class BlockManager:
    """Allocates KV blocks to sequences; query/action pairs never leave a half-done state."""

    def __init__(
        self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True
    ) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be > 0, got {num_blocks}")
        if block_size <= 0:
            raise ValueError(f"block_size must be > 0, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        # An attribute so tests can inject a colliding hash function.
        self.hash_fn: HashFn = hash_block_tokens
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Free blocks with no cached contents.
        self.free_block_ids: deque[int] = deque(range(num_blocks))
        # Registered blocks with ref_count 0, least recently freed first.
        self.evictable_block_ids: OrderedDict[int, None] = OrderedDict()
        self.hash_to_block_id: dict[int, int] = {}
        # Prefix-cache statistics, in tokens, counted at admission.
        self.num_query_tokens = 0
        self.num_hit_tokens = 0
        # Bumped whenever the set of cached blocks changes; guards the lookup memo.
        self._cache_version = 0
        self._next_key = 0
        self._memo: tuple[int, int, int, list[int]] | None = None

    # ---- statistics -------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can take now (plain free + evictable cached)."""
        return len(self.free_block_ids) + len(self.evictable_block_ids)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        return len(self.hash_to_block_id)

    @property
    def usage(self) -> float:
        """Fraction of the pool referenced by live sequences (cached-but-free blocks excluded)."""
        return self.num_used_blocks / self.num_blocks

    @property
    def prefix_cache_hit_ratio(self) -> float:
        return self.num_hit_tokens / self.num_query_tokens if self.num_query_tokens else 0.0

    # ---- hashing and lookup -----------------------------------------------------

    def _block_hash(self, seq: Sequence, index: int) -> int:
        """Hash of the seq's full block `index`, computed once and kept in seq.block_hashes."""
        hashes = seq.block_hashes
        bs = self.block_size
        while len(hashes) <= index:
            i = len(hashes)
            tokens = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            assert len(tokens) == bs, "only full blocks are hashed"
            hashes.append(self.hash_fn(hashes[i - 1] if i else None, tokens))
        return hashes[index]

    def _lookup(self, seq: Sequence) -> list[int]:
        """Block ids of the seq's longest cached prefix, never covering its last token."""
        if not self.enable_prefix_caching or seq.needs_prompt_logprobs:
            return []
        memo = self._memo
        if memo is not None and memo[:3] == (seq.seq_id, seq.num_tokens, self._cache_version):
            return memo[3]
        bs = self.block_size
        max_blocks = (seq.num_tokens - 1) // bs
        hit_ids: list[int] = []
        parent_key: int | None = None
        for i in range(max_blocks):
            block_id = self.hash_to_block_id.get(self._block_hash(seq, i))
            if block_id is None:
                break
            block = self.blocks[block_id]
            # Equal hash is not proof: compare what the hash stands for.
            if block.parent_key != parent_key or block.token_ids != tuple(
                seq.token_ids[i * bs : (i + 1) * bs]
            ):
                break
            hit_ids.append(block_id)
            parent_key = block.key
        self._memo = (seq.seq_id, seq.num_tokens, self._cache_version, hit_ids)
        return hit_ids

    def get_num_computed_from_cache(self, seq: Sequence) -> int:
        """Tokens of seq that admission would take from the prefix cache (lookup only)."""
        return len(self._lookup(seq)) * self.block_size

    # ---- block pool ---------------------------------------------------------------

    def _num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _take_new_block(self) -> int:
        if self.free_block_ids:
            block_id = self.free_block_ids.popleft()
        else:
            # Evict the least recently freed cached block.
            block_id, _ = self.evictable_block_ids.popitem(last=False)
            self._uncache(self.blocks[block_id])
        block = self.blocks[block_id]
        assert block.ref_count == 0 and block.hash is None
        block.ref_count = 1
        return block_id

    def _take_cached_block(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.evictable_block_ids[block_id]
        block.ref_count += 1

    def _uncache(self, block: Block) -> None:
        assert block.hash is not None
        if self.hash_to_block_id.get(block.hash) == block.block_id:
            del self.hash_to_block_id[block.hash]
        block.hash = block.key = block.parent_key = block.token_ids = None
        self._cache_version += 1

    def _release(self, block_id: int) -> None:
        block = self.blocks[block_id]
        assert block.ref_count > 0, f"double free of block {block_id}"
        block.ref_count -= 1
        if block.ref_count == 0:
            if block.hash is not None:
                self.evictable_block_ids[block_id] = None
            else:
                # Taken next: a conversation's next turn goes on in the block its last one ended
                # in, so its context stays contiguous in the pool (which the CPU's decode of a
                # lone sequence reads in place).
                self.free_block_ids.appendleft(block_id)

    # ---- admission: can_allocate / allocate -----------------------------------------

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Whether admitting seq with num_new_tokens beyond its cache hit fits now."""
        hit_ids = self._lookup(seq)
        num_cached = len(hit_ids) * self.block_size
        num_new_blocks = self._num_blocks_for(num_cached + num_new_tokens) - len(hit_ids)
        # Unreferenced hit blocks are counted as free, so taking them uses free capacity.
        num_idle_hits = sum(1 for b in hit_ids if self.blocks[b].ref_count == 0)
        return num_new_blocks + num_idle_hits <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        """Give a waiting seq its cached prefix plus blocks for num_new_tokens more tokens.

        Sets seq.num_computed_tokens (to the cache hit) and seq.num_cached_tokens.
        """
        assert not seq.block_table and seq.num_computed_tokens == 0, seq
        assert self.can_allocate(seq, num_new_tokens), seq
        hit_ids = list(self._lookup(seq))
        # Take the hits first: allocating new blocks could otherwise evict them.
        for block_id in hit_ids:
            self._take_cached_block(block_id)
        num_cached = len(hit_ids) * self.block_size
        assert num_cached + num_new_tokens <= seq.num_tokens, seq
        num_new_blocks = self._num_blocks_for(num_cached + num_new_tokens) - len(hit_ids)
        seq.block_table = hit_ids + [self._take_new_block() for _ in range(num_new_blocks)]
        seq.num_computed_tokens = num_cached
        seq.num_cached_tokens = min(num_cached, seq.num_prompt_tokens)
        seq.num_hashed_blocks = len(hit_ids)
        self.num_query_tokens += seq.num_tokens
        self.num_hit_tokens += num_cached

    # ---- running sequences: can_append / append -------------------------------------

    def num_blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        """New blocks seq needs so its table covers num_computed + num_new_tokens tokens."""
        total = self._num_blocks_for(seq.num_computed_tokens + num_new_tokens)
        return max(0, total - len(seq.block_table))

    def can_append(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.num_blocks_needed(seq, num_new_tokens) <= self.num_free_blocks

    def append(self, seq: Sequence, num_new_tokens: int) -> None:
        num_new_blocks = self.num_blocks_needed(seq, num_new_tokens)
        assert num_new_blocks <= self.num_free_blocks, seq
        for _ in range(num_new_blocks):
            seq.block_table.append(self._take_new_block())

    # ---- after a step ---------------------------------------------------------------

    def mark_computed(self, seq: Sequence, num_new_tokens: int) -> None:
        """Advance num_computed_tokens and register the blocks that became full."""
        seq.num_computed_tokens += num_new_tokens
        num_full = seq.num_computed_tokens // self.block_size
        assert seq.num_computed_tokens <= len(seq.token_ids), seq
        assert seq.num_computed_tokens <= len(seq.block_table) * self.block_size, seq
        if num_full <= seq.num_hashed_blocks:
            return
        if self.enable_prefix_caching:
            for i in range(seq.num_hashed_blocks, num_full):
                if not self._register(seq, i):
                    break
        seq.num_hashed_blocks = num_full

    def _register(self, seq: Sequence, index: int) -> bool:
        """Offer seq's computed full block `index` to the cache; False if it cannot join."""
        table = seq.block_table
        parent_key = self.blocks[table[index - 1]].key if index else None
        if index and parent_key is None:
            return False  # its parent is not cached, so nothing could reach it
        block = self.blocks[table[index]]
        assert block.hash is None and block.ref_count > 0, block
        h = self._block_hash(seq, index)
        bs = self.block_size
        tokens = tuple(seq.token_ids[index * bs : (index + 1) * bs])
        other_id = self.hash_to_block_id.get(h)
        if other_id is None:
            block.hash = h
            block.key = self._next_key
            self._next_key += 1
            block.parent_key = parent_key
            block.token_ids = tokens
            self.hash_to_block_id[h] = block.block_id
            self._cache_version += 1
            return True
        other = self.blocks[other_id]
        if other.parent_key == parent_key and other.token_ids == tokens:
            # Same prefix computed twice (e.g. two equal prompts in one step): switch
            # to the cached copy so this sequence's later blocks can chain to it.
            assert block.ref_count == 1, block
            self._take_cached_block(other_id)
            table[index] = other_id
            self._release(block.block_id)
            return True
        return False  # a hash collision: leave this block (and its successors) out

    def free(self, seq: Sequence) -> None:
        """Drop seq's references; registered blocks stay cached (its hashes are kept)."""
        # Tail first, so a prefix outlives its continuations in the LRU order.
        for block_id in reversed(seq.block_table):
            self._release(block_id)
        seq.block_table = []
        seq.num_hashed_blocks = 0

    def reset_prefix_cache(self) -> None:
        """Forget every cached block that no sequence references."""
        while self.evictable_block_ids:
            block_id, _ = self.evictable_block_ids.popitem(last=False)
            self._uncache(self.blocks[block_id])
            self.free_block_ids.append(block_id)

    # ---- debugging ------------------------------------------------------------------

    def check_invariants(self, live_seqs: Iterable[Sequence]) -> None:
        """O(num_blocks) consistency check against the sequences holding blocks (tests)."""
        refs = [0] * self.num_blocks
        for seq in live_seqs:
            assert len(set(seq.block_table)) == len(seq.block_table), seq
            for block_id in seq.block_table:
                refs[block_id] += 1
        free = set(self.free_block_ids)
        evictable = set(self.evictable_block_ids)
        assert len(free) == len(self.free_block_ids), "block twice in the free list"
        assert not free & evictable, "block both free and evictable"
        for block in self.blocks:
            assert block.ref_count == refs[block.block_id], (block, refs[block.block_id])
            in_free = block.block_id in free or block.block_id in evictable
            assert in_free == (block.ref_count == 0), block
            assert (block.block_id in evictable) == (
                block.ref_count == 0 and block.hash is not None
            )
            if block.hash is not None:
                assert self.hash_to_block_id.get(block.hash) == block.block_id, block
                assert block.key is not None and block.token_ids is not None, block
        for h, block_id in self.hash_to_block_id.items():
            assert self.blocks[block_id].hash == h
