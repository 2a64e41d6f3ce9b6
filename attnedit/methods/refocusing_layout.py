"""Refocusing layouts: a prompt, its grounded phrases and their boxes, and where each phrase sits among the text keys.

Used by :mod:`attnedit.methods.refocusing` (which re-exports every name here). A layout is data (JSON), never a
network call; every malformed layout is one ``ValueError`` that names the phrase (or region index) and the field.
"""

from __future__ import annotations

import json
import numbers
import os
from dataclasses import dataclass
from typing import Any

Box = tuple[float, float, float, float]
MAX_BOXES = 30  # every family: GLIGEN's limit, and more boxes than cells of a 16x16 map make CAR meaningless
CLIP_TOKENS = 77


def _is_number(v: Any) -> bool:
    """A real number: Python, NumPy or a 0-d tensor; not a bool or a string."""
    return not isinstance(v, (bool, str, bytes)) and (isinstance(v, numbers.Real) or getattr(v, "shape", None) == ())


def _parse_boxes(phrase: str, boxes: Any) -> tuple[Box, ...]:
    """``boxes`` (one box or a sequence of boxes) -> tuple of float 4-tuples, each checked."""
    if boxes is None or isinstance(boxes, (str, bytes, dict)) or not hasattr(boxes, "__iter__"):
        raise ValueError(f"phrase {phrase!r} has no box (boxes={boxes!r}); give a list of (x0, y0, x1, y1) in [0, 1]")
    boxes = list(boxes)
    if boxes and all(_is_number(v) for v in boxes):
        boxes = [boxes]  # a single box
    parsed = []
    for b in boxes:
        numeric = hasattr(b, "__iter__") and not isinstance(b, (str, bytes, dict)) and all(_is_number(v) for v in b)
        box = tuple(float(v) for v in b) if numeric else None
        if box is None or len(box) != 4 or not all(0.0 <= v <= 1.0 for v in box):
            shown = box if box is not None else b
            raise ValueError(f"box {shown} of {phrase!r} must be 4 numbers in [0, 1] (normalized x0, y0, x1, y1)")
        if box[2] <= box[0] or box[3] <= box[1]:
            raise ValueError(f"box {box} of {phrase!r} must have x1 > x0 and y1 > y0")
        parsed.append(box)
    if not parsed:
        raise ValueError(f"phrase {phrase!r} has no box (boxes=[]); give at least one (x0, y0, x1, y1) in [0, 1]")
    if len(set(parsed)) != len(parsed):
        raise ValueError(f"phrase {phrase!r} lists the same box twice: {tuple(parsed)}")
    return tuple(parsed)


@dataclass(frozen=True)
class Region:
    """One phrase of the prompt and the boxes (normalized x0, y0, x1, y1) it must fill."""

    phrase: str
    boxes: tuple[Box, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.phrase, str) or not self.phrase.strip():
            raise ValueError(f"phrase={self.phrase!r} must be a non-empty string")
        object.__setattr__(self, "boxes", _parse_boxes(self.phrase, self.boxes))


def _region(item: Any, index: int) -> Region:
    """A Region from a Region, a (phrase, boxes) pair or a {"phrase", "boxes"} dict (``index``: for messages)."""
    if isinstance(item, Region):
        return item
    if isinstance(item, dict):
        if not isinstance(item.get("phrase"), str):
            raise ValueError(f"regions[{index}]={item!r} needs a 'phrase' (a non-empty string)")  # noqa: TRY004
        if "boxes" not in item:
            extra = sorted(set(item) - {"phrase", "boxes"})
            raise ValueError(f"regions[{index}] (phrase {item['phrase']!r}) has no 'boxes'"
                             + (f" (unknown keys {extra})" if extra else "") + "; give [[x0, y0, x1, y1], ...] in [0, 1]")
        return Region(item["phrase"], item["boxes"])
    if isinstance(item, (str, bytes)) or not hasattr(item, "__len__"):
        raise ValueError(f"regions[{index}]={item!r} must be (phrase, boxes)")
    if len(item) == 1 and isinstance(item[0], str):
        raise ValueError(f"phrase {item[0]!r} has no box (regions[{index}] has no boxes); give (phrase, boxes)")
    if len(item) != 2:
        raise ValueError(f"regions[{index}]={item!r} must be (phrase, boxes)")
    return Region(item[0], item[1])


