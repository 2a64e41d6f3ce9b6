"""HunyuanVideo 1.5 (``HunyuanVideo15Transformer3DModel``): 54 double-stream blocks, joint attention over
``[video, context]``.

The context is one sequence per row: the SigLIP image tokens (image-to-video; zeroed and masked out in
text-to-video), the ByT5 glyph tokens and the Qwen2.5-VL text tokens, valid tokens first and padding after, with a key
padding mask. There are no single-stream blocks; the token refiner's attention (text only) is not a site. The stock
processor sends attention through diffusers' dispatcher, so attnedit keeps it. Image-to-video's leading image tokens
are neither video nor text: token-level edits leave them alone (``extra_info`` counts them). CFG: separate passes
through the pipeline's guider, cond first.

Published config: ``hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-480p_t2v`` ``transformer/config.json``, as
copied verbatim (``_diffusers_version`` 0.36.0.dev0) into public test suites (no hub access here); it matches
diffusers' own defaults except ``task_type``. The 480p image-to-video checkpoint has the same architecture
(``task_type: "i2v"`` only), so its site table is this one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from attnedit.core.families import Family, ForwardInfo, ProcessorCall, TokenLayout, patch_grid
from attnedit.families import _hunyuan_video15_pipeline as _pipeline  # the video editor's hooks


def extra_info(model: torch.nn.Module, bound: dict) -> Mapping[str, Any]:
    """How many image-condition tokens lead the context (0 in text-to-video: the model masks them out and moves
    them behind the text)."""
    image = bound.get("image_embeds")
    if image is None or not bool(torch.any(image != 0)):
        return {"image_tokens": 0}
    return {"image_tokens": image.shape[1]}


def layout(call: ProcessorCall, info: ForwardInfo | None, num_queries: int, num_keys: int) -> TokenLayout | None:
    """Refiner calls (no context) are not sites; in a joint call the video comes first, then the context."""
    context = call.get("encoder_hidden_states")
    if context is None:
        return None
    start = num_queries - context.shape[1]
    image_tokens = int(info.extra.get("image_tokens", 0)) if info is not None else 0
    video, text = slice(0, start), slice(start + image_tokens, num_queries)
    return TokenLayout(video, video, text, text)


FAMILY = Family(
    name="hunyuan_video15",
    model_class="HunyuanVideo15Transformer3DModel",
    batched_cfg=False,
    site_rules=((r"transformer_blocks\.\d+\.attn", "joint", "double"),),
    read_grid=patch_grid,
    layout=layout,
    perturbed_kind="joint",
    video=True,
    radial_preset=lambda pipe: "hunyuan_video15",
    text_kind="joint",
    context_parallel=None,  # diffusers 0.42 ships no _cp_plan for this model; attnedit declares none untested
    extra_info=extra_info,
    video_pipeline=_pipeline.PIPELINE,
    aliases=("hunyuanvideo15", "hunyuan_video_1.5", "hunyuanvideo-1.5"),
)


# -- published checkpoints (attnedit.models.architectures) ------------------------------------------------------
PUBLISHED = (
    dict(name="hunyuan-video-1.5-480p-t2v", hub_id="hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-480p_t2v",
         pipeline="HunyuanVideo15Pipeline", reduced={"num_layers": 1, "num_refiner_layers": 1}),
)


def published_sites(c: dict) -> list[tuple[str, str, int, str]]:
    """One joint attention per double-stream block, nothing else."""
    return [(f"transformer_blocks.{i}.attn", "joint", c["num_attention_heads"], "double") for i in range(c["num_layers"])]


def example_inputs(arch, model, batch, size, text, rand, t) -> dict:
    """Video latents (noisy + condition latents + mask channel, as ``in_channels``), Qwen text and ByT5 glyph
    tokens each with their last 3 padded, and text-to-video's all-zero image tokens (8 here; SigLIP gives 729)."""
    c = model.config
    f, h, w = size or (4, 4, 4)
    mask = torch.zeros(batch, text, dtype=torch.bool)
    mask[:, : text - 3] = True
    glyphs = 8
    mask_2 = torch.zeros(batch, glyphs, dtype=torch.bool)
    mask_2[:, : glyphs - 3] = True
    return {"hidden_states": rand(batch, c.in_channels, f, h, w), "timestep": t,
            "encoder_hidden_states": rand(batch, text, c.text_embed_dim), "encoder_attention_mask": mask,
            "encoder_hidden_states_2": rand(batch, glyphs, c.text_embed_2_dim), "encoder_attention_mask_2": mask_2,
            "image_embeds": torch.zeros(batch, 8, c.image_embed_dim, dtype=next(model.parameters()).dtype)}


# -- tiny random-weight pipeline (attnedit.models.zoo) -----------------------------------------------------------
_CROP = 108  # HunyuanVideo15Pipeline.prompt_template_encode_start_idx: the chat prefix it cuts off


def _chat_tokenizer():
    """Word-level stand-in for Qwen2Tokenizer with a chat template whose prefix is exactly the ``_CROP`` tokens the
    pipeline cuts (the real template's system prompt is 108 Qwen tokens), so the cut keeps the prompt whole."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    from attnedit.models.zoo_text import word_tokenizer

    specials = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
    vocab = dict(word_tokenizer("t5").get_vocab())
    for token in specials:
        vocab.setdefault(token, len(vocab))
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(specials)
    template = ("{{ '<|im_start|>' * " + str(_CROP) + " }}{% for m in messages %}{% if m['role'] == 'user' %}"
                "{{ m['content'] }}{% endif %}{% endfor %}<|im_end|>")
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=2048, pad_token="<|endoftext|>",
                                   eos_token="<|im_end|>", unk_token="<unk>", chat_template=template)


def _build_tiny():
    from diffusers import (AutoencoderKLHunyuanVideo15, ClassifierFreeGuidance, FlowMatchEulerDiscreteScheduler,
                           HunyuanVideo15Pipeline, HunyuanVideo15Transformer3DModel)
    from transformers import ByT5Tokenizer, Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel, T5Config, T5EncoderModel

    tokenizer = _chat_tokenizer()
    text_encoder = Qwen2_5_VLTextModel(Qwen2_5_VLTextConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=2048, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 1e6}))
    byt5 = ByT5Tokenizer()
    text_encoder_2 = T5EncoderModel(T5Config(
        vocab_size=len(byt5), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4, relative_attention_num_buckets=8,
        dropout_rate=0.0, feed_forward_proj="gated-gelu", is_encoder_decoder=False))
    transformer = HunyuanVideo15Transformer3DModel(
        in_channels=2 * 4 + 1, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
        num_refiner_layers=1, mlp_ratio=2.0, text_embed_dim=16, text_embed_2_dim=32, image_embed_dim=8,
        rope_axes_dim=(2, 2, 4), target_size=64, task_type="t2v")
    vae = AutoencoderKLHunyuanVideo15(latent_channels=4, block_out_channels=(8, 8, 8), layers_per_block=1,
                                      spatial_compression_ratio=4, temporal_compression_ratio=4)
    return HunyuanVideo15Pipeline(text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer, vae=vae,
                                  scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0), text_encoder_2=text_encoder_2,
                                  tokenizer_2=byt5, guider=ClassifierFreeGuidance(guidance_scale=6.0))


TINY = {"hunyuan_video15": {"build": _build_tiny, "call": {"height": 32, "width": 32, "num_frames": 5}, "video": True}}
