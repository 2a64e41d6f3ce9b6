"""Block-sparse attention without FlexAttention: gather each query block's kept key blocks, run SDPA on them.

The work is proportional to the kept blocks, so on a CPU it approaches the ideal 1/density speedup for long
sequences (measured in benchmarks/radial_attention.py). Keys and values are viewed as (B, H, n_blocks, block, D)
and gathered a whole block at a time; query blocks that keep the same key blocks share one SDPA call, and query
rows are contiguous views, never copies. A short last block is handled by zero-padding K/V once and cutting the
padding off the end of each gathered key sequence (it is always last, since kept blocks are gathered in order).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attnedit.core.edits import BlockMask


def _blocked(x: torch.Tensor, size: int, n_blocks: int) -> torch.Tensor:
    """(B, H, S, D) -> (B, H, n_blocks, size, D), zero-padded at the end when S is not a multiple of size."""
    pad = n_blocks * size - x.shape[2]
    if pad:
        x = F.pad(x, (0, 0, 0, pad))
    return x.unflatten(2, (n_blocks, size))


def _row_groups(blocks: torch.Tensor) -> list[tuple[list[int], torch.Tensor]]:
    """Query-block rows grouped by identical key-block pattern: [(rows, kept key-block indices)]."""
    groups: dict[bytes, list[int]] = {}
    rows = blocks.cpu()
    for i, row in enumerate(rows):
        groups.setdefault(row.numpy().tobytes(), []).append(i)
    return [(members, rows[members[0]].nonzero().flatten()) for members in groups.values()]


def _query_index(rows: list[int], size: int, num_queries: int) -> slice | torch.Tensor:
    """Token positions of query-block ``rows``: a slice when they are consecutive, else an index tensor."""
    if rows[-1] - rows[0] == len(rows) - 1:
        return slice(rows[0] * size, min((rows[-1] + 1) * size, num_queries))
    return torch.cat([torch.arange(r * size, min((r + 1) * size, num_queries)) for r in rows])


def block_sparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, block: BlockMask
) -> torch.Tensor:
    """Attention restricted to ``block``'s kept blocks (each kept block dense), plus ``mask`` inside them.

    q: (B, H, S_q, D); k, v: (B, H, S_k, D|D_v); ``mask`` None, bool keep or additive, shaped (B|1, 1|H, 1, S_k)
    (per key) or (B|1, 1|H, S_q, S_k). Returns (B, H, S_q, D_v). Every query row must keep at least one key, and
    ``S_q`` / ``S_k`` must be the lengths ``block`` was built for (ValueError otherwise: more tokens would leave rows
    uncomputed, fewer would give the zero padding keys weight).
    """
    if (q.shape[2], k.shape[2], v.shape[2]) != (block.num_queries, block.num_keys, block.num_keys):
        raise ValueError(
            f"q has {q.shape[2]} tokens and k/v have {k.shape[2]}/{v.shape[2]}, but the block mask was built for "
            f"{block.num_queries} queries x {block.num_keys} keys"
        )
    size, n_keys = block.block_size, k.shape[2]
    n_kb = block.blocks.shape[1]
    kb, vb = _blocked(k, size, n_kb), _blocked(v, size, n_kb)
    out = q.new_empty(*q.shape[:-1], v.shape[-1])
    for rows, kept in _row_groups(block.blocks):
        if not kept.numel():
            raise ValueError(f"the block mask keeps no key block for query block(s) {rows}; keep at least one")
        kept = kept.to(q.device)
        n_sel = kept.numel() * size - (n_kb * size - n_keys if int(kept[-1]) == n_kb - 1 else 0)
        keys = kb.index_select(2, kept).flatten(2, 3)[:, :, :n_sel]
        values = vb.index_select(2, kept).flatten(2, 3)[:, :, :n_sel]
        queries = _query_index(rows, size, q.shape[2])
        sub_mask = None
        if mask is not None:
            key_pos = (kept[:, None] * size + torch.arange(size, device=q.device)).flatten()[:n_sel]
            sub_mask = mask[..., key_pos] if mask.shape[-2] == 1 else mask[..., queries, :][..., key_pos]
        out[:, :, queries] = F.scaled_dot_product_attention(q[:, :, queries], keys, values, attn_mask=sub_mask)
    return out
