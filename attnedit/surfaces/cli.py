"""The ``attnedit`` command line.

Start-up is light: this module imports no torch or diffusers, so ``--help`` and argument errors answer at once; the
libraries load when a command runs, after its arguments, inputs and output paths are checked. Every bad input is one
line naming the argument and the value, exit code 2; Ctrl-C is one line, exit code 130.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from attnedit.methods.refocusing_schedule import SCHEDULES
from attnedit.surfaces import video_edit_cli
from attnedit.surfaces.cli_base import Parser, flag, quiet_libraries, save_outputs
from attnedit.surfaces.interrupts import catching_interrupts
from attnedit.surfaces.params import DEFAULT_MODEL, DEFAULT_VIDEO_MODEL

EXAMPLES = """examples:
  attnedit generate "a red circle left of a blue square" --out out.png
  attnedit generate --layout layout.json --heads L1H0,L1H1 --out grounded.png
  attnedit edit remove photo.png --mask mask.png --out clean.png
  attnedit video "a ball rolling" --frames 9 --out ball.mp4 --save-frames
  attnedit edit-video remove clip.mp4 --masks masks/ --out clean.mp4   # or --track x0,y0,x1,y1:x0,y0,x1,y1
  torchrun --nproc_per_node 2 -m attnedit video "a ball rolling" --ulysses 2 --out ball.mp4   # 2 GPUs, 1 video
  attnedit heads --model tiny:sd3 --prompt "a cat" --layers 0-1 --workdir runs/hh
  attnedit batch jobs.jsonl --out results/  # resumable; under `accelerate launch` jobs are sharded
  attnedit sites                          # attention sites of the default offline tiny model
  attnedit sites --model stabilityai/stable-diffusion-3.5-medium   # configs only, no weights
  attnedit sites --model flux1-dev        # a shipped published config (offline): see attnedit.models.architectures
  attnedit app --port 7860                # the web app, on 127.0.0.1
