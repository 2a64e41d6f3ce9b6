"""Block-sparse attention without FlexAttention: gather each query block's kept key blocks, run SDPA on them.

The work is proportional to the kept blocks, so on a CPU it approaches the ideal 1/density speedup for
long sequences. Query blocks that keep the same key blocks share one SDPA call (radial masks repeat rows).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .edits import BlockMask


def block_sparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, block: BlockMask
) -> torch.Tensor:
    """q, k, v: (B, H, S, D); ``mask`` None, bool (B|1, 1, 1, S_k) keep, or additive broadcastable to it."""
    size = block.block_size
    out = torch.empty_like(q[..., : v.shape[-1]])
    key_pos = torch.arange(k.shape[2], device=q.device)
    groups: dict[bytes, list[int]] = {}
    for i, row in enumerate(block.blocks.cpu()):
        groups.setdefault(row.numpy().tobytes(), []).append(i)
    for rows in groups.values():
        kept = block.blocks[rows[0]].to(q.device)
        keys = key_pos[kept[key_pos // size]]
        queries = torch.cat([torch.arange(r * size, min((r + 1) * size, q.shape[2]), device=q.device) for r in rows])
        sub_mask = None
        if mask is not None:
            sub_mask = mask[..., keys] if mask.shape[-2] == 1 else mask[..., queries, :][..., keys]
        contiguous = len(rows) == 1 or rows[-1] - rows[0] == len(rows) - 1
        qs = q[:, :, queries[0] : queries[-1] + 1] if contiguous else q[:, :, queries]
        res = F.scaled_dot_product_attention(qs, k[:, :, keys], v[:, :, keys], attn_mask=sub_mask)
        if contiguous:
            out[:, :, queries[0] : queries[-1] + 1] = res
        else:
            out[:, :, queries] = res
    return out
