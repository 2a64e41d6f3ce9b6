"""The ``attnedit`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

EXAMPLES = """examples:
  attnedit sites                          # attention sites of the default offline tiny model
  attnedit sites --model stabilityai/stable-diffusion-3.5-medium
  attnedit app --port 7860                # the web app, on 127.0.0.1
"""


def _sites(args: argparse.Namespace) -> int:
    from .install import install
    from .loading import load_pipeline

    pipe = load_pipeline(args.model, device="cpu" if args.model is None else args.device)
    with install(pipe) as handle:
        print(f"family: {handle.family.name}   sites: {len(handle.sites)}")
        print(f"{'kind':6s} {'layer':>5s} {'heads':>5s}  module")
        for site in handle.sites:
            print(f"{site.kind:6s} {site.layer:5d} {site.heads:5d}  {site.name}")
    return 0


def _app(args: argparse.Namespace) -> int:
    from .webapp import main as app_main

    return app_main((["--model", args.model] if args.model else []) + ["--port", str(args.port)])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attnedit", description="Edit what diffusion models attend to.", epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sites = sub.add_parser("sites", help="list a model's editable attention sites (kind, layer, heads)")
    sites.add_argument("--model", help="hub id, local folder or tiny:<family> (default: tiny:sd15)")
    sites.add_argument("--device", help="cpu, cuda, mps (default: fastest available)")
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
