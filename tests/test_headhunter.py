"""HeadHunter: the greedy search finds a planted head, resumes without regenerating, and its ranking loads."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from attnedit.methods.head_guidance import perturbed_guidance
from attnedit.methods.headhunter import AestheticScore, ClipScore, HeadHunter, colorfulness, headhunter
from attnedit.models import zoo

FAMILY = "sd3"  # 2 joint layers x 4 heads = 8 candidates
CALL = {"num_inference_steps": 1, "height": 32, "width": 32, "guidance_scale": 1.0, "max_sequence_length": 32}
PROMPTS, SEEDS, PLANTED = ["a red cat"], [0, 1], (1, 2)


def _image(pipe, heads, prompt, seed):
    with perturbed_guidance(pipe, heads, scale=3.0, strength=1.0):
        out = pipe(prompt=prompt, generator=torch.Generator().manual_seed(seed), output_type="pt", **CALL)
    return out.images[0]


class Planted:
    """Rewards images close to those generated with PLANTED alone; counts its calls."""

    def __init__(self, pipe, fail_after: int | None = None) -> None:
        self.targets = torch.stack([_image(pipe, [PLANTED], p, s) for p in PROMPTS for s in SEEDS])
        self.calls, self.fail_after = 0, fail_after

    def __call__(self, images):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt("simulated interruption")
        return -((images - self.targets) ** 2).flatten(1).mean(1)


def _hunter(pipe, objective, workdir, **options):
    return HeadHunter(pipe, objective, PROMPTS, SEEDS, call_kwargs=CALL, workdir=workdir, progress=False, **options)


def test_search_finds_planted_head_and_ranking_loads(tiny_pipe, tmp_path):
    pipe = tiny_pipe(FAMILY)
    hunter = _hunter(pipe, Planted(pipe), tmp_path, rounds=1, top_k=2)
    ranking = hunter.run()
    first = ranking["rounds"][0]["scores"]
    assert ranking["heads"][0] == list(PLANTED)
    assert first["1:2"] == pytest.approx(0.0, abs=1e-9) and all(v < -1e-6 for k, v in first.items() if k != "1:2")
    assert len(ranking["heads"]) == 2 and len(ranking["rounds"]) == 1 and len(first) == 8
    assert hunter.generations == 8 * len(SEEDS)
    saved = json.loads((tmp_path / "ranking.json").read_text())
    assert saved["heads"] == ranking["heads"] and saved["settings"]["top_k"] == 2
    heads = [tuple(h) for h in ranking["heads"]]
    for seed in SEEDS:  # guidance takes the ranking file directly
        torch.testing.assert_close(_image(pipe, str(tmp_path / "ranking.json"), "a red cat", seed), _image(pipe, heads, "a red cat", seed))


def test_resume_after_interruption_regenerates_nothing(tiny_pipe, tmp_path):
    pipe = tiny_pipe(FAMILY)
    objective = Planted(pipe, fail_after=3)
    first = _hunter(pipe, objective, tmp_path, rounds=1, layers="1")  # candidates: layer 1's 4 heads
    with pytest.raises(KeyboardInterrupt):
        first.run()
    assert first.generations == 4 * len(SEEDS)  # 3 scored + the 4th generated before the objective failed
    state = json.loads((tmp_path / "state.json").read_text())
    assert sorted(state["current"]) == ["1:0", "1:1", "1:2"]
    objective.fail_after, objective.calls = None, 0
    resumed = _hunter(pipe, objective, tmp_path, rounds=1, layers="1")
    assert resumed.run()["heads"] == [list(PLANTED)]
    assert resumed.generations == 0 and objective.calls == 1  # only the unscored head, from the cache
    extended = _hunter(pipe, objective, tmp_path, rounds=2, layers=[1])
    extended.run()
    assert extended.generations == 3 * len(SEEDS)  # round 2 only: {planted, h} for the 3 other heads
    with pytest.raises(ValueError, match="other settings"):
        _hunter(pipe, objective, tmp_path, rounds=2, layers="1", strength=0.5).run()


def test_bad_inputs(tiny_pipe, tmp_path):
    pipe = tiny_pipe(FAMILY)
    with pytest.raises(ValueError, match=r"returned scores of shape \(2, 1\) for 2 images; expected \(2,\)"):
        _hunter(pipe, lambda images: torch.zeros(len(images), 1), tmp_path, candidates="0:0").run()
    with pytest.raises(ValueError, match=r"layers='7' leaves no candidate head; sd3 has joint-attention layers \[0, 1\]"):
        _hunter(pipe, colorfulness, tmp_path, layers="7")
    with pytest.raises(ValueError, match=r"names head 5 of layer 0"):
        _hunter(pipe, colorfulness, tmp_path, candidates="0:5")
    with pytest.raises(ValueError, match=r"top_k=0 must be an integer >= 1"):
        _hunter(pipe, colorfulness, tmp_path, top_k=0)
    with pytest.raises(ValueError, match=r"prompts='a cat' must be a non-empty list"):
        HeadHunter(pipe, colorfulness, "a cat")
    with pytest.raises(ValueError, match=r"strength=2 must be in \[0, 1\]"):
        _hunter(pipe, colorfulness, tmp_path, strength=2)


def test_colorfulness_statistic():
    gray = torch.full((1, 3, 8, 8), 0.5)
    red = torch.zeros(1, 3, 8, 8)
    red[:, 0] = 1.0
    scores = colorfulness(torch.cat([gray, red]))
    assert scores[0] == 0 and scores[1] == pytest.approx(0.3 * (1.0 + 0.25) ** 0.5)


def _tiny_clip():
    from transformers import CLIPConfig, CLIPModel

    tokenizer = zoo.clip_tokenizer()
    layer = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    text = {**layer, "vocab_size": len(tokenizer), "max_position_embeddings": 77, "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    vision = {**layer, "image_size": 32, "patch_size": 8}
    torch.manual_seed(0)
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)), tokenizer


def test_clip_and_aesthetic_objectives(tiny_pipe, tmp_path):
    model, tokenizer = _tiny_clip()
    images = torch.rand(3, 3, 64, 64)
    clip = ClipScore(model, tokenizer)
    scores = clip(images, ["a red cat"] * 3)
    assert scores.shape == (3,) and scores.abs().max() <= 100
    assert not torch.allclose(scores, clip(images, ["a blue square"] * 3))
    head = torch.nn.Linear(8, 1)
    torch.save(head.state_dict(), tmp_path / "head.pt")
    aesthetic = AestheticScore(model, tmp_path / "head.pt")
    pixels = F.interpolate(images, size=(32, 32), mode="bicubic", align_corners=False).clamp(0, 1)
    mean, std = torch.tensor([0.48145466, 0.4578275, 0.40821073]), torch.tensor([0.26862954, 0.26130258, 0.27577711])
    embedding = model.get_image_features(pixel_values=(pixels - mean[:, None, None]) / std[:, None, None]).pooler_output
    with torch.no_grad():
        torch.testing.assert_close(aesthetic(images), head(F.normalize(embedding, dim=-1)).squeeze(-1))
    ranking = headhunter(tiny_pipe(FAMILY), clip, PROMPTS, [0], candidates="0:0,1:3", call_kwargs=CALL,
                         workdir=tmp_path / "clip", progress=False)
    assert ranking["heads"][0] in ([0, 0], [1, 3]) and set(ranking["rounds"][0]["scores"]) == {"0:0", "1:3"}


def test_command_line(tiny_pipe, tmp_path, capsys):
    from attnedit.methods.headhunter import main

    tiny_pipe(FAMILY)  # builds the tiny model into the session zoo the CLI loads from
    assert main(["--model", "tiny:sd3", "--prompt", "a cat", "--candidates", "L1H0,0:3", "--steps", "1",
                 "--workdir", str(tmp_path)]) == 0
    ranking = json.loads((tmp_path / "ranking.json").read_text())
    assert set(ranking["rounds"][0]["scores"]) == {"0:3", "1:0"} and ranking["settings"]["objective"] == "colorfulness"
    assert f"heads: {ranking['spec']}" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--objective='pickscore'"):
        main(["--prompt", "a cat", "--objective", "pickscore"])
