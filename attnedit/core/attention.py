"""The attention call with edits applied: one fast path per backend and one dense reference.

Order of application inside a call (the composition rule): key scales multiply K; key restrictions
(per-key keeps and block masks) are AND-ed; attention is computed; recorders observe the final
probabilities; output blends run in the order the edits were given.

Backends: ``"native"`` is the stock call of the family (SDPA, or diffusers' dispatcher with whatever backend the
model was set to); ``"reference"`` is plain softmax(QK^T / sqrt(d)) V with every restriction as a dense
S_q x S_k mask, the obviously-correct version that tests compare against; ``"flex"`` runs block masks through
PyTorch FlexAttention (CUDA; also CPU under torch.compile); ``"auto"`` picks native unless an edit needs
probabilities (reference) or a block mask (flex on CUDA, else the block-sparse CPU path).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from attnedit.core.edits import BlockMask, Edit
from attnedit.core.key_blocks import drop_hidden_key_blocks

if TYPE_CHECKING:
    from attnedit.core.families import AttentionCall

BACKENDS = ("auto", "native", "reference", "flex")
Native = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def _per_row(edit: Edit, call: AttentionCall, value: torch.Tensor, neutral: float | bool, name: str) -> torch.Tensor:
    """Check an edit's per-key tensor (1 | B, S_k) and neutralize the rows outside its branches -> (B, S_k)."""
    batch = len(call.branches)
    if value.ndim != 2 or value.shape[-1] != call.num_keys or value.shape[0] not in (1, batch):
        raise ValueError(
            f"{edit!r} gave a {name} of shape {tuple(value.shape)} at {call.site.name}; "
            f"expected (1 or {batch}, {call.num_keys}) for {call.num_keys} keys"
        )
    value = value.expand(batch, -1)
    rows = edit.rows(call)
    if rows is not None:
        value = torch.where(rows[:, None], value, torch.full_like(value, neutral))
    return value


