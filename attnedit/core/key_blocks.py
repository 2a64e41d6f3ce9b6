"""A key mask composed with a block mask: key blocks that every row hides are dropped from the block-sparse call.

A hard key mask (``key_keep``) already gives hidden keys exactly zero weight; under a block mask (radial attention)
the kept blocks are still gathered and multiplied in full. When a whole key block is hidden for every batch row,
removing it from the block table changes no output (its keys carry -inf logits) and saves its work: a removal
with a large mask then costs less attention than the plain video. Query-block rows that would keep no key block
are left as they were, so the per-key mask (not an empty block row) decides what they see.

>>> blocks = BlockMask(torch.ones(2, 2, dtype=torch.bool), 4, 8, 8)
>>> keep = torch.tensor([[True] * 4 + [False] * 4])
>>> drop_hidden_key_blocks(blocks, keep).blocks.tolist()
[[True, False], [True, False]]
"""

from __future__ import annotations

import torch

from attnedit.core.edits import BlockMask

_CACHE: dict[tuple, tuple[torch.Tensor, BlockMask]] = {}


def visible_key_blocks(keep: torch.Tensor, block_size: int, n_blocks: int) -> torch.Tensor:
    """Bool ``(n_blocks,)``: key blocks with at least one key kept by some row of ``keep`` ``(B, S_k)``."""
    visible = keep.bool().any(dim=0)
    pad = n_blocks * block_size - visible.shape[0]
    if pad:
        visible = torch.nn.functional.pad(visible, (0, pad), value=False)
    return visible.view(n_blocks, block_size).any(dim=-1)


def drop_hidden_key_blocks(block: BlockMask, keep: torch.Tensor) -> BlockMask:
    """``block`` without the key blocks that ``keep`` ``(B, S_k)`` hides in every row (same object when none is).

    Cached by the identity of ``block.blocks`` and the content of ``keep``, so an unchanged key mask under a
    cached block table (radial attention) returns the same table object every call (FlexAttention's mask cache
    then builds it once).
    """
    ident = (id(block.blocks), block.block_size, block.num_keys, str(keep.device), tuple(keep.shape),
             keep.detach().cpu().numpy().tobytes())
    hit = _CACHE.get(ident)
    if hit is not None and hit[0] is block.blocks:
        return hit[1]
    columns = visible_key_blocks(keep, block.block_size, block.blocks.shape[1]).to(block.blocks.device)
    blocks = block.blocks & columns[None]
    emptied = ~blocks.any(dim=1) & block.blocks.any(dim=1)
    blocks[emptied] = block.blocks[emptied]
    result = block if torch.equal(blocks, block.blocks) else BlockMask(blocks, block.block_size, block.num_queries, block.num_keys)
    if len(_CACHE) >= 32:
        _CACHE.pop(next(iter(_CACHE)))
    _CACHE[ident] = (block.blocks, result)
    return result
