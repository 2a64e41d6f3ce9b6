"""``attnedit edit-video`` and the ``edit-video`` batch task: object removal from a real video (VideoEditor).

Imports nothing heavy at module level (``attnedit --help`` must not wait for torch); the handler checks the output
path, reads the video and the masks, and only then loads the model, so bad input costs a second and writes nothing.

    attnedit edit-video remove clip.mp4 --masks masks/ --out clean.mp4
    attnedit edit-video remove clip.mp4 --track 10,20,60,80:200,20,250,80 --out clean.mp4   # first box : last box
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

OPERATIONS = ("remove",)
OUT_SUFFIXES = (".mp4", ".gif", ".webm", ".mov", ".mkv")
DEFAULT_MODEL = "shapes-t2v"
OPTIONS = ("steps", "dilation", "temporal_dilation", "hole_noise", "inversion_iterations", "radial", "seed")


def add_parser(sub: Any, model_options: Callable[..., None]) -> None:
    """Add the ``edit-video`` subcommand; ``model_options(parser, default=...)`` adds the CLI's model flags."""
    p = sub.add_parser("edit-video", help="remove an object from a real video (Wan, HunyuanVideo: key masking in "
                       "space and time)", epilog="example: attnedit edit-video remove clip.mp4 --masks masks/ --out clean.mp4")
    p.add_argument("operation", choices=OPERATIONS)
    p.add_argument("video", help="MP4/GIF/... file or a folder of frames")
    p.add_argument("--masks", help="mask video or folder of masks, one per frame (white = remove)")
    p.add_argument("--box", help="x0,y0,x1,y1: the same box in every frame")
    p.add_argument("--track", help="x0,y0,x1,y1:x0,y0,x1,y1: a box on the first frame and one on the last, moving linearly")
    p.add_argument("--out", default="clean.mp4", help=f"output video ({', '.join(OUT_SUFFIXES)})")
    p.add_argument("--steps", type=int, help="sampling steps (default 30)")
    p.add_argument("--dilation", type=int, help="grow each frame's mask by this many px (default: 1/48 of the long side)")
    p.add_argument("--temporal-dilation", type=int, help="grow the key mask by this many latent frames each way (default 1)")
    p.add_argument("--hole-noise", type=float, help="share of fresh noise in the hole's starting latent, 0..1 (default 1)")
    p.add_argument("--inversion-iterations", type=int, help="fixed-point refinements per inversion step (default 0)")
    p.add_argument("--radial", action="store_true", help="radial sparse attention (the family's preset)")
    p.add_argument("--seed", type=int, default=0, help="seed of the hole noise")
    model_options(p, default=DEFAULT_MODEL)
    p.set_defaults(run=run)


def _box(text: str, name: str) -> tuple[int, int, int, int]:
    try:
        box = tuple(int(v) for v in text.split(","))
    except ValueError:
        box = ()
    if len(box) != 4:
        raise ValueError(f"{name}={text!r} must be x0,y0,x1,y1 integer pixels")
    return box  # type: ignore[return-value]


