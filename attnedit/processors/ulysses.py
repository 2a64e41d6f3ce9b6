"""Edited attention inside diffusers' Ulysses context parallelism (``enable_parallelism``).

Under Ulysses each rank projects q, k, v for its shard of the tokens and all heads; diffusers' all-to-all
(``TemplatedUlyssesAttention``) then gives every rank *all* tokens for ``H / N`` heads, runs an inner attention op
and sends the result back. attnedit hands diffusers its own inner op, so the edits run where the whole sequence is
present and no collective of attnedit's own is involved:

* token-level edits (radial block masks, key masks, recorders) see the global sequence and global token indices;
* head-level edits (``HeadBlend`` / SoftPAG) see ``call.head_offset``: rank r holds heads ``[r H/N, (r+1) H/N)``.

The all-to-all concatenates the ranks' local sequences. For one split sequence (Wan self-attention) that is the
global order. A HunyuanVideo rank holds ``[video_r; text_r]`` (video and text are split separately), so the gathered
sequence is ``[video_0; text_0; video_1; text_1; ...]``; :func:`gathered_order` is the permutation back to
``[video; text]`` that the edits (and the key padding mask diffusers gathers alongside) are written in.
"""

from __future__ import annotations

import dataclasses
import itertools
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import torch

from attnedit.core.attention import attend

if TYPE_CHECKING:
    from attnedit.core.edits import Edit
    from attnedit.core.families import AttentionCall


def ulysses_config(config: Any, site: Any, family: Any) -> Any:
    """The ``ParallelConfig`` when this site's tokens are split across ranks, else None.

    ``config`` is what the stock processor passes the dispatcher (or its ``_parallel_config``). Cross-attention keeps
    its text keys whole on every rank (diffusers' Wan processor passes no parallel config there), so only self and
    joint attention are sharded; a family must declare that attnedit knows its layout (``context_parallel``).
    """
    cp = getattr(config, "context_parallel_config", None)
    if cp is None or site.kind == "cross":
        return None
    if family.context_parallel is None:
        raise ValueError(f"attnedit's edits under context parallelism support families that declare their sharded "
                         f"layout (Wan, HunyuanVideo); got {family.name}")
    return config


def _check_equal_ulysses(config: Any) -> None:
    cp = config.context_parallel_config
    if cp.ring_degree > 1 or cp.ulysses_anything or cp.ulysses_degree < 2:
        raise ValueError(
            "attnedit's edits support Ulysses context parallelism with equal splits only; got "
            f"ring_degree={cp.ring_degree}, ulysses_anything={cp.ulysses_anything} (use ContextParallelConfig(ulysses_degree=N))"
        )


