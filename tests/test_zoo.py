"""The tiny model zoo: save/load round trip, real diffusers classes, fast finite deterministic calls, tokenizers."""

from __future__ import annotations

import json
import threading

import diffusers
import numpy as np
import pytest
import torch

from attnedit.models import zoo

EXPECTED = {
    "sd15": ("StableDiffusionPipeline", "UNet2DConditionModel"),
    "sdxl": ("StableDiffusionXLPipeline", "UNet2DConditionModel"),
    "sd3": ("StableDiffusion3Pipeline", "SD3Transformer2DModel"),
    "flux": ("FluxPipeline", "FluxTransformer2DModel"),
    "wan": ("WanPipeline", "WanTransformer3DModel"),
    "hunyuan_video": ("HunyuanVideoPipeline", "HunyuanVideoTransformer3DModel"),
}


def generate(pipe, family: str, **overrides) -> np.ndarray:
    kwargs = {**zoo.call_kwargs(family), **overrides}
    return np.asarray(pipe(**kwargs, generator=torch.Generator("cpu").manual_seed(0))[0])


def expected_shape(family: str) -> tuple[int, ...]:
    kwargs = zoo.call_kwargs(family)
    frames = (kwargs["num_frames"],) if "num_frames" in kwargs else ()
    return (1, *frames, kwargs["height"], kwargs["width"], 3)


def test_families_covered():
    assert set(zoo.FAMILIES) == set(EXPECTED)


@pytest.mark.parametrize("family", zoo.FAMILIES)
def test_load_and_call(family, zoo_dir):
    pipe = zoo.load_tiny_pipeline(family)  # default cache dir comes from $ATTNEDIT_ZOO_DIR (set by conftest)
    [index] = zoo_dir.glob(f"*/{family}/model_index.json")
    pipe_class, denoiser_class = EXPECTED[family]
    assert json.loads(index.read_text())["_class_name"] == pipe_class
    assert type(pipe) is getattr(diffusers, pipe_class)
    assert type(zoo.denoiser(pipe)) is getattr(diffusers, denoiser_class)
    assert zoo.call_kwargs(family)["num_inference_steps"] == 2

    first, second = generate(pipe, family), generate(pipe, family)
    assert first.shape == expected_shape(family)
    assert np.isfinite(first).all()
    assert first.std() > 0
    np.testing.assert_array_equal(first, second)


@pytest.mark.parametrize("family", zoo.FAMILIES)
def test_built_equals_loaded(family):
    built, loaded = zoo.build_pipeline(family), zoo.load_tiny_pipeline(family)
    latents = {"output_type": "latent"}
    np.testing.assert_array_equal(generate(built, family, **latents), generate(loaded, family, **latents))


def test_seed_changes_weights():
    a, b = zoo.build_pipeline("sd15", seed=0), zoo.build_pipeline("sd15", seed=1)
    assert not torch.equal(a.unet.conv_in.weight, b.unet.conv_in.weight)
    assert torch.equal(a.unet.conv_in.weight, zoo.build_pipeline("sd15", seed=0).unet.conv_in.weight)


def test_save_tiny_pipeline(tmp_path):
    path = zoo.save_tiny_pipeline("wan", tmp_path)
    assert path == tmp_path / "wan"
    assert (path / "model_index.json").is_file()
    assert list((path / "transformer").glob("*.safetensors"))


def test_concurrent_cache_fill(tmp_path):
    pipes, errors = [], []

    def load():
        try:
            pipes.append(zoo.load_tiny_pipeline("sd15", cache_dir=tmp_path))
        except Exception as error:  # noqa: BLE001 - re-raised in the main thread below
            errors.append(error)

    threads = [threading.Thread(target=load) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(pipes) == 2
    [version_dir] = tmp_path.iterdir()
    assert [p.name for p in version_dir.iterdir()] == ["sd15"]  # no temporary directories left behind


def test_unknown_family():
    with pytest.raises(ValueError, match="unknown family"):
        zoo.build_pipeline("sd2")


def test_clip_tokenizer_subwords():
    tok = zoo.clip_tokenizer()
    assert tok.model_max_length == 77
    assert tok.bos_token == "<|startoftext|>" and tok.eos_token == "<|endoftext|>"
    for word in ["a", "red", "cat", "circle", "square", "blue"]:
        assert tok.tokenize(word) == [word + "</w>"]
    pieces = tok.tokenize("xylophonequasar")
    assert len(pieces) > 1 and pieces[-1].endswith("</w>")
    ids = tok("A red Cat!").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.unk_token_id not in ids[1:-1]


def test_word_tokenizers():
    t5 = zoo.word_tokenizer("t5")
    assert t5("a red cat").input_ids[-1] == t5.eos_token_id
    assert t5.unk_token_id in t5("a zyzzyva").input_ids
    llama = zoo.word_tokenizer("llama")
    template = zoo.HUNYUAN_PROMPT_TEMPLATE
    prefix = template["template"].split("{}")[0]
    assert len(llama(prefix).input_ids) == template["crop_start"]
    ids = llama(template["template"].format("a red cat")).input_ids
    assert llama.convert_ids_to_tokens(ids[template["crop_start"]:]) == ["a", "red", "cat", "<|eot_id|>"]