def masks_argument(masks: Any = None, box: Any = None, track: Any = None) -> Any:
    """Exactly one of masks (path or per-frame list), box (one for every frame) or track (first and last box)."""
    given = [name for name, value in (("masks", masks), ("box", box), ("track", track)) if value is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one of --masks, --box, --track (got {', '.join(given) or 'none'})")
    if box is not None:
        return _box(box, "--box") if isinstance(box, str) else tuple(box)
    if track is not None:
        if isinstance(track, str):
            parts = track.split(":")
            if len(parts) != 2:
                raise ValueError(f"--track={track!r} must be FIRST_BOX:LAST_BOX, each x0,y0,x1,y1")
            track = [_box(parts[0], "--track"), _box(parts[1], "--track")]
        if len(track) != 2:
            raise ValueError(f"track={track!r} must be [first box, last box]")
        return ("track", tuple(track[0]), tuple(track[1]))
    return masks


def _config(params: dict[str, Any], pipe: Any) -> Any:
    from attnedit.pipelines.video_edit import VideoEditConfig

    kinds = {"steps": ("num_steps", int), "dilation": ("dilation", int), "temporal_dilation": ("temporal_dilation", int),
             "hole_noise": ("hole_noise", float), "inversion_iterations": ("inversion_iterations", int),
             "radial": ("radial", bool), "seed": ("seed", int)}
    options = {}
    for key, (field, cast) in kinds.items():
        if params.get(key) is not None:
            value = params[key]
            if cast is not bool and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ValueError(f"{key}={value!r} must be a number")
            options[field] = cast(value)
    if options.get("radial") is False:
        options["radial"] = None
    return VideoEditConfig(**options)


def remove(pipe: Any, params: dict[str, Any]) -> Any:
    """Run a removal job (``video``, ``masks`` | ``box`` | ``track``, options) -> :class:`Video`."""
    from attnedit.pipelines.video_edit import VideoEditor
    from attnedit.pipelines.video_io import linear_track, load_masks, load_video

    unknown = sorted(set(params) - {"video", "masks", "box", "track", "operation", "fps", *OPTIONS})
    if unknown:
        raise ValueError(f"edit-video: unknown parameter(s) {unknown}")
    if params.get("operation", "remove") not in OPERATIONS:
        raise ValueError(f"operation={params.get('operation')!r}; valid: {list(OPERATIONS)}")
    if "video" not in params:
        raise ValueError("edit-video needs video= (a video file, GIF or folder of frames)")
    frames, fps = load_video(params["video"])
    masks = masks_argument(params.get("masks"), params.get("box"), params.get("track"))
    if isinstance(masks, tuple) and masks[:1] == ("track",):
        masks = linear_track(masks[1], masks[2], frames.shape[0])
    masks = load_masks(masks, frames.shape[0], frames.shape[1:3])
    editor = VideoEditor(pipe, _config(params, pipe))
    video = editor.remove(frames, masks.numpy())
    video.fps = fps  # the source's (the editor was given its frames as an array)
    return video


def edit_video_task(pipe: Any, params: dict[str, Any]) -> list:
    """Batch task ``edit-video``: the edited frames as PIL images; ``params["fps"]`` is set to the source's
    (unless the job gives one) for the MP4 writer."""
    from PIL import Image

    job = {k: v for k, v in params.items() if k in {"video", "masks", "box", "track", "operation", *OPTIONS}}
    video = remove(pipe, job)
    params.setdefault("fps", video.fps)
    return [Image.fromarray(frame) for frame in video.frames]


def run(args: argparse.Namespace) -> int:
    """The ``edit-video`` command: checks everything it can before loading the model; writes only the result."""
    out = Path(args.out)
    if out.suffix.lower() not in OUT_SUFFIXES:
        raise ValueError(f"--out={args.out!r} must end in {' or '.join(OUT_SUFFIXES)}")
    if out.is_dir():
        raise ValueError(f"--out={args.out!r} is a folder; give a file name")
    model = args.model or DEFAULT_MODEL
    if model in ("shapes-t2i", "shapes-dit") or (model.startswith("tiny:") and model[5:] not in ("wan", "wan22", "hunyuan_video")):
        raise ValueError(f"--model={model!r} is an image model; edit-video needs a Wan or HunyuanVideo model")
    from attnedit.pipelines.video_io import linear_track, load_masks, load_video

    frames, fps = load_video(args.video)
    masks = masks_argument(args.masks, args.box, args.track)
    if isinstance(masks, tuple) and masks[:1] == ("track",):
        masks = linear_track(masks[1], masks[2], frames.shape[0])
    masks = load_masks(masks, frames.shape[0], frames.shape[1:3])
    params = {k: getattr(args, k) for k in OPTIONS if getattr(args, k, None) not in (None, False)}
    from attnedit.surfaces.loading import load_pipeline

    options = {k: getattr(args, k) for k in ("memory", "quantize", "lora", "variant") if getattr(args, k, None)}
    pipe = load_pipeline(model, args.device, args.dtype, **options)
    pipe.set_progress_bar_config(disable=True)
    video = remove(pipe, {"video": frames, "masks": masks.numpy(), **params})
    video.fps = fps  # read from the file above; the frames went on as an array
    print(video.save(out))
    return 0
