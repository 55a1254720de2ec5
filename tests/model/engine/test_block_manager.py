"""Block manager: allocation, ref counts, prefix cache, LRU eviction, collisions (no torch)."""

import pytest

from model.engine.block_manager import BlockManager, hash_block_tokens
from model.engine.sequence import Sequence

BS = 4


def make_seq(tokens, **kwargs) -> Sequence:
    return Sequence(list(tokens), **kwargs)


def admit(bm: BlockManager, seq: Sequence, compute: bool = True) -> None:
    """Allocate everything past the cache hit and (optionally) mark it computed."""
    num_new = seq.num_tokens - bm.get_num_computed_from_cache(seq)
    assert bm.can_allocate(seq, num_new)
    bm.allocate(seq, num_new)
    if compute:
        bm.mark_computed(seq, num_new)


def test_allocate_append_free_roundtrip():
    bm = BlockManager(8, BS)
    seq = make_seq(range(10))
    assert bm.get_num_computed_from_cache(seq) == 0
    bm.allocate(seq, 10)
    assert len(seq.block_table) == 3 and seq.num_computed_tokens == 0
    assert bm.num_free_blocks == 5
    bm.mark_computed(seq, 10)
    seq.append_token(99)
    # Position 10 still fits block 2; positions 12.. need a 4th block.
    assert bm.num_blocks_needed(seq, 1) == 0
    bm.append(seq, 1)
    bm.mark_computed(seq, 1)
    seq.append_token(98)
    seq.append_token(97)
    assert bm.num_blocks_needed(seq, 2) == 1
    assert bm.can_append(seq, 2)
    bm.append(seq, 2)
    assert len(seq.block_table) == 4
    bm.check_invariants([seq])
    bm.free(seq)
    assert seq.block_table == []
    assert bm.num_free_blocks == 8 and bm.usage == 0.0
    bm.check_invariants([])


def test_can_append_refuses_when_pool_exhausted():
    bm = BlockManager(2, BS)
    seq = make_seq(range(8))
    bm.allocate(seq, 8)
    bm.mark_computed(seq, 8)
    seq.append_token(1)
    assert not bm.can_append(seq, 1)
    assert not bm.can_allocate(make_seq([5]), 1)


def test_shared_prefix_ref_counts():
    bm = BlockManager(10, BS)
    a = make_seq(range(10))
    admit(bm, a)
    assert bm.num_cached_blocks == 2  # two full blocks; the partial third is not cached
    b = make_seq([*range(8), 50, 51, 52])
    assert bm.get_num_computed_from_cache(b) == 8
    admit(bm, b, compute=False)
    assert b.num_computed_tokens == 8 and b.num_cached_tokens == 8
    assert b.block_table[:2] == a.block_table[:2]
    assert b.block_table[2] != a.block_table[2]
    assert [bm.blocks[i].ref_count for i in a.block_table] == [2, 2, 1]
    bm.check_invariants([a, b])
    bm.free(a)
    assert [bm.blocks[i].ref_count for i in b.block_table] == [1, 1, 1]
    bm.check_invariants([b])
    bm.free(b)
    assert bm.num_free_blocks == 10 and bm.usage == 0.0
    # Both prefix blocks stay cached, unreferenced, and count as free.
    assert len(bm.evictable_block_ids) == 2
    bm.check_invariants([])


def test_cache_hit_never_covers_last_token():
    bm = BlockManager(10, BS)
    admit(bm, make_seq(range(8)))
    assert bm.num_cached_blocks == 2
    # Same 8 tokens: the 2nd block holds the last token, so only 4 come from the cache.
    assert bm.get_num_computed_from_cache(make_seq(range(8))) == 4
    assert bm.get_num_computed_from_cache(make_seq(range(9))) == 8
    assert bm.get_num_computed_from_cache(make_seq(range(4))) == 0
    assert bm.get_num_computed_from_cache(make_seq(range(5))) == 4


