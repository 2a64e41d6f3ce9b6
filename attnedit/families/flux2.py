"""FLUX.2 [dev] and FLUX.2 [klein] (``Flux2Transformer2DModel``): joint attention over ``[text, image]``.

Double-stream blocks (text and image projected separately, then joined) and single-stream blocks (one joined
sequence, attention and MLP in parallel), numbered in one flat joint index. All four stock processors
(``Flux2AttnProcessor``, ``Flux2ParallelSelfAttnProcessor`` and their KV-cache variants) send attention through
diffusers' dispatcher, the KV ones via the module-level ``_flux2_kv_causal_attention`` (routed as well, see
:func:`attnedit.processors.stock.rebound_call`), so attnedit keeps them and only says where the tokens are.

Token order: ``[text, image tokens]``, where the image tokens are the target's and, for multi-reference editing,
the reference images' (``img_ids`` is ``(t, h, w, l)``; the target has ``t == 0``, reference ``i`` has
``t = 10 + 10 i``). Edits act on the target image; reference tokens are neither image nor text to them. With
``Flux2KleinKVPipeline``'s KV cache the references come first (``[text, ref, target]``): in "extract" mode the
text+target queries attend to all keys (edited) and the references attend to themselves (left alone); in
"cached" mode the cached reference keys sit between text and target keys. CFG: separate passes, cond first
(FLUX.2 [dev] is guidance-distilled: one pass; klein base: true CFG; klein distilled: one pass).

Published configs (``attnedit/models/configs``), read from public sources (no hub access here):
* ``flux2-dev``: black-forest-labs/FLUX.2-dev ``transformer/config.json`` as quoted in public tests (no
  ``guidance_embeds`` key: the class default True), matching diffusers' ``scripts/convert_flux2_to_diffusers.py``
  ("flux2-dev": 8 double, 48 single, 48 heads, joint dim 15360); ``_diffusers_version`` as of its release.
* ``flux2-klein-4b``: black-forest-labs/FLUX.2-klein-4B ``transformer/config.json`` (byte-identical to
  klein-base-4B's, as quoted verbatim in public code): 5 double, 20 single, 24 heads, joint dim 7680.
* ``flux2-klein-9b``: black-forest-labs/FLUX.2-klein-9B (gated); diffusers' conversion script "klein-9b" and
  BFL's ``Klein9BParams``: 8 double, 24 single, 32 heads, joint dim 12288; other keys as klein-4B.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from attnedit.core.families import TWO_STREAM_RULES, Family, ForwardInfo, ProcessorCall, TokenLayout


def _ids(bound: dict) -> torch.Tensor | None:
    ids = bound.get("img_ids")
    return None if ids is None else (ids if ids.ndim == 2 else ids[0])


def _target(ids: torch.Tensor) -> torch.Tensor:
    """Positions of the target image's tokens among the image tokens (``t == 0``; all of them without references)."""
    target = (ids[:, 0] == 0).nonzero().flatten()
    return target if len(target) else torch.arange(len(ids))


