"""The ``plait`` command line: ``plait experiment NAME [options]``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _experiment_gradient_bias(args: argparse.Namespace) -> int:
    from plait.experiments.gradient_bias import GradientBiasConfig, run_gradient_bias

    config = GradientBiasConfig.quick() if args.quick else GradientBiasConfig()
    if args.seeds is not None:
        config.seeds = args.seeds
    if args.steps is not None:
        config.steps = args.steps
    if args.batch_sizes:
        config.batch_sizes = tuple(args.batch_sizes)
    result = run_gradient_bias(config, args.out, workers=args.workers, progress=not args.no_progress)
    print((Path(args.out) / "table.md").read_text(), end="")
    print(f"wrote {args.out}/results.json, table.md, kappa.png in {result['seconds']:.0f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="plait", description="Contrastive representation learning without the large-batch tax.")
    commands = parser.add_subparsers(dest="command", required=True)
    experiment = commands.add_parser("experiment", help="reproduce an experiment of the papers")
    experiments = experiment.add_subparsers(dest="experiment", required=True)

    bias = experiments.add_parser("gradient-bias", help="E1: kappa / kappa_inf of InfoNCE, SogCLR and the gamma loss on the Gaussian toy")
    bias.add_argument("--out", default="runs/gradient-bias", help="output directory (default: %(default)s)")
    bias.add_argument("--quick", action="store_true", help="3 seeds, B = 4, 600 steps: a few seconds")
    bias.add_argument("--seeds", type=int, default=None, help="runs per method and batch size (default 10)")
    bias.add_argument("--steps", type=int, default=None, help="SGD steps per run (default 2000)")
    bias.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="default: 4 16")
    bias.add_argument("--workers", type=int, default=2, help="parallel processes (default: %(default)s)")
    bias.add_argument("--no-progress", action="store_true", help="no progress bar")
    bias.set_defaults(handler=_experiment_gradient_bias)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