def test_only_computed_full_blocks_are_registered():
    bm = BlockManager(10, BS)
    a = make_seq(range(10))
    bm.allocate(a, 10)
    assert bm.num_cached_blocks == 0
    bm.mark_computed(a, 6)  # chunk 1: one full block computed
    assert bm.num_cached_blocks == 1
    assert bm.get_num_computed_from_cache(make_seq(range(12))) == 4
    bm.mark_computed(a, 4)
    assert bm.num_cached_blocks == 2
    # Generated tokens join the cache once their block is full and computed.
    a.append_token(100)
    bm.append(a, 1)
    bm.mark_computed(a, 1)
    a.append_token(101)
    assert bm.num_cached_blocks == 2  # position 11 (token 101) not computed yet
    bm.append(a, 1)
    bm.mark_computed(a, 1)
    assert bm.num_cached_blocks == 3
    assert bm.get_num_computed_from_cache(make_seq([*range(10), 100, 101, 7])) == 12


def test_preempted_sequence_rehits_its_own_blocks():
    bm = BlockManager(10, BS)
    seq = make_seq(range(13))
    admit(bm, seq)
    old_table = list(seq.block_table)
    hashes = list(seq.block_hashes)
    bm.free(seq)
    seq.num_computed_tokens = 0
    assert seq.block_hashes == hashes  # kept for re-admission
    admit(bm, seq, compute=False)
    assert seq.num_computed_tokens == 12
    assert seq.block_table[:3] == old_table[:3]


def test_hashes_computed_once_per_block():
    bm = BlockManager(10, BS)
    calls = []

    def counting_hash(parent, tokens):
        calls.append(tokens)
        return hash_block_tokens(parent, tokens)

    bm.hash_fn = counting_hash
    seq = make_seq(range(9))
    for _ in range(3):
        bm.get_num_computed_from_cache(seq)
    bm.allocate(seq, 9)
    bm.mark_computed(seq, 9)
    for t in range(20, 40):
        seq.append_token(t)
        bm.append(seq, 1)
        bm.mark_computed(seq, 1)
    assert len(calls) == len(set(calls)) == seq.num_computed_tokens // BS


def test_lru_evicts_least_recently_freed_first():
    bm = BlockManager(4, BS)
    x = make_seq([1, 1, 1, 1, 9])
    y = make_seq([2, 2, 2, 2, 9])
    admit(bm, x)
    admit(bm, y)
    x0, y0 = x.block_table[0], y.block_table[0]
    bm.free(x)
    bm.free(y)
    assert list(bm.evictable_block_ids) == [x0, y0]
    # Plain free blocks go first, then the cached block of x (freed before y's).
    z = make_seq(range(100, 112))
    admit(bm, z, compute=False)
    assert bm.get_num_computed_from_cache(make_seq([1, 1, 1, 1, 9])) == 0
    assert bm.get_num_computed_from_cache(make_seq([2, 2, 2, 2, 9])) == 4
    bm.check_invariants([z])


def test_hit_takes_block_out_of_lru():
    bm = BlockManager(4, BS)
    x = make_seq([1, 1, 1, 1, 9])
    y = make_seq([2, 2, 2, 2, 9])
    admit(bm, x)
    admit(bm, y)
    bm.free(x)
    bm.free(y)
    x2 = make_seq([1, 1, 1, 1, 8])
    admit(bm, x2, compute=False)  # revives x's cached block
    assert bm.blocks[x2.block_table[0]].ref_count == 1
    assert len(bm.evictable_block_ids) == 1
    # Two free blocks left: one plain, then y's cached block is the only one to evict.
    z = make_seq(range(100, 108))
    admit(bm, z, compute=False)
    assert bm.get_num_computed_from_cache(make_seq([2, 2, 2, 2, 9])) == 0
    assert bm.get_num_computed_from_cache(make_seq([1, 1, 1, 1, 9])) == 4
    bm.check_invariants([x2, z])


def test_freed_tail_blocks_are_evicted_before_their_prefix():
    bm = BlockManager(5, BS)
    seq = make_seq(range(13))
    admit(bm, seq)
    bm.free(seq)
    # Two plain blocks (one untouched, the partial tail) + three cached blocks; taking
    # three evicts the seq's last full block, not its prefix.
    other = make_seq(range(100, 112))
    admit(bm, other, compute=False)
    assert bm.get_num_computed_from_cache(make_seq(range(13))) == 8