"""


def _sites(args: argparse.Namespace) -> int:
    """List sites; a published architecture or hub model is built on the meta device from its config (no weights)."""
    from attnedit.surfaces.params import check_device

    check_device("--device", args.device)
    from attnedit.core.install import install
    from attnedit.shapes.builtin import BUILTIN_MODELS
    from attnedit.surfaces.loading import TINY_PREFIX, load_pipeline

    if args.model is None or args.model in BUILTIN_MODELS or args.model.startswith(TINY_PREFIX):
        target = load_pipeline(args.model, device="cpu" if args.model is None else args.device, dtype=args.dtype)
    else:
        from attnedit.models.architectures import meta_denoiser

        target = meta_denoiser(args.model)
    with install(target) as handle:
        print(f"family: {handle.family.name}   sites: {len(handle.sites)}")
        print(f"{'kind':6s} {'layer':>5s} {'heads':>5s} {'stream':6s}  module")
        for site in handle.sites:
            print(f"{site.kind:6s} {site.layer:5d} {site.heads:5d} {site.stream or '-':6s}  {site.name}")
    return 0


def _presets(args: argparse.Namespace) -> int:
    """List the shipped presets: head sets (name, family, heads, objective; ``--heads NAME``) and radial attention's
    released settings (``--radial-preset NAME``)."""
    from attnedit.methods.head_guidance import head_presets
    from attnedit.methods.radial_presets import PRESETS as RADIAL_PRESETS

    print(f"{'head preset':16s} {'family':6s} {'heads':14s} objective")
    for name, preset in head_presets().items():
        print(f"{name:16s} {preset.get('family', '-'):6s} {preset['spec']:14s} {preset.get('objective', '-')}")
    print(f"\n{'radial preset':16s} settings")
    for name, fields in RADIAL_PRESETS.items():
        print(f"{name:16s} " + ", ".join(f"{k}={v}" for k, v in fields.items()))
    return 0


def _run_task(args: argparse.Namespace, task_name: str, params: dict, default_model: str | None = None,
              ulysses: int | None = None) -> int:
    """Run one batch task from the command line and save its outputs with their parameters.

    ``ulysses=N``: one output computed by the N processes of a ``torchrun`` launch (context parallelism); the
    first process saves it.
    """
    from attnedit.surfaces import params as rules

    params = rules.check_params(task_name, {k: v for k, v in params.items() if v is not None}, flag)
    model = args.model or default_model or DEFAULT_MODEL
    out = rules.check_output("--out", args.out, (".mp4",) if task_name == "video" else (".png",))
    if task_name == "video":
        rules.FIELDS["video"]["fps"]("--fps", args.fps)
        if args.save_frames and out.with_suffix("").is_file():
            raise ValueError(f"--save-frames: {str(out.with_suffix(''))!r} (the frames folder) is a file")
        if ulysses is not None:
            rules.integer(1, 1024)("--ulysses", ulysses)
    rules.check_model_kind(model, task_name, rules.model_kind(model))
    rules.check_device("--device", args.device)

    from attnedit.surfaces.batch import TASKS
    from attnedit.surfaces.loading import load_pipeline, tiny_defaults

    params = {**tiny_defaults(model, task_name), **params}
    device, rank = args.device, 0
    if ulysses:
        import torch.distributed as dist

        from attnedit.core.parallel import init_distributed

        device, rank = init_distributed(device), dist.get_rank()
    pipe = load_pipeline(model, device, args.dtype, **_loading(args))
    _show_progress(pipe)
    rules.check_model_kind(model, task_name, rules.pipeline_kind(pipe))
    if ulysses:
        from attnedit.core.parallel import enable_ulysses

        enable_ulysses(pipe, ulysses)
        pipe.set_progress_bar_config(disable=rank != 0)
    images = TASKS[task_name](pipe, params)
    if rank != 0:
        return 0
    video = task_name == "video"
    save_outputs(out, images, {**params, "task": task_name, "model": model or "default"}, video,
                 video and args.save_frames, getattr(args, "fps", 16))
    print(out)
    return 0


def _generate(args: argparse.Namespace) -> int:
    return _run_task(args, "generate", {
        "prompt": args.prompt, "seed": args.seed, "steps": args.steps, "guidance_scale": args.guidance,
        "width": args.width, "height": args.height, "negative_prompt": args.negative, "layout": args.layout,
        "refocus_steps": args.refocus_steps, "schedule": args.schedule, "heads": args.heads,
        "pag_scale": args.pag_scale,
        "pag_strength": args.pag_strength,
    })


def _edit(args: argparse.Namespace) -> int:
    mask = args.mask
    if args.box:
        try:
            mask = [int(v) for v in args.box.split(",")]
        except ValueError:
            raise ValueError(f"--box={args.box!r} must be x0,y0,x1,y1 integer pixels") from None
        if len(mask) != 4:
            raise ValueError(f"--box={args.box!r} must be x0,y0,x1,y1 integer pixels")
        from attnedit.surfaces.params import mask as box_rule

        box_rule("--box", mask)
    layers = [dict(zip(("image", "mask", "dx", "dy"), _layer(spec))) for spec in args.layer or []]
    return _run_task(args, "edit", {
        "operation": args.operation, "image": args.image, "mask": mask, "dx": args.dx, "dy": args.dy,
        "scale": args.scale, "direction": args.direction, "amount": args.amount, "steps": args.steps,
        "dilation": args.dilation, "layers": layers or None, "hole_noise": args.hole_noise,
    })


def _layer(spec: str) -> tuple:
    parts = spec.split(":")
    if len(parts) != 4 or not all(p.lstrip("-").isdigit() for p in parts[2:]):
        raise ValueError(f"--layer={spec!r} must be IMAGE:MASK:DX:DY (DX, DY integer pixels)")
    return parts[0], parts[1], int(parts[2]), int(parts[3])


def _video(args: argparse.Namespace) -> int:
    return _run_task(args, "video", {
        "prompt": args.prompt, "seed": args.seed, "steps": args.steps, "guidance_scale": args.guidance,
        "width": args.width, "height": args.height, "frames": args.frames, "radial": not args.dense,
        "dense_steps": args.dense_steps, "dense_layers": args.dense_layers, "decay": args.decay,
        "radial_preset": args.radial_preset, "dense_tail_steps": args.dense_tail_steps,
    }, default_model=DEFAULT_VIDEO_MODEL, ulysses=args.ulysses)


def _heads(args: argparse.Namespace) -> int:
    from attnedit.methods.headhunter import main as headhunter_main

    return headhunter_main(args.rest[1:] if args.rest[:1] == ["--"] else args.rest)


def _batch(args: argparse.Namespace) -> int:
    import json
    import os
    from pathlib import Path

    from attnedit.surfaces import params as rules

    rules.check_output("--out", args.out)
    rules.check_device("--device", args.device)
    from attnedit.surfaces.batch import Summary, load_jobs, run_batch
    from attnedit.surfaces.loading import load_pipeline
    from attnedit.surfaces.outputs import atomic_write_json

    jobs = load_jobs(args.jobs)
    for job in jobs if args.model else ():
        if job.model is None:
            rules.check_model_kind(args.model, job.task, rules.model_kind(args.model))
    index, count, device, barrier = _process_group(args.device)

    def load(model, **options):
        pipe = load_pipeline(model, device, args.dtype, **{**_loading(args), **options})
        pipe.set_progress_bar_config(disable=True)
        return pipe

    out = Path(args.out)
    summary = run_batch(jobs, out, load, default_model=args.model, process_index=index, num_processes=count,
                        progress=index == 0 and not os.environ.get("ATTNEDIT_NO_PROGRESS"))
    atomic_write_json(out / f".summary.{index}.json", summary.__dict__)
    barrier()
    if index != 0:
        return 0
    total = Summary()
    for rank in range(count):
        total = total.merge(Summary(**json.loads((out / f".summary.{rank}.json").read_text())))
    atomic_write_json(out / "summary.json", total.__dict__)
    print(f"batch: {total.line()}")
    for job, message in total.failed.items():
        print(f"  failed {job}: {message}", file=sys.stderr)
    return 1 if total.failed else 0


def _process_group(device: str | None):
    """(process index, process count, device, barrier) under `accelerate launch`; one process otherwise."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, device, lambda: None
    from accelerate import PartialState

    state = PartialState(cpu=device == "cpu")
    return state.process_index, state.num_processes, str(state.device), state.wait_for_everyone