def key_restrictions(call: AttentionCall, edits: list[Edit]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Combined (key_scale, key_keep), each (B, S_k) or None."""
    scale = keep = None
    for edit in edits:
        s = edit.key_scale(call)
        if s is not None:
            s = _per_row(edit, call, s.to(call.dtype), 1.0, "key scale")
            scale = s if scale is None else scale * s
        m = edit.key_keep(call)
        if m is not None:
            m = _per_row(edit, call, m.bool(), True, "key mask")
            keep = m if keep is None else keep & m
    if keep is not None and not keep.any(dim=-1).all():
        raise ValueError(f"the key masks of {edits!r} hide every key at {call.site.name}; leave at least one visible")
    return scale, keep


def block_restriction(call: AttentionCall, edits: list[Edit]) -> BlockMask | None:
    """Block masks AND-ed together; block-mask edits must cover every row of a call they act on."""
    combined = None
    for edit in edits:
        bm = edit.block_mask(call)
        if bm is None:
            continue
        if edit.rows(call) is not None:
            raise ValueError(f"{edit!r}: block masks apply to whole calls; do not restrict them to branches")
        if (bm.num_queries, bm.num_keys) != (call.num_queries, call.num_keys):
            raise ValueError(
                f"{edit!r} gave a block mask for {bm.num_queries} x {bm.num_keys} tokens at {call.site.name}, "
                f"which has {call.num_queries} queries x {call.num_keys} keys"
            )
        combined = bm if combined is None else combined & bm
    return combined


def merge_masks(mask: torch.Tensor | None, keep: torch.Tensor | None) -> torch.Tensor | None:
    """Fold a (B, S_k) key keep into the stock mask (bool or additive), broadcast as (B, 1, 1, S_k)."""
    if keep is None:
        return mask
    keep = keep[:, None, None, :]
    if mask is None:
        return keep
    if mask.dtype == torch.bool:
        return mask & keep
    return mask.masked_fill(~keep, float("-inf"))


def dense_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
    block: BlockMask | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference attention: (out (B, H, S_q, D), probs (B, H, S_q, S_k)). ``mask`` bool (keep) or additive.

    Half-precision inputs (float16 / bfloat16) are computed in float32, as fused kernels accumulate, and the
    results cast back: float16 scores ``QK^T`` can overflow (the reason for diffusers' ``upcast_attention``), and
    rounding scores and probabilities to 8 mantissa bits (bfloat16) would make the reference the least exact path.
    """
    dtype = q.dtype
    if dtype in (torch.float16, torch.bfloat16):
        q, k, v = q.float(), k.float(), v.float()
        if mask is not None and mask.dtype != torch.bool:
            mask = mask.float()
    scores = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    if block is not None:
        scores = scores.masked_fill(~block.dense().to(scores.device), float("-inf"))
    probs = scores.softmax(dim=-1)
    if mask is not None or block is not None:  # a query that may see no key gets zeros, as torch's SDPA gives
        probs = probs.masked_fill(torch.isneginf(scores).all(dim=-1, keepdim=True), 0.0)  # (padded text queries)
    return (probs @ v).to(dtype), probs.to(dtype)


def flex_attention(q, k, v, mask: torch.Tensor | None, block: BlockMask) -> torch.Tensor:
    """Block-masked attention through FlexAttention; ``mask`` may only be a bool key mask (B, 1, 1, S_k)."""
    keys = None if mask is None else mask[:, 0, 0, :].expand(q.shape[0], -1).to(q.device)
    return _compiled_flex()(q, k, v, block_mask=flex_block_mask(block, keys, q.device))


_FLEX_MASKS: dict[tuple, tuple[torch.Tensor, object]] = {}


def flex_block_mask(block: BlockMask, keys: torch.Tensor | None, device: torch.device):
    """FlexAttention BlockMask of ``block`` AND a per-key keep ``keys`` (B, S_k), built once per block table.

    Cached by the identity of ``block.blocks`` (treated as read-only) and the content of ``keys``, so an edit that
    returns the same table every call (radial attention caches one per geometry) pays the build once. Without
    ``keys`` and with blocks that divide 128 or are multiples of it the mask is built from the table itself
    (:func:`flex_mask_from_table`): ``create_block_mask`` evaluates the mask at every query-key pair, about 10 bytes
    each (11 GB at Wan 480p, 59 GB at Wan 2.2 A14B's 76,800 tokens).
    """
    from torch.nn.attention.flex_attention import create_block_mask

    ident = (id(block.blocks), block.block_size, block.num_queries, block.num_keys, str(device))
    content = None if keys is None else (tuple(keys.shape), keys.cpu().numpy().tobytes())
    hit = _FLEX_MASKS.get((ident, content))
    if hit is not None and hit[0] is block.blocks:
        return hit[1]
    table, size = block.blocks.to(device), block.block_size
    if keys is None and (size % FLEX_BLOCK == 0 or FLEX_BLOCK % size == 0):
        bm = flex_mask_from_table(block, device)
    else:
        def mask_mod(b, h, q_idx, kv_idx):
            allowed = table[q_idx // size, kv_idx // size]
            return allowed if keys is None else allowed & keys[b, kv_idx]

        batch = keys.shape[0] if keys is not None else None
        bm = create_block_mask(mask_mod, batch, None, block.num_queries, block.num_keys, device=device)
    if len(_FLEX_MASKS) >= 16:
        _FLEX_MASKS.pop(next(iter(_FLEX_MASKS)))
    _FLEX_MASKS[(ident, content)] = (block.blocks, bm)
    return bm


FLEX_BLOCK = 128  # FlexAttention's default block size


def flex_mask_from_table(block: BlockMask, device: torch.device):
    """The BlockMask ``create_block_mask`` would build (128-token blocks) for a block table, without any S x S mask.

    The table's block size divides 128 or is a multiple of it (radial attention: 128; Wan 2.2's released setting:
    64). A 128-block is kept when any table block in it is kept and full when all are; a short last block row or
    column (token counts not a multiple of 128) and any mixed block are partial, evaluated by ``mask_mod``.
    """
    from torch.nn.attention.flex_attention import BlockMask as FlexMask

    size, n = block.block_size, FLEX_BLOCK
    nq, nk = -(-block.num_queries // n), -(-block.num_keys // n)
    rows, cols = -(-nq * n // size), -(-nk * n // size)  # the table padded to whole 128-blocks
    table = torch.zeros(rows, cols, dtype=torch.bool, device=device)
    table[: block.blocks.shape[0], : block.blocks.shape[1]] = block.blocks.to(device)
    if size >= n:
        kept = table.repeat_interleave(size // n, 0).repeat_interleave(size // n, 1)[:nq, :nk]
        full = kept.clone()
    else:
        per = table.view(nq, n // size, nk, n // size)
        kept, full = per.any(3).any(1), per.all(3).all(1)
    if block.num_queries % n:
        full[-1, :] = False
    if block.num_keys % n:
        full[:, -1] = False

    def ordered(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (t[None, None].sum(-1, dtype=torch.int32),
                torch.argsort(t[None, None].int(), dim=-1, descending=True, stable=True).int())

    def mask_mod(b, h, q_idx, kv_idx):
        return table[q_idx // size, kv_idx // size]

    return FlexMask.from_kv_blocks(*ordered(kept & ~full), *ordered(full), BLOCK_SIZE=n, mask_mod=mask_mod,
                                   seq_lengths=(block.num_queries, block.num_keys))


_FLEX = None


def _compiled_flex():
    global _FLEX
    if _FLEX is None:
        from torch.nn.attention.flex_attention import flex_attention as flex

        _FLEX = torch.compile(flex, dynamic=False)
    return _FLEX


def resolve_backend(backend: str, device: torch.device, needs_probs: bool, has_block: bool) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}; valid: {list(BACKENDS)}")
    if needs_probs:
        return "reference"  # fused kernels never return probabilities
    if backend != "auto":
        return backend
    if has_block:
        return "flex" if device.type == "cuda" else "block_sparse"
    return "native"


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
    call: AttentionCall, edits: list[Edit], native: Native, backend: str = "auto",
) -> torch.Tensor:
    """Attention of one call with ``edits`` applied. q, k, v: (B, H, S, D); returns (B, H, S_q, D)."""
    scale, keep = key_restrictions(call, edits)
    if scale is not None:
        k = k * scale[:, None, :, None]
    block = block_restriction(call, edits)
    if block is not None and keep is not None:  # key blocks hidden for every row leave the block-sparse call
        block = drop_hidden_key_blocks(block, keep)
    recorders = [e for e in edits if e.records]
    mask = merge_masks(mask, keep)
    chosen = resolve_backend(backend, q.device, bool(recorders), block is not None)
    if chosen == "reference":
        out, probs = dense_attention(q, k, v, mask, block)
        for edit in recorders:
            rows = edit.rows(call)
            edit.record(call, probs if rows is None else probs[rows])
    elif block is not None and chosen == "flex":
        out = flex_attention(q, k, v, mask, block)
    elif block is not None:
        from attnedit.core.block_sparse import block_sparse_attention

        out = block_sparse_attention(q, k, v, mask, block)
    else:
        out = native(q, k, v, mask)
    for edit in edits:
        if edit.blends:
            blended = edit.blend(call, out, v, query=q, key=k, mask=mask)
            rows = edit.rows(call)
            out = blended if rows is None else torch.where(rows[:, None, None, None], blended, out)
    return out