def test_hash_collision_is_a_miss():
    bm = BlockManager(10, BS)
    bm.hash_fn = lambda parent, tokens: 42  # every block collides
    a = make_seq(range(9))
    admit(bm, a)
    # Block 1 collides with block 0 and is left out rather than overwriting it.
    assert bm.num_cached_blocks == 1
    # Different tokens, same hash: not a hit.
    b = make_seq(range(50, 59))
    assert bm.get_num_computed_from_cache(b) == 0
    admit(bm, b)
    assert b.num_cached_tokens == 0
    # Same first block hits; the second hashes to block 0 but its parent differs.
    c = make_seq(range(9))
    assert bm.get_num_computed_from_cache(c) == 4
    admit(bm, c)
    bm.check_invariants([a, b, c])
    for s in (a, b, c):
        bm.free(s)
    assert bm.num_free_blocks == 10
    bm.check_invariants([])


def test_can_allocate_counts_unreferenced_hits_as_used():
    bm = BlockManager(4, BS)
    first = make_seq(range(9))
    admit(bm, first)
    bm.free(first)
    assert len(bm.evictable_block_ids) == 2 and bm.num_free_blocks == 4
    # 8 cached tokens + 9 new = 5 blocks; the 2 cached ones are part of the 4 free.
    longer = make_seq(range(17))
    assert bm.get_num_computed_from_cache(longer) == 8
    assert not bm.can_allocate(longer, 9)
    assert bm.can_allocate(longer, 8)
    bm.allocate(longer, 8)
    assert longer.num_computed_tokens == 8 and len(longer.block_table) == 4
    bm.check_invariants([longer])


def test_duplicate_contents_registered_once():
    bm = BlockManager(10, BS)
    a = make_seq(range(9))
    b = make_seq(range(9))
    bm.allocate(a, 9)
    bm.allocate(b, 9)  # both miss: nothing computed yet
    bm.mark_computed(a, 9)
    bm.mark_computed(b, 9)
    assert bm.num_cached_blocks == 2
    # b switched to a's cached copies and gave its own duplicates back.
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] != a.block_table[2]
    assert bm.num_free_blocks == 6
    bm.check_invariants([a, b])
    # b's later blocks chain to the shared ones and are found by a lookup.
    for t in (20, 21, 22, 23):
        b.append_token(t)
        bm.append(b, 1)
        bm.mark_computed(b, 1)
    assert bm.get_num_computed_from_cache(make_seq([*range(9), 20, 21, 22, 23])) == 12
    bm.free(a)
    bm.free(b)
    assert len(bm.evictable_block_ids) == 3
    assert bm.num_free_blocks == 10
    bm.check_invariants([])


def test_usage_and_hit_stats():
    bm = BlockManager(10, BS)
    a = make_seq(range(10))
    admit(bm, a)
    assert bm.usage == pytest.approx(0.3)
    b = make_seq(range(10))
    admit(bm, b)
    assert bm.usage == pytest.approx(0.4)  # shares two blocks
    assert bm.num_query_tokens == 20 and bm.num_hit_tokens == 8
    assert bm.prefix_cache_hit_ratio == pytest.approx(0.4)
    bm.free(a)
    bm.free(b)
    assert bm.usage == 0.0


def test_prefix_caching_disabled():
    bm = BlockManager(10, BS, enable_prefix_caching=False)
    a = make_seq(range(10))
    admit(bm, a)
    assert bm.num_cached_blocks == 0
    assert bm.get_num_computed_from_cache(make_seq(range(10))) == 0
    bm.free(a)
    assert not bm.evictable_block_ids and bm.num_free_blocks == 10
    bm.check_invariants([])


def test_reset_prefix_cache():
    bm = BlockManager(10, BS)
    a = make_seq(range(10))
    b = make_seq(range(50, 60))
    admit(bm, a)
    admit(bm, b)
    bm.free(a)
    bm.reset_prefix_cache()
    assert bm.get_num_computed_from_cache(make_seq(range(10))) == 0
    assert bm.get_num_computed_from_cache(make_seq(range(50, 60))) == 8  # still referenced
    bm.check_invariants([b])


def test_bad_arguments():
    with pytest.raises(ValueError):
        BlockManager(0, BS)
    with pytest.raises(ValueError):
        BlockManager(4, 0)
    with pytest.raises(ValueError):
        Sequence([])
