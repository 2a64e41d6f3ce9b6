"""The ``attnedit`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

EXAMPLES = """examples:
  attnedit generate "a red circle left of a blue square" --out out.png
  attnedit batch jobs.jsonl --out results/  # resumable; under `accelerate launch` jobs are sharded
  attnedit sites                          # attention sites of the default offline tiny model
  attnedit sites --model stabilityai/stable-diffusion-3.5-medium
  attnedit app --port 7860                # the web app, on 127.0.0.1
"""


def _sites(args: argparse.Namespace) -> int:
    from .install import install
    from .loading import load_pipeline

    pipe = load_pipeline(args.model, device="cpu" if args.model is None else args.device, dtype=args.dtype)
    with install(pipe) as handle:
        print(f"family: {handle.family.name}   sites: {len(handle.sites)}")
        print(f"{'kind':6s} {'layer':>5s} {'heads':>5s}  module")
        for site in handle.sites:
            print(f"{site.kind:6s} {site.layer:5d} {site.heads:5d}  {site.name}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .batch import generate_task
    from .loading import load_pipeline
    from .outputs import save_png

    params = {"prompt": args.prompt, "seed": args.seed, "steps": args.steps}
    params.update({k: v for k, v in (("guidance_scale", args.guidance), ("width", args.width), ("height", args.height),
                                     ("negative_prompt", args.negative)) if v is not None})
    pipe = load_pipeline(args.model, args.device, args.dtype)
    image = generate_task(pipe, params)[0]
    save_png(Path(args.out), image, {**params, "model": args.model or "default"})
    print(args.out)
    return 0


def _batch(args: argparse.Namespace) -> int:
    import json
    import os
    from pathlib import Path

    from .batch import Summary, load_jobs, run_batch
    from .loading import load_pipeline
    from .outputs import atomic_write_json

    jobs = load_jobs(args.jobs)
    index, count, device, barrier = _process_group(args.device)

    def load(model):
        pipe = load_pipeline(model, device, args.dtype)
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
    from .webapp import main as app_main

    return app_main((["--model", args.model] if args.model else []) + ["--port", str(args.port)])


def _model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="hub id, local folder or tiny:<family> (default: tiny:sd15)")
    parser.add_argument("--device", help="cpu, cuda, mps (default: fastest available)")
    parser.add_argument("--dtype", help="float32, float16, bfloat16 (default: by device)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attnedit", description="Edit what diffusion models attend to.", epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="text to image", epilog='example: attnedit generate "a red cat" --out cat.png')
    gen.add_argument("prompt")
    gen.add_argument("--out", default="out.png", help="PNG path (parameters embedded)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--steps", type=int, default=30)
    gen.add_argument("--guidance", type=float)
    gen.add_argument("--width", type=int)
    gen.add_argument("--height", type=int)
    gen.add_argument("--negative", help="negative prompt")
    _model_options(gen)
    gen.set_defaults(run=_generate)
    batch = sub.add_parser(
        "batch", help="run a JSONL/YAML job file (resumable; shards under accelerate launch)",
        epilog="example: accelerate launch --num_processes 2 -m attnedit.cli batch jobs.jsonl --out results/",
    )
    batch.add_argument("jobs", help=".jsonl (one job per line) or .yaml file")
    batch.add_argument("--out", required=True, help="output folder")
    _model_options(batch)
    batch.set_defaults(run=_batch)
    sites = sub.add_parser("sites", help="list a model's editable attention sites (kind, layer, heads)")
    _model_options(sites)
    sites.set_defaults(run=_sites)
    app = sub.add_parser("app", help="start the web app on 127.0.0.1")
    app.add_argument("--model", help="hub id, local folder or tiny:<family>")
    app.add_argument("--port", type=int, default=7860)
    app.set_defaults(run=_app)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, OSError) as error:
        print(f"attnedit: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
