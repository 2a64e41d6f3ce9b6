"""Train the built-in shapes models (:mod:`attnedit.shapes.builtin`) from a seed, on CPU in well under an hour.

``python -m attnedit.shapes.training t2i`` trains ``shapes-t2i`` (AutoencoderKL first, then the UNet and the CLIP text
encoder jointly with an epsilon objective, min-SNR weighting and EMA); ``python -m attnedit.shapes.training t2v`` trains
``shapes-t2v`` (AutoencoderKLWan, then the Wan transformer and the UMT5 encoder with the flow-matching objective
Wan uses); ``python -m attnedit.shapes.training dit`` trains ``shapes-dit`` (the SD3 transformer and two embedding-only
CLIP encoders, flow matching, on ``shapes-t2i``'s VAE). Data comes from :mod:`attnedit.shapes.world`, rendered on the fly from the same seed, so a run is reproducible
(up to float summation order across thread counts). Checkpoints are written atomically every ``save_every``
steps, so an interrupted run still leaves a usable model.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import pathlib
import random
import shutil
import tempfile
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from attnedit.shapes import builtin, world

LogFn = Callable[[str], None]


# ------------------------------------------------------------------------------------------------- helpers
def _captions(scenes: list[world.Scene], rng: random.Random, drop: float = 0.1) -> list[str]:
    """A caption per scene, with size/background words sometimes left out and 10% empty (for CFG)."""
    out = []
    for s in scenes:
        if rng.random() < drop:
            out.append("")
        else:
            out.append(s.caption(with_size=rng.random() < 0.7, with_background=rng.random() < 0.7))
    return out


def _to_unit(images: np.ndarray) -> torch.Tensor:
    """uint8 ``(..., H, W, 3)`` to float in [-1, 1], channels first."""
    x = torch.from_numpy(images).float().div(127.5).sub(1)
    return x.movedim(-1, -3)


class _EMA:
    def __init__(self, modules: list[torch.nn.Module], decay: float) -> None:
        self.modules, self.decay = modules, decay
        self.shadow = [copy.deepcopy(m).requires_grad_(False) for m in modules]

    @torch.no_grad()
    def update(self, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        for module, shadow in zip(self.modules, self.shadow):
            for p, s in zip(module.parameters(), shadow.parameters()):
                s.lerp_(p, 1 - decay)


def _schedule(step: int, total: int, warmup: int = 100) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))


def _step(opt: torch.optim.Optimizer, ema: _EMA, params: list, loss: torch.Tensor, lr: float, step: int) -> None:
    """One optimizer step at learning rate ``lr``: gradients clipped to norm 1, then the EMA update."""
    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    ema.update(step)


def _save(pipe, out_dir: pathlib.Path) -> None:
    """fp16 safetensors, written to a temporary folder and renamed into place."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    half = copy.deepcopy(pipe).to(torch.float16)
    half.save_pretrained(tmp, safe_serialization=True)
    index_file = tmp / "model_index.json"  # components left out (SD3 without T5) must be listed as null to load
    index = json.loads(index_file.read_text())
    for name, component in pipe.components.items():
        index.setdefault(name, [None, None]) if component is None else None
    index_file.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    old = out_dir.with_name(out_dir.name + ".old")
    if out_dir.exists():
        os.rename(out_dir, old)
    os.rename(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def _flow_noising(x0: torch.Tensor, noise: torch.Tensor, shift: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(noisy latents, timesteps) of rectified flow: x_s = (1 - s) x0 + s noise, s logit-normal then shifted as the
    sampler shifts its sigmas; the velocity target is noise - x0."""
    u = torch.sigmoid(torch.randn(x0.shape[0]))
    sigma = shift * u / (1 + (shift - 1) * u)
    s = sigma.view(-1, *[1] * (x0.ndim - 1))
    return (1 - s) * x0 + s * noise, sigma * 1000


def _kl(dist) -> torch.Tensor:
    return 0.5 * (dist.mean.pow(2) + dist.var - 1 - dist.logvar).mean()


# --------------------------------------------------------------------------------------------- text-to-image
def _object_weight(x: torch.Tensor, boost: float = 9.0) -> torch.Tensor:
    """1 on the grey background, 1 + ``boost`` on coloured (object) pixels: objects cover ~10% of an image, and
    a VAE trained on plain L1 learns the background first and may drop small objects altogether."""
    spread = x.amax(dim=1, keepdim=True) - x.amin(dim=1, keepdim=True)  # channel spread; grey: 0
    return 1.0 + boost * (spread > 0.35).float()


def train_vae(vae, sample: Callable[[int], torch.Tensor], steps: int, lr: float, log: LogFn, crop: int,
              rng: random.Random) -> None:
    """Object-weighted reconstruction (L1 + L2) with a tiny KL on random ``crop`` crops (fully convolutional)."""
    opt = torch.optim.AdamW(vae.parameters(), lr, weight_decay=0.0)
    vae.train()
    for step in range(steps):
        x = sample(step)
        if crop and x.shape[-1] > crop:
            i, j = rng.randrange(0, x.shape[-2] - crop + 1), rng.randrange(0, x.shape[-1] - crop + 1)
            x = x[..., i:i + crop, j:j + crop]
        for group in opt.param_groups:
            group["lr"] = lr * _schedule(step, steps)
        dist = vae.encode(x).latent_dist
        rec = vae.decode(dist.sample()).sample
        weight = _object_weight(x)
        error = rec - x
        loss = (weight * (error.abs() + error.pow(2))).mean() / weight.mean() + 1e-6 * _kl(dist)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"vae step {step} loss {loss.item():.4f}")
    vae.eval()


def train_t2i(out_dir: pathlib.Path, seed: int = 0, vae_steps: int = 1200, unet_steps: int = 5000,
              batch: int = 16, dataset: int = 20000, lr: float = 6e-4, save_every: int = 500,
              log: LogFn = print) -> None:
    """Train ``shapes-t2i`` into ``out_dir``."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    parts = builtin.t2i_components()
    vae, unet, text_encoder, tokenizer, scheduler = (parts[k] for k in ("vae", "unet", "text_encoder", "tokenizer",
                                                                        "scheduler"))
    t0 = time.time()
    scenes = [world.sample_scene(rng) for _ in range(dataset)]
    images = _to_unit(np.stack([s.render(64) for s in scenes]))
    log(f"rendered {dataset} scenes in {time.time() - t0:.0f}s")

    def vae_batch(step: int) -> torch.Tensor:
        return images[torch.randint(0, dataset, (32,))]

    train_vae(vae, vae_batch, vae_steps, 1e-3, log, crop=32, rng=random.Random(seed + 1))
    with torch.no_grad():
        means = torch.cat([vae.encode(images[i:i + 256]).latent_dist.mean for i in range(0, dataset, 256)])
    scale = 1.0 / means.std().item()
    vae.register_to_config(scaling_factor=scale)
    latents = means * scale
    log(f"latents {tuple(latents.shape)}, scaling_factor {scale:.4f} ({time.time() - t0:.0f}s)")

    params = [*unet.parameters(), *text_encoder.parameters()]
    opt = torch.optim.AdamW(params, lr, weight_decay=0.01)
    ema = _EMA([unet, text_encoder], 0.999)
    alphas = scheduler.alphas_cumprod
    unet.train(), text_encoder.train()
    for step in range(unet_steps):
        idx = torch.randint(0, dataset, (batch,))
        ids = tokenizer(_captions([scenes[i] for i in idx], rng), padding="max_length",
                        max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
        x0, noise = latents[idx], torch.randn(batch, *latents.shape[1:])
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,))
        pred = unet(scheduler.add_noise(x0, noise, t), t, text_encoder(ids)[0]).sample
        snr = alphas[t] / (1 - alphas[t])
        weight = snr.clamp(max=5.0) / snr  # min-SNR-5 for epsilon prediction
        loss = (weight * (pred - noise).pow(2).mean((1, 2, 3))).mean()
        _step(opt, ema, params, loss, lr * _schedule(step, unet_steps), step)
        if step % 100 == 0:
            log(f"unet step {step} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
        if (step + 1) % save_every == 0 or step == unet_steps - 1:
            _save(builtin.t2i_pipeline({**parts, "unet": ema.shadow[0], "text_encoder": ema.shadow[1]}), out_dir)
            log(f"saved {out_dir} at step {step + 1}")


# ------------------------------------------------------------------------------------ text-to-image, MM-DiT
def sd3_text(encoders: list, tokenizers: list, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(token states (B, 24 + 24, 64), pooled (B, 64)) as StableDiffusion3Pipeline builds them: both CLIPs'
    penultimate states side by side (padded to the T5 width), then the T5 states; pooled = both CLIP projections."""
    def ids(tokenizer) -> torch.Tensor:
        return tokenizer(captions, padding="max_length", max_length=builtin.TEXT_LENGTH, truncation=True,
                         return_tensors="pt").input_ids

    outs = [encoder(ids(tokenizers[0]), output_hidden_states=True) for encoder in encoders[:2]]
    clip, t5 = torch.cat([o.hidden_states[-2] for o in outs], -1), encoders[2](ids(tokenizers[1]))[0]
    clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    return torch.cat([clip, t5], dim=-2), torch.cat([o[0] for o in outs], -1)


def train_dit(out_dir: pathlib.Path, seed: int = 0, dit_steps: int = 6000, batch: int = 16, dataset: int = 20000,
              lr: float = 1e-3, save_every: int = 500, log: LogFn = print) -> None:
    """Train ``shapes-dit`` into ``out_dir`` on ``shapes-t2i``'s VAE (flow matching, logit-normal sigmas, EMA)."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    parts = builtin.dit_components()
    vae, transformer, tokenizers = parts["vae"], parts["transformer"], [parts["tokenizer"], parts["tokenizer_3"]]
    encoders = [parts["text_encoder"], parts["text_encoder_2"], parts["text_encoder_3"]]
    t0 = time.time()
    scenes = [world.sample_scene(rng) for _ in range(dataset)]
    images = _to_unit(np.stack([s.render(64) for s in scenes]))
    with torch.no_grad():
        latents = torch.cat([vae.encode(images[i:i + 256]).latent_dist.mean for i in range(0, dataset, 256)])
    latents = latents * vae.config.scaling_factor
    log(f"rendered and encoded {dataset} scenes, latents {tuple(latents.shape)} ({time.time() - t0:.0f}s)")
    params = [*transformer.parameters(), *(p for e in encoders for p in e.parameters())]
    opt = torch.optim.AdamW(params, lr, weight_decay=0.01)
    ema = _EMA([transformer, *encoders], 0.999)
    shift = parts["scheduler"].config.shift
    for module in (transformer, *encoders):
        module.train()
    for step in range(dit_steps):
        idx = torch.randint(0, dataset, (batch,))
        text, pooled = sd3_text(encoders, tokenizers, _captions([scenes[i] for i in idx], rng))
        x0, noise = latents[idx], torch.randn(batch, *latents.shape[1:])
        noisy, timestep = _flow_noising(x0, noise, shift)
        pred = transformer(hidden_states=noisy, timestep=timestep, encoder_hidden_states=text,
                           pooled_projections=pooled).sample
        loss = F.mse_loss(pred, noise - x0)
        _step(opt, ema, params, loss, lr * _schedule(step, dit_steps), step)
        if step % 100 == 0:
            log(f"dit step {step} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
        if (step + 1) % save_every == 0 or step == dit_steps - 1:
            shadow = dict(zip(("transformer", "text_encoder", "text_encoder_2", "text_encoder_3"), ema.shadow))
            _save(builtin.dit_pipeline({**parts, **shadow}), out_dir)
            log(f"saved {out_dir} at step {step + 1}")


# --------------------------------------------------------------------------------------------- text-to-video
def _wan_text(text_encoder, tokenizer, captions: list[str], length: int) -> torch.Tensor:
    """UMT5 states as WanPipeline feeds them: tokens past each caption's end are zeroed."""
    tok = tokenizer(captions, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    states = text_encoder(tok.input_ids, tok.attention_mask).last_hidden_state
    return states * tok.attention_mask[..., None]


def train_t2v(out_dir: pathlib.Path, seed: int = 0, vae_steps: int = 1000, dit_steps: int = 6000, batch: int = 8,
              dataset: int = 4000, frames: int = 9, lr: float = 5e-4, save_every: int = 500,
              log: LogFn = print) -> None:
    """Train ``shapes-t2v`` into ``out_dir``."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    parts = builtin.t2v_components()
    vae, transformer, text_encoder, tokenizer = (parts[k] for k in ("vae", "transformer", "text_encoder",
                                                                    "tokenizer"))
    size = builtin.CALL_DEFAULTS["shapes-t2v"]["height"]
    t0 = time.time()
    clips = [world.sample_video_scene(rng, frames) for _ in range(dataset)]
    scenes = [c[0] for c in clips]
    videos = _to_unit(np.stack([world.render_video(c[1], size) for c in clips])).movedim(1, 2)  # B C T H W
    log(f"rendered {dataset} clips in {time.time() - t0:.0f}s")

    def vae_batch(step: int) -> torch.Tensor:
        # whole clips: AutoencoderKLWan encodes the first frame alone, then chunks of 4 frames whose causal caches
        # carry over from the chunk before; a clip of 3 frames never reaches the chunk path, one of 5 never
        # trains a chunk that follows a chunk (their frames decode as smudges)
        return videos[torch.randint(0, dataset, (6,))]

    train_vae(vae, vae_batch, vae_steps, 1e-3, log, crop=0, rng=random.Random(seed + 1))
    with torch.no_grad():
        means = torch.cat([vae.encode(videos[i:i + 32]).latent_dist.mean for i in range(0, dataset, 32)])
        error = (vae.decode(means[:16]).sample - videos[:16]).abs().mean(dim=(0, 1, 3, 4))
    log(f"vae L1 per frame on whole clips: {[round(float(e), 3) for e in error]}")
    mean, std = means.mean((0, 2, 3, 4)), means.std((0, 2, 3, 4))
    vae.register_to_config(latents_mean=mean.tolist(), latents_std=std.tolist())
    latents = (means - mean.view(1, -1, 1, 1, 1)) / std.view(1, -1, 1, 1, 1)
    log(f"latents {tuple(latents.shape)} ({time.time() - t0:.0f}s)")

    params = [*transformer.parameters(), *text_encoder.parameters()]
    opt = torch.optim.AdamW(params, lr, weight_decay=0.01)
    ema = _EMA([transformer, text_encoder], 0.999)
    shift = parts["scheduler"].config.shift
    transformer.train(), text_encoder.train()
    for step in range(dit_steps):
        idx = torch.randint(0, dataset, (batch,))
        text = _wan_text(text_encoder, tokenizer, _captions([scenes[i] for i in idx], rng), builtin.TEXT_LENGTH)
        x0, noise = latents[idx], torch.randn(batch, *latents.shape[1:])
        noisy, timestep = _flow_noising(x0, noise, shift)
        pred = transformer(hidden_states=noisy, timestep=timestep, encoder_hidden_states=text).sample
        loss = F.mse_loss(pred, noise - x0)
        _step(opt, ema, params, loss, lr * _schedule(step, dit_steps), step)
        if step % 100 == 0:
            log(f"dit step {step} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
        if (step + 1) % save_every == 0 or step == dit_steps - 1:
            _save(builtin.t2v_pipeline({**parts, "transformer": ema.shadow[0], "text_encoder": ema.shadow[1]}),
                  out_dir)
            log(f"saved {out_dir} at step {step + 1}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", choices=["t2i", "t2v", "dit"])
    parser.add_argument("--out", type=pathlib.Path, help="output folder (default: the package's models folder)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, help="denoiser training steps")
    parser.add_argument("--vae-steps", type=int)
    parser.add_argument("--threads", type=int, help="torch threads (default: all cores; the shipped models: 1)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    name = f"shapes-{args.model}"
    out = args.out or builtin.MODELS_DIR / name
    steps = "unet_steps" if args.model == "t2i" else "dit_steps"
    overrides = {k: v for k, v in {"vae_steps": args.vae_steps, steps: args.steps}.items() if v}
    if args.model == "t2i":
        train_t2i(out, args.seed, **overrides)
    elif args.model == "dit":
        overrides.pop("vae_steps", None)  # shapes-dit reuses shapes-t2i's VAE
        train_dit(out, args.seed, **overrides)
    else:
        train_t2v(out, args.seed, **overrides)


if __name__ == "__main__":
    main()