def _app(args: argparse.Namespace) -> int:
    from attnedit.surfaces import params as rules

    rules.integer(1, 65535)("--port", args.port)
    from attnedit.surfaces.webapp import main as app_main

    loading = [arg for key, value in _loading(args).items()
               for arg in ([f"--{key}", v] for v in (value if isinstance(value, list) else [value])) for arg in arg]
    return app_main((["--model", args.model] if args.model else []) + ["--port", str(args.port)] + loading)


def _sampling_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--guidance", type=float, help="CFG scale (default: the pipeline's)")
    parser.add_argument("--width", type=int)
    parser.add_argument("--height", type=int)


def _weights_options(parser: argparse.ArgumentParser) -> None:
    from attnedit.surfaces.memory import PLANS

    parser.add_argument("--memory", choices=PLANS, help="where weights live: auto (default: the fastest plan that "
                        "fits, says why), none, model-offload, group-offload, sequential-offload")
    parser.add_argument("--quantize", metavar="Q", help="int8 (torchao; CPU too), fp8 (torchao), bnb-8bit, bnb-4bit "
                        "(bitsandbytes; CUDA), or a .gguf transformer file")
    parser.add_argument("--lora", action="append", metavar="PATH_OR_ID[:SCALE]", help="load a LoRA (repeat for several)")
    parser.add_argument("--variant", help="weight files variant, e.g. fp16")


def _loading(args: argparse.Namespace) -> dict:
    """--memory, --quantize, --lora, --variant as load_pipeline's keywords (those given)."""
    options = {name: getattr(args, name, None) for name in ("memory", "quantize", "lora", "variant")}
    return {k: v for k, v in options.items() if v}


def _show_progress(pipe) -> None:
    """The sampling progress bar on a terminal (tqdm's disable=None), unless ATTNEDIT_NO_PROGRESS is set."""
    import os

    pipe.set_progress_bar_config(disable=True if os.environ.get("ATTNEDIT_NO_PROGRESS") else None)


def _model_options(parser: argparse.ArgumentParser, default: str = DEFAULT_MODEL) -> None:
    parser.add_argument("--model", help=f"hub id, local folder, shapes-t2i, shapes-dit, shapes-t2v or tiny:<family> "
                                        f"(default: {default}, trained and built in)")
    parser.add_argument("--device", help="cpu, cuda, mps (default: fastest available)")
    _weights_options(parser)
    parser.add_argument("--dtype", choices=_DTYPES, metavar="DTYPE", help="float32, float16, bfloat16 (default: by device)")


_DTYPES = ("float32", "fp32", "float16", "fp16", "bfloat16", "bf16")  # loading.pick_dtype's names


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="attnedit", description="Edit what diffusion models attend to.", epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    gen = sub.add_parser("generate", help="text to image, optionally refocused to a layout and head-guided",
                         epilog='example: attnedit generate "a red cat" --layout layout.json --heads L1H0 --out cat.png')
    gen.add_argument("prompt", nargs="?", help="the prompt (default: the layout's)")
    gen.add_argument("--out", default="out.png", help="PNG path (parameters embedded)")
    _sampling_options(gen)
    gen.add_argument("--negative", help="negative prompt")
    gen.add_argument("--layout", help="refocusing layout JSON: {prompt, regions: [{phrase, boxes: [[x0,y0,x1,y1]]}]}")
    gen.add_argument("--refocus-steps", type=int, help="refocus only steps below this (default: the schedule's steps)")
    gen.add_argument("--schedule", choices=tuple(SCHEDULES), help="refocusing schedule (default ce0439c, the "
                     "authors' code for plain SD, up to 110 updates; b79fba5: their HEAD, tuned for GLIGEN; cheap "
                     "ones: fast (20 updates), fast-15 (15), fast-front (20, maps from the front layers only))")
    gen.add_argument("--heads", help="perturbed-attention guidance heads, e.g. 'L1H0,L1H1', '7:3', 'L7', ranking.json or a preset "
                     "(attnedit presets)")
    gen.add_argument("--pag-scale", type=float, help="guidance scale of the perturbed branch (default 3.0)")
    gen.add_argument("--pag-strength", type=float, help="SoftPAG u in [0, 1] (default 1.0)")
    _model_options(gen)
    gen.set_defaults(run=_generate)
    edit = sub.add_parser("edit", help="edit a real image by key masking (DesignEdit)",
                          epilog="example: attnedit edit remove photo.png --mask mask.png --out clean.png")
    edit.add_argument("operation", choices=["remove", "move", "resize", "flip", "zoom-out", "pan", "compose"])
    edit.add_argument("image", help="the source image (the background for compose)")
    edit.add_argument("--mask", help="mask image (white = object / region)")
    edit.add_argument("--box", help="a box instead of a mask: x0,y0,x1,y1 in pixels")
    edit.add_argument("--dx", type=int, help="move: pixels right")
    edit.add_argument("--dy", type=int, help="move: pixels down")
    edit.add_argument("--scale", type=float, help="resize: object scale; zoom-out: image scale in (0, 1)")
    edit.add_argument("--direction", help="flip: h or v; pan: left, right, up or down")
    edit.add_argument("--amount", type=int, help="pan: pixels")
    edit.add_argument("--layer", action="append", help="compose: IMAGE:MASK:DX:DY (repeat)")
    edit.add_argument("--steps", type=int, help="sampling steps (default 50; DDIM on SD/SDXL, Euler on SD3/FLUX)")
    edit.add_argument("--dilation", type=int,
                      help="mask dilation, the paper's attend_scale: a kernel of this many px at the model's native "
                           "resolution (default 20; 30 for zoom-out/pan)")
    edit.add_argument("--hole-noise", type=float,
                      help="share of fresh noise in the hole's starting latent, 0..1 (SD/SD3: 0; FLUX, shapes-t2i: 1)")
    edit.add_argument("--out", default="edited.png")
    _model_options(edit)
    edit.set_defaults(run=_edit)
    video = sub.add_parser("video", help="text to video with radial sparse attention (Wan, HunyuanVideo)",
                           epilog='example: attnedit video "a red ball rolling" --model Wan-AI/Wan2.1-T2V-1.3B-Diffusers --frames 81 --out ball.mp4')
    video.add_argument("prompt")
    video.add_argument("--out", default="video.mp4", help="MP4 path")
    _sampling_options(video)
    video.add_argument("--frames", type=int, help="number of frames")
    video.add_argument("--dense", action="store_true", help="dense attention (radial off)")
    video.add_argument("--dense-steps", type=int, help="first steps kept dense (preset: 12)")
    video.add_argument("--dense-layers", type=int, help="first layers kept dense")
    video.add_argument("--decay", type=float, help="radial decay factor gamma")
    video.add_argument("--radial-preset", metavar="NAME",
                       help="the authors' settings by name (attnedit presets lists them; default: the model's)")
    video.add_argument("--dense-tail-steps", type=int, metavar="N", help="last N steps dense (for quality)")
    video.add_argument("--save-frames", action="store_true", help="also write PNG frames into a folder beside the MP4")
    video.add_argument("--fps", type=int, default=16)
    video.add_argument("--ulysses", type=int, metavar="N",
                       help="one video on N GPUs (Ulysses context parallelism); launch with torchrun --nproc_per_node N")
    _model_options(video, default=DEFAULT_VIDEO_MODEL)
    video.set_defaults(run=_video)
    video_edit_cli.add_parser(sub, _model_options)  # attnedit edit-video remove clip.mp4 --masks masks/
    heads = sub.add_parser("heads", help="HeadHunter search for heads to perturb (options: attnedit heads --help)",
                           add_help=False)
    heads.add_argument("rest", nargs=argparse.REMAINDER)
    heads.set_defaults(run=_heads)
    batch = sub.add_parser(
        "batch", help="run a JSONL/YAML job file (resumable; shards under accelerate launch)",
        epilog="example: accelerate launch --num_processes 2 -m attnedit batch jobs.jsonl --out results/",
    )
    batch.add_argument("jobs", help=".jsonl (one job per line) or .yaml file")
    batch.add_argument("--out", required=True, help="output folder")
    _model_options(batch)
    batch.set_defaults(run=_batch)
    sites = sub.add_parser("sites", help="list a model's editable attention sites (kind, layer, heads)")
    _model_options(sites)
    sites.set_defaults(run=_sites)
    presets = sub.add_parser("presets", help="list the shipped presets: heads (--heads NAME) and radial settings "
                                             "(--radial-preset NAME)")
    presets.set_defaults(run=_presets)
    app = sub.add_parser("app", help="start the web app on 127.0.0.1")
    app.add_argument("--model", help="hub id, local folder or tiny:<family>")
    app.add_argument("--port", type=int, default=7860)
    _weights_options(app)
    app.set_defaults(run=_app)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["heads"]:  # the search has its own options; hand them over untouched (incl. --help)
        argv = ["heads", "--", *argv[1:]]
    args = build_parser().parse_args(argv)
    quiet_libraries()
    try:
        with catching_interrupts():
            return args.run(args)
    except (ValueError, OSError) as error:
        print(f"attnedit: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # finished outputs are complete files; nothing half-written is left under a final name
        print("\nattnedit: interrupted", file=sys.stderr)
        return 130
    except (MemoryError, RuntimeError) as error:
        if isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError" or (
                "can't allocate memory" in str(error)):  # torch's CPU allocator
            print("attnedit: error: out of memory; try a smaller --width/--height/--frames or another --device",
                  file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
