"""Radial attention's released settings by name: plain data, importable without torch (the CLI checks
``--radial-preset`` before any model loads). Each entry names the authors' script it comes from; the fields are
:class:`attnedit.methods.radial.RadialAttention`'s."""

from __future__ import annotations

PRESETS: dict[str, dict] = {
    # wan_t2v_inference.sh: Wan 2.1 T2V 14B, 768x1280x69, 50 steps
    "wan": {"decay": 0.2, "sink": True, "dense_steps": 12, "dense_layers": 1},
    # hunyuan_t2v_inference.sh: HunyuanVideo, 768x1280x117, 50 steps
    "hunyuan_video": {"decay": 0.95, "sink": False, "dense_steps": 12, "dense_layers": 0},
    # HunyuanVideo 1.5: the authors released no script for it (mit-han-lab/radial-attention has HunyuanVideo and
    # Wan only); these are HunyuanVideo's settings carried over unchanged, not tuned or measured on 1.5
    "hunyuan_video15": {"decay": 0.95, "sink": False, "dense_steps": 12, "dense_layers": 0},
    # wan_22_t2v_inference.sh: Wan 2.2 (T2V A14B, 768x1280x77, 40 steps; TI2V-5B runs the same processor):
    # blocks of 64, far-frame thinning still against the hard-coded 128
    "wan22": {"decay": 0.8, "block_size": 64, "thinning_width": 128, "sink": True, "dense_steps": 11, "dense_layers": 1},
    # wan_t2v_inference.sh, 2x-length setting with the authors' long-video LoRA: 720x1280x161, 50 steps, gamma
    # left at the script's default 1
    "wan_2x": {"decay": 1.0, "sink": True, "dense_steps": 2, "dense_layers": 2},
    # hunyuan_t2v_inference.sh, 4x-length setting with the authors' LoRA: 720x1280x509, 50 steps, gamma 1
    "hunyuan_video_4x": {"decay": 1.0, "sink": False, "dense_steps": 2, "dense_layers": 2},
    # wan_t2v_inference_fusionx.sh: Wan 2.1 14B + FusionX LoRA, 768x1280x69, 8 steps
    "wan_fusionx": {"decay": 0.2, "sink": True, "dense_steps": 2, "dense_layers": 1},
    # wan_t2v_inference_lightx2v.sh: Wan 2.1 14B + Lightx2v step-distilled LoRA, 768x1280x69, 4 steps
    "wan_lightx2v": {"decay": 0.2, "sink": True, "dense_steps": 1, "dense_layers": 1},
}
ALIASES = {"wan_lora": "wan_fusionx", "wan_few_step": "wan_lightx2v"}  # earlier names of the same settings