@dataclass(frozen=True)
class Layout:
    """A prompt and its grounded phrases. ``Layout.from_json(path_or_text)`` reads
    ``{"prompt": "...", "regions": [{"phrase": "a cat", "boxes": [[0.1, 0.2, 0.5, 0.9]]}, ...]}``."""

    prompt: str
    regions: tuple[Region, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ValueError(f"prompt={self.prompt!r} must be a non-empty string")
        if isinstance(self.regions, (str, bytes, dict)) or not hasattr(self.regions, "__iter__"):
            raise ValueError(f"regions={self.regions!r} must be a list of (phrase, boxes)")
        regions = tuple(_region(r, i) for i, r in enumerate(self.regions))
        if not regions:
            raise ValueError("layout has no region; give at least one (phrase, boxes)")
        total = sum(len(r.boxes) for r in regions)
        if total > MAX_BOXES:
            raise ValueError(f"layout has {total} boxes; at most MAX_BOXES={MAX_BOXES} are supported")
        seen: dict[Box, str] = {}
        for r in regions:
            for b in r.boxes:
                if b in seen and seen[b] != r.phrase:
                    raise ValueError(f"phrases {seen[b]!r} and {r.phrase!r} have the identical box {b}; "
                                     "their losses would contradict each other")
                seen[b] = r.phrase
        object.__setattr__(self, "regions", regions)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Layout:
        """``{"prompt": str, "regions": [{"phrase": str, "boxes": [[x0, y0, x1, y1], ...]}, ...]}`` -> Layout."""
        if not isinstance(data, dict) or "prompt" not in data or "regions" not in data:
            raise ValueError(f"layout must be a dict with 'prompt' and 'regions', got {str(data)[:80]!r}")
        regions = data["regions"]
        if not isinstance(regions, list):
            raise ValueError(f"layout 'regions'={str(regions)[:80]!r} must be a list of {{'phrase', 'boxes'}} dicts")  # noqa: TRY004
        for i, r in enumerate(regions):
            if not isinstance(r, dict):
                raise ValueError(f"regions[{i}]={str(r)[:80]!r} must be a dict with 'phrase' and 'boxes'")  # noqa: TRY004
        return cls(data["prompt"], tuple(_region(r, i) for i, r in enumerate(regions)))

    @classmethod
    def from_json(cls, source: str | os.PathLike) -> Layout:
        """Parse JSON text, or read it from a file path."""
        text = str(source)
        if not text.lstrip().startswith("{"):
            try:
                with open(source, encoding="utf-8") as f:
                    text = f.read()
            except OSError as e:
                raise ValueError(f"layout={str(source)[:200]!r} is neither JSON text nor a readable file ({e})") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"layout={str(source)[:200]!r} is not valid JSON: {e}") from None
        return cls.from_dict(data)

    def to_json(self) -> str:
        regions = [{"phrase": r.phrase, "boxes": [list(b) for b in r.boxes]} for r in self.regions]
        return json.dumps({"prompt": self.prompt, "regions": regions})

    def with_phrases_in_prompt(self) -> Layout:
        """A copy whose prompt ends with every phrase it does not already contain (", phrase")."""
        missing = [r.phrase for r in self.regions if r.phrase.lower() not in self.prompt.lower()]
        return Layout(", ".join([self.prompt, *missing]), self.regions) if missing else self


# ------------------------------------------------------------------------------------------------- tokens
def phrase_positions(tokenizer: Any, prompt: str, phrase: str, max_length: int | None = None) -> list[int]:
    """Positions of ``phrase``'s tokens in the tokenized ``prompt`` (specials included, as the encoder sees it)."""
    limit = max_length or tokenizer.model_max_length
    ids = tokenizer(prompt, truncation=True, max_length=limit).input_ids
    sub = tokenizer(phrase, add_special_tokens=False).input_ids
    for start in range(len(ids) - len(sub) + 1):
        if sub and ids[start:start + len(sub)] == sub:
            return list(range(start, start + len(sub)))
    raise ValueError(f"phrase {phrase!r} is not in the prompt {prompt!r} (tokens {sub} not found in "
                     f"{ids[:limit]}); fix the phrase or pass append_missing=True")


def content_positions(tokenizer: Any, prompt: str, max_length: int | None = None) -> list[int]:
    """Positions of the prompt's own tokens (no BOS/EOS/padding)."""
    limit = max_length or tokenizer.model_max_length
    ids = tokenizer(prompt, truncation=True, max_length=limit).input_ids
    specials = set(tokenizer.all_special_ids)
    return [i for i, t in enumerate(ids) if t not in specials]


@dataclass(frozen=True)
class TokenLayout:
    """Text-key positions the losses read: the prompt's content tokens and each phrase's tokens among them."""

    content: tuple[int, ...]  # text-key positions, softmax-normalized together
    phrases: tuple[tuple[int, ...], ...]  # per region: indices into ``content``


def token_layout(pipe: Any, layout: Layout, max_sequence_length: int = 256) -> TokenLayout:
    """Phrase positions among the denoiser's text keys (SD/SDXL: CLIP tokenizer 1; SD3: CLIP then 77 (the CLIP length) + T5;
    FLUX: T5, ``tokenizer_2``)."""
    transformer = getattr(pipe, "transformer", None)
    hooks = _image_hooks(transformer) if transformer is not None else None
    if hooks is not None and hooks.text_tokenizers is not None:
        groups = hooks.text_tokenizers(pipe, max_sequence_length)
    else:
        groups = [(pipe.tokenizer, 0, None)]
        if transformer is not None and getattr(pipe, "tokenizer_3", None) is not None \
                and getattr(pipe, "text_encoder_3", None) is not None:
            # T5 keys follow the CLIP tokens: 77 for real SD3, the CLIP tokenizer's length in general (shapes-dit: 24)
            groups.append((pipe.tokenizer_3, getattr(pipe, "tokenizer_max_length", CLIP_TOKENS), max_sequence_length))
    content: list[int] = []
    phrases: list[list[int]] = [[] for _ in layout.regions]
    for tokenizer, offset, limit in groups:
        content += [offset + p for p in content_positions(tokenizer, layout.prompt, limit)]
        for i, region in enumerate(layout.regions):
            phrases[i] += [offset + p for p in phrase_positions(tokenizer, layout.prompt, region.phrase, limit)]
    index = {p: i for i, p in enumerate(content)}
    return TokenLayout(tuple(content), tuple(tuple(index[p] for p in ph) for ph in phrases))


def _image_hooks(model: Any) -> Any:
    """The denoiser family's image-pipeline hooks (None for a model no family declares, e.g. built-in ones)."""
    from attnedit.families import detect_family

    try:
        return detect_family(model).image_pipeline
    except ValueError:
        return None
