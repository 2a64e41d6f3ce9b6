"""Where PAG's perturbed attention map differs from the model's: the scopes of :class:`~attnedit.core.edits.HeadBlend`.

Perturbed-Attention Guidance (Ahn et al. 2024, arXiv:2403.17377) replaces a self-attention map by the identity.
On a joint ``[image; text]`` sequence (SD3, FLUX, HunyuanVideo) that can be done over different parts of the map:

* ``"all"``: every query attends only to itself (the SoftPAG paper and HeadHunter; Ahn et al. 2025);
* ``"image-image"``: diffusers' SD3 PAG processors (``PAGJointAttnProcessor2_0`` / ``PAGCFGJointAttnProcessor2_0``)
  put a -inf logit everywhere off the diagonal of the image->image block, so an image query attends to itself and
  to every text key; text rows are untouched;
* ``"image"``: image queries attend only to themselves (no text key either); text rows are untouched.

Each scope is a key restriction of the perturbed map, :func:`perturbed_keep` (the dense reference, S_q x S_k); the
self key of a perturbed row is always kept. Without text keys (UNet, Wan self-attention) every scope is the
identity. :func:`image_image_attention` computes the ``"image-image"`` rows without an S x S map: per image query
a softmax over ``1 + T`` logits (its own key, the T text keys).
"""

from __future__ import annotations

import math
import numbers
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from attnedit.core.families import AttentionCall

SCOPES = ("all", "image-image", "image")


def perturbed_keep(call: AttentionCall, scope: str) -> torch.Tensor:
    """Bool ``(S_q, S_k)``: the logits the perturbed map keeps (True); a row that is all True is not perturbed.

    For references and tests only (it is the S x S map the fast path avoids).
    """
    n = call.num_queries
    eye = torch.eye(n, dtype=torch.bool, device=call.device)
    if scope == "all" or call.text_queries is None:
        return eye
    keep = torch.ones(n, call.num_keys, dtype=torch.bool, device=call.device)
    image, text = call.image_queries, call.text_keys
    keep[image] = eye[image]
    if scope == "image-image":
        keep[image, text] = True
    return keep


def head_table(heads: Any) -> dict[int, tuple[int, ...]]:
    """``{layer: heads}`` checked and sorted: integer layers and heads >= 0, at least one head per layer."""
    def integer(x: Any) -> bool:
        return isinstance(x, numbers.Integral) and not isinstance(x, bool) and x >= 0

    if not isinstance(heads, dict):
        raise ValueError(f"heads={heads!r} must be a {{layer: heads}} dict (None: every head)")  # noqa: TRY004
    if not heads:
        raise ValueError("heads={} selects no head; name at least one layer (None: every head)")
    table = {}
    for layer, hs in heads.items():
        hs = (hs,) if integer(hs) else tuple(hs) if isinstance(hs, (tuple, list, set, frozenset, range)) else None
        if not integer(layer) or not hs or not all(integer(h) for h in hs):
            raise ValueError(f"heads={heads!r}: layer {layer!r} -> {hs!r} is not a layer >= 0 with head indices >= 0")
        table[int(layer)] = tuple(sorted({int(h) for h in hs}))
    return table


def _logit_mask(mask: torch.Tensor | None, heads: list[int] | None, rows: slice, keys: slice) -> torch.Tensor | None:
    """The part ``[:, heads, rows, keys]`` of an SDPA-broadcastable mask (bool keep or additive), 4-D."""
    if mask is None:
        return None
    mask = mask.reshape((1,) * (4 - mask.ndim) + tuple(mask.shape))
    if heads is not None and mask.shape[1] > 1:
        mask = mask[:, heads]
    return mask[..., rows if mask.shape[-2] > 1 else slice(None), keys]


def image_image_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttentionCall, mask: torch.Tensor | None = None,
    heads: list[int] | None = None,
) -> torch.Tensor:
    """``(B, h, n_image, D)``: the image rows of the ``"image-image"`` perturbed map applied to V, for ``heads``.

    q, k, v: ``(B, H, S, D)`` of a self/joint call; ``heads``: indices into H (None: all); ``mask`` (bool keep or additive, broadcastable to
    ``(B, H, S_q, S_k)`` like SDPA's; e.g. HunyuanVideo's text padding) applies to the text keys. Equals
    ``softmax(QK^T / sqrt(d) + M) V`` on those rows with ``M`` = :func:`perturbed_keep` as -inf off its True entries.
    """
    image = call.image_queries
    if heads is not None:
        q, k, v = q[:, heads], k[:, heads], v[:, heads]
    qi, vi = q[:, :, image], v[:, :, image]
    if call.text_keys is None:
        return vi
    dtype = q.dtype
    if dtype in (torch.float16, torch.bfloat16):  # as dense_attention: scores and softmax in float32
        q, k, v, qi, vi = q.float(), k.float(), v.float(), qi.float(), vi.float()
    scale = 1.0 / math.sqrt(q.shape[-1])
    own = (qi * k[:, :, image]).sum(-1, keepdim=True) * scale  # (B, H, n, 1)
    text = (qi @ k[:, :, call.text_keys].transpose(-1, -2)) * scale  # (B, H, n, T)
    part = _logit_mask(mask, heads, image, call.text_keys)
    if part is not None:
        text = text.masked_fill(~part, float("-inf")) if part.dtype == torch.bool else text + part.to(text.dtype)
    probs = torch.cat([own, text], dim=-1).softmax(dim=-1)
    out = probs[..., :1] * vi + probs[..., 1:] @ v[:, :, call.text_keys]
    return out.to(dtype)