def read_grid(model: torch.nn.Module, latent: torch.Tensor, bound: dict) -> tuple[int, int]:
    """The target image's grid of packed tokens, from ``img_ids`` (t, row, column, l); reference tokens excluded."""
    ids = _ids(bound)
    if ids is None:
        side = math.isqrt(latent.shape[1])
        return (side, latent.shape[1] // side)
    target = ids[_target(ids)]
    return (int(target[:, 1].max()) + 1, int(target[:, 2].max()) + 1)


def extra_info(model: torch.nn.Module, bound: dict) -> dict[str, Any]:
    """Where the target's tokens start among the image tokens (after the references in KV "extract" mode)."""
    ids = _ids(bound)
    return {"target_start": int(_target(ids)[0]) if ids is not None else 0}


def layout(call: ProcessorCall, info: ForwardInfo | None, num_queries: int, num_keys: int) -> TokenLayout | None:
    text_states = call.get("encoder_hidden_states")
    text = text_states.shape[1] if text_states is not None else call.get("num_txt_tokens") or (
        info.text_tokens if info is not None else 0)
    image_tokens = math.prod(info.grid) if info is not None else num_queries - text
    words = slice(0, text) if text else None
    mode, refs = call.get("kv_cache_mode"), call.get("num_ref_tokens") or 0
    if mode == "extract" and refs:
        if call.index:  # the references attending to themselves
            return None
        # queries [text, target], keys [text, references, target]
        return TokenLayout(slice(text, text + image_tokens), slice(text + refs, text + refs + image_tokens),
                           words, words)
    if mode == "cached" and call.get("kv_cache") is not None:  # cached reference keys between text and target
        return TokenLayout(slice(text, text + image_tokens), slice(num_keys - image_tokens, num_keys), words, words)
    start = text + (info.extra.get("target_start", 0) if info is not None else 0)
    image = slice(start, start + image_tokens)
    return TokenLayout(image, image, words, words)


FAMILY = Family(
    name="flux2",
    model_class="Flux2Transformer2DModel",
    batched_cfg=False,
    site_rules=TWO_STREAM_RULES,
    read_grid=read_grid,
    layout=layout,
    perturbed_kind="joint",
    text_kind="joint",
    extra_info=extra_info,
    aliases=("flux2-klein", "flux2-dev"),
)


# -- published checkpoints (attnedit.models.architectures) ------------------------------------------------------
PUBLISHED = (
    dict(name="flux2-dev", hub_id="black-forest-labs/FLUX.2-dev", pipeline="Flux2Pipeline",
         reduced={"num_layers": 1, "num_single_layers": 1}),
    dict(name="flux2-klein-4b", hub_id="black-forest-labs/FLUX.2-klein-4B", pipeline="Flux2KleinPipeline",
         reduced={"num_layers": 1, "num_single_layers": 1}),
    dict(name="flux2-klein-9b", hub_id="black-forest-labs/FLUX.2-klein-9B", pipeline="Flux2KleinPipeline",
         reduced={"num_layers": 1, "num_single_layers": 1}),
)


def published_sites(c: dict) -> list[tuple[str, str, int, str]]:
    """Double-stream then single-stream blocks, one flat joint index."""
    h = c["num_attention_heads"]
    return ([(f"transformer_blocks.{i}.attn", "joint", h, "double") for i in range(c["num_layers"])]
            + [(f"single_transformer_blocks.{i}.attn", "joint", h, "single") for i in range(c["num_single_layers"])])


def example_inputs(arch, model, batch, size, text, rand, t) -> dict:
    """Packed latents (2x2-patchified VAE latents per token) with their (t, h, w, l) ids; guidance where embedded."""
    c = model.config
    h, w = size or (4, 6)
    dtype = next(model.parameters()).dtype
    ids = torch.zeros(h, w, 4)
    ids[..., 1], ids[..., 2] = torch.arange(h)[:, None], torch.arange(w)[None, :]
    text_ids = torch.zeros(text, 4)
    text_ids[:, 3] = torch.arange(text)
    out = {"hidden_states": rand(batch, h * w, c.in_channels), "timestep": t / 1000,
           "encoder_hidden_states": rand(batch, text, c.joint_attention_dim),
           "img_ids": ids.reshape(1, -1, 4).to(dtype), "txt_ids": text_ids[None].to(dtype)}
    if c.guidance_embeds:
        out["guidance"] = torch.full((batch,), 4.0)
    return out


# -- tiny random-weight pipeline (attnedit.models.zoo) ------------------------------------------------------------
def _build_klein():
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from attnedit.models.zoo_text import word_tokenizer

    tokenizer = word_tokenizer("llama")
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"  # Qwen3's, minus the markup
    encoder = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=28, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, max_position_embeddings=512, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id))
    transformer = _tiny_transformer()
    # 4 levels as published (8 px per latent, 16 px per packed token); 28 text layers: the pipeline stacks 9, 18, 27
    vae = AutoencoderKLFlux2(block_out_channels=(8,) * 4, layers_per_block=1, latent_channels=4, norm_num_groups=4,
                             sample_size=64)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    return Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=encoder, tokenizer=tokenizer,
                              transformer=transformer, is_distilled=False)


def _tiny_transformer() -> torch.nn.Module:
    from diffusers import Flux2Transformer2DModel

    return Flux2Transformer2DModel(
        patch_size=1, in_channels=4 * 4,  # 2x2-patchified VAE latents
        num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=3 * 16,  # 3 stacked text-encoder layers of width 16
        timestep_guidance_channels=32, mlp_ratio=2.0, axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False)


TINY = {
    "flux2_klein": {
        "build": _build_klein,
        "call": {"height": 64, "width": 64, "guidance_scale": 4.0, "max_sequence_length": 16},
    },
}
