"""Placement only: the ring, block keys, owners(key, r). Pure, no I/O, nothing of ours."""

from shard.keys import (block_bounds, block_count, block_key, blocks_for_range, file_unit, identity, key_hash, pack_key,
                        pack_unit)
from shard.packing import NOT_PACKED, default_threshold, pack_layout, repack
from shard.ring import DEFAULT_VNODES, Member, Ring

__all__ = ["Member", "Ring", "DEFAULT_VNODES", "NOT_PACKED", "block_bounds", "block_count", "block_key",
           "blocks_for_range", "default_threshold", "file_unit", "identity", "key_hash", "pack_key", "pack_layout",
           "pack_unit", "repack"]
