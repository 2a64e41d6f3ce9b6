"""HeadHunter: greedy search for the attention heads whose perturbation guides best.

Implements the HeadHunter procedure of Ahn et al. (2025), "Fine-Grained Perturbation Guidance via Attention Head
Selection" (arXiv:2506.10978). Rounds r = 1..R: for every candidate head h not yet selected, generate M
(prompt, seed) images with SoftPAG on S ∪ {h}, score them with an objective, and add the top-k heads to S.

What this implementation adds to the paper's loop: generations are cached on disk by (head set, prompt, seed,
generation settings), so nothing is generated twice (across rounds or runs); the search state is saved after
every scored candidate and a rerun resumes from it; the result is a ranking JSON that
:func:`attnedit.methods.head_guidance.perturbed_guidance` loads directly (``heads="ranking.json"``).

Objectives map an image batch ``(M, 3, H, W)`` in [0, 1] to scores ``(M,)`` (higher is better): any function,
:class:`ClipScore` (transformers' ``CLIPModel``), :class:`AestheticScore` (a linear head on CLIP image embeddings,
the LAION-aesthetic recipe) or :func:`colorfulness` (a hand-made image statistic, no model); on the shapes world,
:class:`attnedit.shapes.structure.StructureScore` (``--objective structure``).
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from attnedit.core.install import install
from attnedit.methods.head_guidance import format_heads, perturbed_guidance, resolve_heads

__all__ = ["AestheticScore", "ClipScore", "HeadHunter", "colorfulness", "headhunter"]

Objective = Callable[..., torch.Tensor]
Head = tuple[int, int]
_CLIP_MEAN, _CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


# ---------------------------------------------------------------------------------------------- objectives
def colorfulness(images: torch.Tensor) -> torch.Tensor:
    """Hasler & Süsstrunk (2003) colorfulness of ``(M, 3, H, W)`` images in [0, 1] -> ``(M,)``: a model-free
    aesthetic-style statistic (sigma_rgyb + 0.3 mu_rgyb of the opponent channels rg = R - G, yb = (R + G) / 2 - B).
    """
    r, g, b = images.float().unbind(dim=-3)
    rg, yb = (r - g).flatten(1), (0.5 * (r + g) - b).flatten(1)
    sigma = (rg.var(dim=1, unbiased=False) + yb.var(dim=1, unbiased=False)).sqrt()
    mu = (rg.mean(dim=1) ** 2 + yb.mean(dim=1) ** 2).sqrt()
    return sigma + 0.3 * mu


def _clip_pixels(images: torch.Tensor, size: int) -> torch.Tensor:
    """``(M, 3, H, W)`` in [0, 1] (videos ``(M, F, 3, H, W)``: middle frame) -> CLIP-normalized ``(M, 3, size, size)``."""
    if images.ndim == 5:
        images = images[:, images.shape[1] // 2]
    images = F.interpolate(images.float(), size=(size, size), mode="bicubic", align_corners=False)
    mean, std = torch.tensor(_CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(_CLIP_STD).view(1, 3, 1, 1)
    return (images.clamp(0, 1) - mean.to(images)) / std.to(images)


def _features(out: Any) -> torch.Tensor:
    return out if torch.is_tensor(out) else out.pooler_output  # transformers 5 returns an output object


class ClipScore:
    """CLIP score 100 · cos(image, prompt) with transformers' ``CLIPModel`` (a local path or a model object).

    >>> objective = ClipScore("/models/clip-vit-large-patch14")   # doctest: +SKIP
    """

    needs_prompts = True

    def __init__(self, model: Any, tokenizer: Any = None) -> None:
        from transformers import CLIPModel, CLIPTokenizer

        if isinstance(model, (str, os.PathLike)):
            tokenizer = tokenizer or CLIPTokenizer.from_pretrained(model, local_files_only=True)
            model = CLIPModel.from_pretrained(model, local_files_only=True)
        if tokenizer is None:
            raise ValueError("tokenizer=None: ClipScore needs the CLIP tokenizer when given a model object")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.__name__ = f"ClipScore({type(model).__name__})"

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        pixels = _clip_pixels(images, self.model.config.vision_config.image_size).to(device)
        tokens = self.tokenizer(list(prompts), padding=True, truncation=True, return_tensors="pt").to(device)
        image = F.normalize(_features(self.model.get_image_features(pixel_values=pixels)), dim=-1)
        text = F.normalize(_features(self.model.get_text_features(**tokens)), dim=-1)
        return 100.0 * (image * text).sum(-1).cpu()


class AestheticScore:
    """Aesthetic-style score: ``head`` (e.g. ``nn.Linear(d, 1)``, the LAION predictor recipe) applied to the
    L2-normalized CLIP image embedding; ``head`` may be a module or the path of its saved state dict."""

    needs_prompts = False

    def __init__(self, clip_model: Any, head: torch.nn.Module | str | os.PathLike) -> None:
        from transformers import CLIPModel

        if isinstance(clip_model, (str, os.PathLike)):
            clip_model = CLIPModel.from_pretrained(clip_model, local_files_only=True)
        if not isinstance(head, torch.nn.Module):
            state = torch.load(head, map_location="cpu", weights_only=True)
            head = torch.nn.Linear(state["weight"].shape[1], 1)
            head.load_state_dict(state)
        self.model, self.head = clip_model.eval(), head.eval()
        self.__name__ = f"AestheticScore({type(head).__name__})"

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        pixels = _clip_pixels(images, self.model.config.vision_config.image_size)
        embedding = F.normalize(_features(self.model.get_image_features(pixel_values=pixels)), dim=-1)
        return self.head(embedding).reshape(len(images)).cpu()


def _score(objective: Objective, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Call ``objective`` and check it returns one finite score per image."""
    scores = objective(images, prompts) if getattr(objective, "needs_prompts", False) else objective(images)
    if not torch.is_tensor(scores):
        scores = torch.as_tensor(scores)
    if scores.shape != (len(images),):
        raise ValueError(
            f"objective {_name(objective)} returned scores of shape {tuple(scores.shape)} for {len(images)} images; "
            f"expected ({len(images)},): one score per image"
        )
    if not torch.isfinite(scores).all():
        raise ValueError(f"objective {_name(objective)} returned non-finite scores {scores.tolist()}")
    return scores.float()