def global_call(call: AttentionCall, config: Any) -> AttentionCall:
    """The call as the edits must see it on this rank: global token counts and slices, this rank's head offset."""
    cp = config.context_parallel_config
    n, rank, heads = cp.ulysses_degree, cp._ulysses_local_rank, call.site.heads
    if heads % n:
        raise ValueError(f"{call.site.name} has {heads} heads, which Ulysses degree {n} cannot split evenly")

    def scaled(s: slice | None) -> slice | None:  # each segment of the local layout is 1/n of the global one
        return None if s is None else slice(s.start * n, s.stop * n)

    return dataclasses.replace(
        call, num_queries=call.num_queries * n, num_keys=call.num_keys * n, image_queries=scaled(call.image_queries),
        image_keys=scaled(call.image_keys), text_queries=scaled(call.text_queries), text_keys=scaled(call.text_keys),
        head_offset=rank * (heads // n),
    )


def local_segments(num_keys: int, image_keys: slice, text_keys: slice | None) -> tuple[int, ...]:
    """Lengths of the contiguous, separately split segments of a rank's sequence (video, then text if joint)."""
    ends = sorted({0, num_keys, *(x for s in (image_keys, text_keys) if s is not None for x in (s.start, s.stop))})
    return tuple(b - a for a, b in itertools.pairwise(ends) if b > a)


@lru_cache(maxsize=64)
def _orders(segments: tuple[int, ...], world: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(gathered index of each global position, global index of each gathered position); None for the identity."""
    if len(segments) <= 1:
        return None
    local = sum(segments)
    starts = [sum(segments[:i]) for i in range(len(segments))]
    order = torch.cat([
        rank * local + start + torch.arange(length)
        for start, length in zip(starts, segments) for rank in range(world)
    ])
    return order, torch.argsort(order)


def gathered_order(segments: tuple[int, ...], world: int) -> torch.Tensor | None:
    """Index that turns the all-to-all's layout (ranks' local sequences one after another) into global order."""
    orders = _orders(tuple(segments), world)
    return None if orders is None else orders[0]


def shard_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, call: AttentionCall,
    edits: list[Edit], kernels: tuple[Any, Any], backend: str, segments: tuple[int, ...], world: int,
) -> torch.Tensor:
    """Edited attention of one rank after the all-to-all.

    q, k, v: ``(B, S, H_local, D)`` in the gathered layout; ``mask``: None or a key mask ``(B, 1, 1, S)`` in the same
    layout; ``call``: the global call (:func:`global_call`); ``kernels``: ``(native, masked)``, the stock kernel and
    the one for a mask an edit changed, each ``f(q, k, v, mask)`` on ``(B, H, S, D)``. Returns ``(B, S, H_local, D)``
    in the gathered layout.
    """
    orders = _orders(tuple(segments), world)
    if orders is not None:
        to_global, to_gathered = (o.to(q.device) for o in orders)
        q, k, v = (x.index_select(1, to_global) for x in (q, k, v))
        mask = None if mask is None else mask.index_select(-1, to_global)
    native, masked = kernels

    def kernel(q, k, v, m):
        return (native if m is mask else masked)(q, k, v, m)

    out = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, call, edits, kernel, backend)
    out = out.transpose(1, 2)
    return out if orders is None else out.index_select(1, to_gathered)


def _no_backward(ctx: Any, grad_out: torch.Tensor, *args: Any, **kwargs: Any):
    raise NotImplementedError("attnedit's edited attention under context parallelism has no backward pass (inference only)")


def ulysses_attention(
    config: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, local: AttentionCall,
    call: AttentionCall, edits: list[Edit], kernels: tuple[Any, Any], backend: str,
) -> torch.Tensor:
    """``(B, H, S_local, D)``: the edited attention of this rank's queries, through diffusers' Ulysses all-to-all.

    q, k, v: this rank's ``(B, H, S_local, D)``; ``local``: the call as this rank sees it (its token layout),
    ``call``: the global call (:func:`global_call`); ``kernels``: ``(native, masked)`` on ``(B, H, S, D)`` without
    parallelism. diffusers moves q, k, v (and all-gathers a key mask that covers this rank's keys); attnedit only
    supplies the op that runs in between (:func:`shard_attention`).
    """
    from diffusers.models.attention_dispatch import _templated_context_parallel_attention

    _check_equal_ulysses(config)
    world = config.context_parallel_config.ulysses_degree
    if mask is not None and mask.shape[-1] != k.shape[2]:
        raise ValueError(
            f"{call.site.name}: under context parallelism the key mask must cover this rank's {k.shape[2]} "
            f"keys, not {mask.shape[-1]}; enable parallelism with attnedit.core.parallel.enable_ulysses"
        )
    segments = local_segments(k.shape[2], local.image_keys, local.text_keys)

    def forward_op(ctx, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, return_lse,
                   _save_ctx=True, _parallel_config=None):
        if return_lse:
            raise ValueError("attnedit's edited attention returns no log-sum-exp: ring attention is not supported")
        return shard_attention(query, key, value, attn_mask, call, edits, kernels, backend, segments, world)

    out = _templated_context_parallel_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask,
        forward_op=forward_op, backward_op=_no_backward, _parallel_config=config,
    )
    return out.transpose(1, 2)
