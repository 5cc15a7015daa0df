"""Placement only: the ring, block keys, owners(key, r). Pure, no I/O, nothing of ours."""

from shard.keys import BlockRef, block_bounds, block_count, block_key, blocks_for_range, key_hash
from shard.ring import DEFAULT_VNODES, Member, Ring

__all__ = ["BlockRef", "Member", "Ring", "DEFAULT_VNODES", "block_bounds", "block_count", "block_key",
           "blocks_for_range", "key_hash"]