def _name(objective: Objective) -> str:
    return getattr(objective, "__name__", type(objective).__name__)


# ---------------------------------------------------------------------------------------------------- search
def _layer_filter(layers: Any) -> set[int] | None:
    """``layers`` as ints / ranges / ``"0-3,7"`` -> a set of layer indices (None: every layer)."""
    if layers is None:
        return None
    if isinstance(layers, str):
        found: set[int] = set()
        for part in filter(None, layers.replace(" ", "").split(",")):
            lo, _, hi = part.partition("-")
            if not lo.isdigit() or (hi and not hi.isdigit()):
                raise ValueError(f"layers={layers!r}: {part!r} is not a layer or a range like '3-7'")
            found.update(range(int(lo), int(hi or lo) + 1))
        return found
    found = set()
    for item in layers:
        found.update(item if isinstance(item, range) else {int(item)})
    return found


def _atomic_write(path: pathlib.Path, write: Callable[[pathlib.Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, path)


class HeadHunter:
    """Greedy head search (see module docstring); ``run()`` returns the ranking and writes it to ``ranking_path``.

    ``prompts`` x ``seeds`` are the M (prompt, seed) pairs. Candidates are every (layer, head) of the family's
    perturbed attention kind, restricted to ``layers`` (e.g. ``"4-12"``) and/or an explicit ``candidates`` head
    set. Generation uses ``perturbed_guidance(scale, strength)`` plus ``call_kwargs`` for the pipeline (the paper
    searches with u = 1, no CFG: pass ``guidance_scale=1.0`` or ``0.0`` as the pipeline spells it).
    ``workdir`` holds ``cache/`` (generations), ``state.json`` (resume) and, by default, ``ranking.json``.
    """

    def __init__(
        self, pipe: Any, objective: Objective, prompts: Sequence[str], seeds: Sequence[int] = (0,), *,
        rounds: int = 1, top_k: int = 1, layers: Any = None, candidates: Any = None, strength: float = 1.0,
        scale: float = 3.0, call_kwargs: dict | None = None, workdir: str | os.PathLike = "headhunter",
        ranking_path: str | os.PathLike | None = None, progress: bool = True,
    ) -> None:
        if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompts={prompts!r} must be a non-empty list of strings")
        if not seeds or not all(isinstance(s, int) for s in seeds):
            raise ValueError(f"seeds={seeds!r} must be a non-empty list of ints")
        for name, value in (("rounds", rounds), ("top_k", top_k)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1")
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength={strength!r} must be in [0, 1]")
        if scale < 0:
            raise ValueError(f"scale={scale!r} must be >= 0 (the PAG guidance weight)")
        if not callable(objective):
            raise ValueError(f"objective={objective!r} must be callable: image batch (M, 3, H, W) -> scores (M,)")  # noqa: TRY004
        self.pipe, self.objective, self.rounds, self.top_k = pipe, objective, rounds, top_k
        self.pairs = [(p, s) for p in prompts for s in seeds]
        self.candidates = self._candidates(pipe, layers, candidates)
        self.generation = {"scale": scale, "strength": strength, "call_kwargs": call_kwargs or {}}
        self.settings = {**self.generation, "prompts": list(prompts), "seeds": list(seeds), "rounds": rounds,
                         "top_k": top_k, "candidates": format_heads(self.candidates), "objective": _name(objective)}
        self.workdir = pathlib.Path(workdir)
        self.ranking_path = pathlib.Path(ranking_path) if ranking_path else self.workdir / "ranking.json"
        self.progress, self.generations = progress, 0

    @staticmethod
    def _candidates(pipe: Any, layers: Any, candidates: Any) -> list[Head]:
        with install(pipe) as probe:
            sites, family, kind = probe.sites, probe.family.name, probe.family.perturbed_kind
        pool = resolve_heads(candidates if candidates is not None else {s.layer: None for s in sites if s.kind == kind}, sites, family)
        keep = _layer_filter(layers)
        heads = [(layer, h) for layer, hs in pool.items() if keep is None or layer in keep for h in hs]
        if not heads:
            raise ValueError(f"layers={layers!r} leaves no candidate head; {family} has {kind}-attention layers {sorted(pool)}")
        return heads

    # -- generation and scoring ----------------------------------------------------------------------------
    def generate(self, heads: Sequence[Head], prompt: str, seed: int) -> torch.Tensor:
        """The image for (head set, prompt, seed), from the disk cache when it was generated before."""
        spec = format_heads(list(heads))
        key = json.dumps({"heads": spec, "prompt": prompt, "seed": seed, **self.generation}, sort_keys=True, default=repr)
        path = self.workdir / "cache" / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.pt"
        if path.is_file():
            return torch.load(path, weights_only=True)
        with perturbed_guidance(self.pipe, spec, self.generation["scale"], self.generation["strength"]):
            out = self.pipe(prompt=prompt, generator=torch.Generator().manual_seed(seed), output_type="pt",
                            **self.generation["call_kwargs"])
        image = (out.images if hasattr(out, "images") else out.frames)[0].detach().float().cpu()
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(path, lambda tmp: torch.save(image, tmp))
        self.generations += 1
        return image

    def score(self, heads: Sequence[Head]) -> float:
        """Mean objective over the M (prompt, seed) pairs with SoftPAG on ``heads``."""
        images = torch.stack([self.generate(heads, p, s) for p, s in self.pairs])
        return float(_score(self.objective, images, [p for p, _ in self.pairs]).mean())

    # -- the greedy loop -----------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Run (or resume) the search; returns the ranking dict also written to ``ranking_path``."""
        from tqdm.auto import tqdm

        state = self._load_state()
        total = sum(max(len(self.candidates) - r * self.top_k, 0) for r in range(self.rounds))
        done = sum(len(r["scores"]) for r in state["rounds"]) + len(state["current"])
        with tqdm(total=total, initial=done, disable=not self.progress, desc="HeadHunter") as bar:
            while len(state["rounds"]) < self.rounds:
                selected = [tuple(h) for h in state["selected"]]
                remaining = [c for c in self.candidates if c not in selected]
                if not remaining:
                    break
                for head in remaining:
                    if _key(head) not in state["current"]:
                        state["current"][_key(head)] = self.score([*selected, head])
                        self._save_state(state)
                        bar.update(1)
                scores = state["current"]
                best = sorted(remaining, key=lambda h: (-scores[_key(h)], h))[: self.top_k]
                state["rounds"].append({"scores": scores, "added": [list(h) for h in best]})
                state["selected"] += [list(h) for h in best]
                state["current"] = {}
                self._save_state(state)
        ranking = {"heads": state["selected"], "spec": format_heads(state["selected"]) if state["selected"] else "",
                   "rounds": state["rounds"], "settings": self.settings, "family": self._family()}
        self.ranking_path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(self.ranking_path, lambda tmp: tmp.write_text(json.dumps(ranking, indent=1) + "\n"))
        return ranking

    def _family(self) -> str:
        with install(self.pipe) as probe:
            return probe.family.name

    @property
    def state_path(self) -> pathlib.Path:
        return self.workdir / "state.json"

    def _load_state(self) -> dict[str, Any]:
        if not self.state_path.is_file():
            return {"settings": self.settings, "selected": [], "rounds": [], "current": {}}
        state = json.loads(self.state_path.read_text())
        old = state.get("settings", {})
        changed = {k: (old.get(k), v) for k, v in json.loads(json.dumps(self.settings, default=repr)).items()
                   if k != "rounds" and old.get(k) != v}
        if changed:
            raise ValueError(f"{self.state_path} was written by a search with other settings {changed} (old, new); "
                             "use another workdir or delete the state file")
        state["settings"] = self.settings
        return state

    def _save_state(self, state: dict[str, Any]) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        text = json.dumps(state, indent=1, default=repr)
        _atomic_write(self.state_path, lambda tmp: tmp.write_text(text))


def _key(head: Sequence[int]) -> str:
    return f"{head[0]}:{head[1]}"


def headhunter(pipe: Any, objective: Objective, prompts: Sequence[str], seeds: Sequence[int] = (0,), **options: Any) -> dict[str, Any]:
    """Run a :class:`HeadHunter` search; returns the ranking (``ranking["heads"]`` feeds ``perturbed_guidance``).

    >>> ranking = headhunter(pipe, colorfulness, ["a cat", "a city"], seeds=[0, 1], rounds=2, top_k=3,
    ...                      layers="8-15", workdir="runs/hh")            # doctest: +SKIP
    >>> with perturbed_guidance(pipe, "runs/hh/ranking.json", scale=3.0, strength=0.5): ...  # doctest: +SKIP
    """
    return HeadHunter(pipe, objective, prompts, seeds, **options).run()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m attnedit.methods.headhunter --model tiny:sd3 --prompt "a cat" --layers 1 --workdir runs/hh``."""
    from attnedit.surfaces import params as rules
    from attnedit.surfaces.cli_base import Parser
    from attnedit.surfaces.loading import load_pipeline

    parser = Parser(prog="python -m attnedit.methods.headhunter", description="HeadHunter greedy head search.")
    parser.add_argument("--model", help="hub id, local folder or tiny:<family>")
    parser.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--objective", default="colorfulness",
                        help="'colorfulness', 'structure' (shapes world) or 'clip:<local CLIP folder>'")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--top-k", type=int, default=1)
    parser.add_argument("--layers", help="layer ranges of the candidate pool, e.g. '4-12,15'")
    parser.add_argument("--candidates", help="explicit candidate head set, e.g. 'L3,5:1'")
    parser.add_argument("--strength", type=float, default=1.0)
    parser.add_argument("--scale", type=float, default=3.0)
    parser.add_argument("--steps", type=int, default=20, help="denoising steps per generation")
    parser.add_argument("--workdir", default="headhunter")
    args = parser.parse_args(argv)
    if args.objective not in ("colorfulness", "structure") and not args.objective.startswith("clip:"):
        raise ValueError(f"--objective={args.objective!r}; valid: 'colorfulness', 'structure' or 'clip:<path>'")
    checks = {"--rounds": rules.integer(1, 100), "--top-k": rules.integer(1, 1000), "--steps": rules.STEPS,
              "--strength": rules.number(0, 1), "--scale": rules.number(-100, 100)}
    for name, rule in checks.items():  # one line naming the option, before any model loads
        rule(name, getattr(args, name[2:].replace("-", "_")))
    for seed in args.seeds:
        rules.SAMPLING["seed"]("--seeds", seed)
    rules.check_output("--workdir", args.workdir)
    model = args.model or rules.DEFAULT_MODEL
    rules.check_model_kind(model, "heads", rules.model_kind(model))
    if args.objective == "structure":  # the shapes world's structure score (attnedit.shapes.structure)
        from attnedit.shapes.structure import StructureScore

        objective: Objective = StructureScore()
    else:
        objective = colorfulness if args.objective == "colorfulness" else ClipScore(args.objective[len("clip:"):])
    pipe = load_pipeline(args.model)
    rules.check_model_kind(model, "heads", rules.pipeline_kind(pipe))
    ranking = headhunter(
        pipe, objective, args.prompt, args.seeds, rounds=args.rounds, top_k=args.top_k,
        layers=args.layers, candidates=args.candidates, strength=args.strength, scale=args.scale,
        call_kwargs={"num_inference_steps": args.steps}, workdir=args.workdir,
    )
    print(f"heads: {ranking['spec']}  (ranking: {pathlib.Path(args.workdir) / 'ranking.json'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
