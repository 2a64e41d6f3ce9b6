"""Qwen-Image and Qwen-Image-Edit (``QwenImageTransformer2DModel``): joint attention over ``[text, image]``.

60 double-stream blocks (text and image projected separately, then one joint call), one joint index. The stock
``QwenDoubleStreamAttnProcessor2_0`` sends attention through diffusers' dispatcher with the text padding mask as a
boolean key mask, so attnedit keeps it and only says where the tokens are. The Edit pipelines append the reference
image's packed tokens after the target's (``img_shapes[b] = [target, reference, ...]``): edits act on the target
image (its grid is ``img_shapes[0][0]``); reference tokens are neither image nor text to them (key masks keep them
visible). CFG: separate passes, cond first (``true_cfg_scale`` with a negative prompt).

Published denoiser configs (``attnedit/models/configs``), verbatim ``transformer/config.json`` of the hub repos as
quoted in public code (musubi-tuner's ``qwen_image_model.py`` docstring for Qwen/Qwen-Image, with its
``pooled_projection_dim`` that diffusers' class ignores; a model-analysis note quoting Qwen/Qwen-Image-Edit's).
"""

from __future__ import annotations

import math

import torch

from attnedit.core.families import Family, ForwardInfo, ProcessorCall, TokenLayout


def read_grid(model: torch.nn.Module, latent: torch.Tensor, bound: dict) -> tuple[int, int]:
    """The target image's packed-token grid ``(h, w)`` from ``img_shapes[0][0] = (frames, h, w)``."""
    shapes = bound.get("img_shapes")
    if shapes:
        first = shapes[0]
        _, h, w = first[0] if isinstance(first, (list, tuple)) and isinstance(first[0], (list, tuple)) else first
        return (int(h), int(w))
    side = math.isqrt(latent.shape[1])
    return (side, latent.shape[1] // side)


def layout(call: ProcessorCall, info: ForwardInfo | None, num_queries: int, num_keys: int) -> TokenLayout | None:
    """``[text; target image; reference images]``: text from the call's text stream, target from the grid."""
    text_states = call.get("encoder_hidden_states")
    text = text_states.shape[1] if text_states is not None else 0
    image_tokens = math.prod(info.grid) if info is not None else num_queries - text
    image = slice(text, text + image_tokens)
    words = slice(0, text) if text else None
    return TokenLayout(image, image, words, words)


FAMILY = Family(
    name="qwen_image",
    model_class="QwenImageTransformer2DModel",
    batched_cfg=False,
    site_rules=((r"transformer_blocks\.\d+\.attn", "joint", "double"),),
    read_grid=read_grid,
    layout=layout,
    perturbed_kind="joint",
    text_kind="joint",
    aliases=("qwen-image", "qwenimage"),
)


# -- published checkpoints (attnedit.models.architectures) ------------------------------------------------------
PUBLISHED = (
    {"name": "qwen-image", "hub_id": "Qwen/Qwen-Image", "pipeline": "QwenImagePipeline", "reduced": {"num_layers": 1}},
    {"name": "qwen-image-edit", "hub_id": "Qwen/Qwen-Image-Edit", "pipeline": "QwenImageEditPipeline",
     "reduced": {"num_layers": 1}},
)


def published_sites(c: dict) -> list[tuple[str, str, int, str]]:
    """One joint attention per double-stream block."""
    return [(f"transformer_blocks.{i}.attn", "joint", c["num_attention_heads"], "double") for i in range(c["num_layers"])]


def example_inputs(arch, model, batch, size, text, rand, t) -> dict:
    """Packed latents (2x2 VAE latents per token), padded text with its mask (last 3 tokens padding, as a batch of
    prompts of different lengths gets), ``img_shapes``; Edit checkpoints add a reference image of the same size."""
    c = model.config
    h, w = size or (4, 6)
    images = [(1, h, w), (1, h, w)] if "Edit" in arch.pipeline else [(1, h, w)]
    mask = torch.zeros(batch, text, dtype=torch.long)
    mask[:, : text - 3] = 1
    return {"hidden_states": rand(batch, len(images) * h * w, c.in_channels), "timestep": t / 1000,
            "encoder_hidden_states": rand(batch, text, c.joint_attention_dim), "encoder_hidden_states_mask": mask,
            "img_shapes": [images] * batch}


# -- tiny random-weight pipeline (attnedit.models.zoo) ------------------------------------------------------------
_CHAT_SPECIALS = ["<|im_start|>", "<|im_end|>", "\n", "<|endoftext|>"]


def _chat_tokenizer():
    """Word-level stand-in for Qwen2's tokenizer: chat markers and newlines are tokens, so the pipeline's system
    prompt prefix is exactly its ``prompt_template_encode_start_idx`` (34) tokens, as with the real tokenizer."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    from attnedit.models.zoo_text import word_tokenizer

    vocab = dict(word_tokenizer("t5").get_vocab())
    for token in _CHAT_SPECIALS:
        vocab.setdefault(token, len(vocab))
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(_CHAT_SPECIALS)
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=2048, pad_token="<|endoftext|>",
                                   eos_token="<|im_end|>", unk_token="<unk>")


def _build_qwen_image():
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = _chat_tokenizer()
    config = Qwen2_5_VLConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 512,
                     "rope_parameters": {"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 1e6},
                     "pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.pad_token_id,  # as Qwen2.5-VL's
                     "eos_token_id": tokenizer.eos_token_id},
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16},
        vocab_size=len(tokenizer))
    encoder = Qwen2_5_VLForConditionalGeneration(config)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=4 * 4, out_channels=4, num_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(8, 4, 4))
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False],
                                 latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9)
    return QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=encoder, tokenizer=tokenizer,
                             transformer=transformer)


TINY = {
    "qwen_image": {
        "build": _build_qwen_image,
        "call": {"height": 32, "width": 32, "true_cfg_scale": 4.0, "negative_prompt": "blurry",
                 "max_sequence_length": 64},
    },
}
