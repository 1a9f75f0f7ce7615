"""The ``plait`` command line.

    plait train CONFIG [key=value ...] [--resume [CHECKPOINT] | --overwrite] [--allow-import] [--nproc N]
    torchrun --nproc_per_node=N [--nnodes ... --rdzv-endpoint HOST:PORT] -m plait train CONFIG ...
    plait eval WEIGHTS_OR_CHECKPOINT [--data NAME] [--out DIR] [--allow-import] [key=value ...]
    plait finetune FUSION_WEIGHTS --task vqa|reasoning|entailment [key=value ...]
    plait report RUN_DIR [--html]
    plait data build NAME --out DIR [--image-size N] [--limit N]
    plait experiment {gradient-bias, small-batch, batch-sweep, gamma-ablation, information-gap, regularizers, fusion,
                      task-baselines} [options]

Exit codes: 0 done; 2 bad input (config, data, files, command line), said in one line on stderr;
1 a bug in plait (its traceback, then one line saying so); 3 (a torchrun worker) stopped because
another rank stopped first.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXIT_OK, EXIT_BUG, EXIT_USER_ERROR = 0, 1, 2  # 2 also for command-line syntax errors (argparse)


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


def _train(args: argparse.Namespace) -> int:
    from plait import distributed
    from plait.config import load_config
    from plait.evaluate.report import write_report
    from plait.training import train

    resume, overrides = (args.resume if args.resume is not None else False), list(args.overrides)
    if isinstance(resume, str) and "=" in resume and not Path(resume).exists():  # `--resume key=value`: an override, not a path
        resume, overrides = True, [*overrides, resume]
    config = load_config(args.config, overrides)
    if args.nproc is not None and not distributed.launched():
        from plait.run_dir import check_run_dir

        check_run_dir(config.output_dir, resume, args.overwrite)  # said once, before any worker starts
        return _launch(args, overrides, resume)
    metrics = train(config, resume=resume, overwrite=args.overwrite, allow_import=args.allow_import)
    if distributed.launched_rank() != 0:  # rank 0 alone reports
        return 0
    report = write_report(config.output_dir)
    print(json.dumps(metrics, indent=1))
    print(f"wrote {config.output_dir} (report: {report})")
    return 0


def _launch(args: argparse.Namespace, overrides: list[str], resume: bool | str) -> int:
    """``plait train ... --nproc N``: torchrun's elastic agent on this machine runs N workers of the
    same command (without ``--nproc``); a worker's failure stops the others and is named here."""
    from plait import distributed

    if args.nproc < 1:
        raise ValueError(f"--nproc={args.nproc} must be a positive number of processes")
    command = ["-m", "plait", "train", args.config, *overrides]
    if resume:
        command += ["--resume"] + ([] if resume is True else [str(resume)])
    command += ["--overwrite"] * args.overwrite + ["--allow-import"] * args.allow_import
    failed = distributed.launch_local(args.nproc, sys.executable, command)
    if failed is None:
        return EXIT_OK
    rank, code = failed
    print(f"plait: error: the distributed run stopped: rank {rank} exited with code {code} (its message is above)",
          file=sys.stderr)
    return EXIT_USER_ERROR if code == EXIT_USER_ERROR else EXIT_BUG


def _eval(args: argparse.Namespace) -> int:
    from plait.evaluate.run import evaluate_saved

    metrics = evaluate_saved(args.weights, data=args.data, overrides=args.overrides, out_dir=args.out,
                             allow_import=args.allow_import)
    print(json.dumps(metrics, indent=1))
    return 0


def _finetune(args: argparse.Namespace) -> int:
    from plait.finetune import finetune

    result = finetune(args.weights, args.task, overrides=args.overrides, allow_import=args.allow_import)
    print(json.dumps(result["metrics"], indent=1))
    return 0


def _experiment_fusion(args: argparse.Namespace) -> int:
    from plait.experiments.fusion import run_fusion_experiment

    options = {key: getattr(args, key) for key in ("lrs", "weight_multipliers", "variants", "steps") if getattr(args, key)}
    options = {key: tuple(value) if isinstance(value, list) else value for key, value in options.items()}
    print(run_fusion_experiment(args.out, seeds=args.seeds, workers=args.workers, reuse=args.reuse, quick=args.quick,
                                until=args.until, **options))
    return 0


def _experiment_task_baselines(args: argparse.Namespace) -> int:
    from plait.evaluate.task_baselines import task_baseline_table

    print(task_baseline_table(image_size=args.image_size, seed=args.seed, per_kind=True))
    return 0


def _report(args: argparse.Namespace) -> int:
    from plait.evaluate.report import write_report

    print(write_report(args.run_dir, fmt="html" if args.html else "md"))
    return 0


def _data_build(args: argparse.Namespace) -> int:
    from plait.data.builders import build_csv_dataset

    path = build_csv_dataset(args.name, Path(args.out), image_size=args.image_size, limit=args.limit)
    with path.open(encoding="utf-8") as handle:
        count = sum(1 for _ in handle) - 1  # one header line, one line per item (captions hold no newline)
    print(f"wrote {path} ({count} items)")
    return 0


def _experiment_small_batch(args: argparse.Namespace) -> int:
    from plait.experiments.small_batch import run_small_batch

    table = run_small_batch(args.out, quick=args.quick, overrides=args.overrides, workers=args.workers, threads=args.threads)
    print(table)
    return 0


def _experiment_batch_sweep(args: argparse.Namespace) -> int:
    from plait.experiments.batch_sweep import parse_cells, run_batch_sweep

    table = run_batch_sweep(args.out, datasets=args.datasets, budgets=args.budgets, seeds=args.seeds, quick=args.quick,
                            workers=args.workers, overrides=args.overrides, reuse=args.reuse, lr_multipliers=args.lr_multipliers,
                            cells=parse_cells(args.cells) if args.cells else None, max_extensions=args.max_extensions)
    print(table)
    return 0


def _experiment_gamma_ablation(args: argparse.Namespace) -> int:
    from plait.experiments.gamma_ablation import run_gamma_ablation

    print(run_gamma_ablation(args.out, seeds=args.seeds, workers=args.workers, reuse=args.reuse, quick=args.quick,
                             overrides=args.overrides))
    return 0


def _experiment_information_gap(args: argparse.Namespace) -> int:
    from plait.experiments.information_gap import run_information_gap

    print(run_information_gap(args.out, seeds_synthetic=args.seeds, seeds_real=args.seeds, quick=args.quick,
                              workers=args.workers, overrides=args.overrides, reuse=args.reuse))
    return 0


def _experiment_regularizers(args: argparse.Namespace) -> int:
    from plait.experiments.regularizers import run_regularizer_table, sweep_weights

    if args.sweep_weights:
        print(sweep_weights(args.out, seeds=args.seeds or 2, workers=args.workers, quick=args.quick, overrides=args.overrides,
                           reuse=args.reuse))
    else:
        print(run_regularizer_table(args.out, datasets=args.datasets, seeds=args.seeds or 3, quick=args.quick,
                                    workers=args.workers, overrides=args.overrides, reuse=args.reuse))
    return 0


ALLOW_IMPORT_HELP = ("let encoders named package.module:Class in the config be imported (runs that code); "
                     "without it only built-in encoders are accepted, and a value inside a file never sets it")
def _run_options(parser: argparse.ArgumentParser, out: str, seeds: int, quick: str | None, overrides: bool = True) -> None:
    """The options every multi-run experiment shares: --out, --seeds, --workers, --quick, --reuse
    (and key=value overrides applied to every run)."""
    parser.add_argument("--out", default=out)
    parser.add_argument("--seeds", type=int, default=seeds)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument("--reuse", action="store_true", help=REUSE_HELP)
    if overrides:
        parser.add_argument("overrides", nargs="*", help="dotted overrides applied to every run")


REUSE_HELP = "keep runs whose directory already holds the final evaluation of the same config"


def build_parser() -> argparse.ArgumentParser:
    """The ``plait`` argument parser (train, eval, finetune, report, data build, experiment ...); each
    command sets ``args.handler``, the function that runs it and returns the exit code."""
    parser = argparse.ArgumentParser(prog="plait", description="Contrastive representation learning without the large-batch tax.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a two-tower model from a YAML config")
    train.add_argument("config", help="YAML config (see configs/)")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.batch_size=64 loss.name=infonce")
    train.add_argument("--resume", nargs="?", const=True, default=None,
                       help="resume from OUTPUT_DIR/checkpoint.pt, or from the checkpoint given")
    train.add_argument("--overwrite", action="store_true",
                       help="OUTPUT_DIR holds another run: delete the files plait wrote there and start again")
    train.add_argument("--allow-import", action="store_true", help=ALLOW_IMPORT_HELP)
    train.add_argument("--nproc", type=int, default=None, metavar="N",
                       help="train with N processes on this machine "
                            "(torchrun's elastic agent; data.batch_size is the global batch)")
    train.set_defaults(handler=_train)

    evaluate = commands.add_parser("eval", help="evaluate exported weights (model.safetensors) or a checkpoint")
    evaluate.add_argument("weights", help="model.safetensors or checkpoint.pt of a run")
    evaluate.add_argument("--data", default=None, help="dataset name (default: the run's)")
    evaluate.add_argument("--out", default=None, help="directory for eval.json and gallery.npz")
    evaluate.add_argument("--allow-import", action="store_true", help=ALLOW_IMPORT_HELP)
    evaluate.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.options.path=pairs.csv eval.label=group")
    evaluate.set_defaults(handler=_eval)

    tune = commands.add_parser("finetune", help="fine-tune a pre-trained fusion model on an emoji task and evaluate it")
    tune.add_argument("weights", help="model.safetensors or checkpoint.pt of a fusion run (model.kind: fusion)")
    tune.add_argument("--task", required=True, choices=["vqa", "reasoning", "entailment"])
    tune.add_argument("--allow-import", action="store_true", help=ALLOW_IMPORT_HELP)
    tune.add_argument("overrides", nargs="*",
                      help="e.g. epochs=5 lr=1e-4 batch_size=32 output_dir=runs/vqa (plait.finetune.FinetuneConfig)")
    tune.set_defaults(handler=_finetune)

    report = commands.add_parser("report", help="write report.md (loss curves, metrics, gallery) for a run directory")
    report.add_argument("run_dir")
    report.add_argument("--html", action="store_true", help="a self-contained report.html instead")
    report.set_defaults(handler=_report)

    data = commands.add_parser("data", help="build a dataset from installed packages as a user CSV")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    build = data_commands.add_parser("build", help="write DIR/images/*.png and DIR/pairs.csv (read it with data.name=csv)")
    build.add_argument("name", help="dataset to build: glyphs")
    build.add_argument("--out", required=True, help="output directory, e.g. runs/data/glyphs")
    build.add_argument("--image-size", type=int, default=32, help="image side in pixels (default: %(default)s)")
    build.add_argument("--limit", type=int, default=None, help="at most this many items, spread over the whole set")
    build.set_defaults(handler=_data_build)

    experiment = commands.add_parser("experiment", help="reproduce an experiment of the papers")
    _experiment_commands(experiment.add_subparsers(dest="experiment", required=True))
    return parser


def _experiment_commands(experiments) -> None:
    """``plait experiment ...``: E1-E5, the main job, the gamma loss's ablation, the task baselines."""
    bias = experiments.add_parser("gradient-bias",
                                  help="E1: kappa / kappa_inf of InfoNCE, SogCLR and the gamma loss on the Gaussian toy")
    bias.add_argument("--out", default="runs/gradient-bias", help="output directory (default: %(default)s)")
    bias.add_argument("--quick", action="store_true", help="3 seeds, B = 4, 600 steps: a few seconds")
    bias.add_argument("--seeds", type=int, default=None, help="runs per method and batch size (default 10)")
    bias.add_argument("--steps", type=int, default=None, help="SGD steps per run (default 2000)")
    bias.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="default: 4 16")
    bias.add_argument("--workers", type=int, default=2, help="parallel processes (default: %(default)s)")
    bias.add_argument("--no-progress", action="store_true", help="no progress bar")
    bias.set_defaults(handler=_experiment_gradient_bias)

    small = experiments.add_parser("small-batch", help="the main job: emoji, gamma loss at B=32 vs InfoNCE at B=32 and B=128, "
                                                        "equal steps, tuned lr, 3 seeds")
    small.add_argument("--out", default="runs/small-batch")
    small.add_argument("--quick", action="store_true", help="a few steps per run: seconds")
    small.add_argument("--workers", type=int, default=2, help="parallel runs")
    small.add_argument("--threads", type=int, default=1, help="torch threads per run")
    small.add_argument("overrides", nargs="*", help="dotted overrides applied to every run")
    small.set_defaults(handler=_experiment_small_batch)

    sweep = experiments.add_parser("batch-sweep", help="E2: small vs large batch, lr tuned on validation, 3 seeds, two budgets")
    sweep.add_argument("--out", default="runs/batch-sweep")
    sweep.add_argument("--datasets", nargs="+", default=["emoji", "uci", "glyphs"])
    sweep.add_argument("--budgets", nargs="+", default=["steps", "epochs"], help="equal optimizer steps and/or equal epochs")
    sweep.add_argument("--lr-multipliers", type=float, nargs="+", default=[0.25, 0.5, 1.0, 2.0],
                       help="the lr grid, x the config's lr x sqrt(B/32) (default: %(default)s)")
    sweep.add_argument("--cells", nargs="+", metavar="LOSS:B[,B]",
                       help="run only these cells, e.g. infonce:32,512 gamma:32 (default: infonce:32,128,512 gamma:8,16,32)")
    sweep.add_argument("--max-extensions", type=int, default=2, metavar="N",
                       help="grid steps past the grid's edge a cell's lr search may take when its best lr is an edge "
                            "(default: 2; 0: none)")
    sweep.add_argument("--seeds", type=int, default=3)
    sweep.add_argument("--workers", type=int, default=2)
    sweep.add_argument("--quick", action="store_true", help="2 learning rates, 2 seeds, 3 steps per run")
    sweep.add_argument("--reuse", action="store_true", help=REUSE_HELP)
    sweep.add_argument("overrides", nargs="*", help="dotted overrides applied to every run")
    sweep.set_defaults(handler=_experiment_batch_sweep)

    ablation = experiments.add_parser("gamma-ablation",
                                      help="the gamma loss's E-step choices one at a time (emoji, B=32, validation)")
    _run_options(ablation, "runs/gamma-ablation", seeds=3, quick="1 seed, 3 steps per run")
    ablation.set_defaults(handler=_experiment_gamma_ablation)

    fusion = experiments.add_parser("fusion", help="E5: fusion pre-training (ALBEF, +Sep, +Br, +GC), "
                                                  "fine-tuned on VQA, reasoning, entailment")
    _run_options(fusion, "runs/fusion-tuned", seeds=3, quick="2 steps per run, small images", overrides=False)
    fusion.add_argument("--lrs", type=float, nargs="+", help="the pre-training lr grid (default: the module's LRS)")
    fusion.add_argument("--weight-multipliers", type=float, nargs="+",
                        help="x each regulariser's default weight (must include 1)")
    fusion.add_argument("--variants", nargs="+", choices=["albef", "sep", "br", "gc"], help="a subset of the variants")
    fusion.add_argument("--steps", type=int, help="pre-training steps of every run")
    fusion.add_argument("--until", choices=["lr", "weight", "seeds"], default="seeds", help="stop after this phase")
    fusion.set_defaults(handler=_experiment_fusion)

    baselines = experiments.add_parser("task-baselines",
                                       help="text-only, image-only and majority baselines of the three fusion tasks")
    baselines.add_argument("--image-size", type=int, default=16)
    baselines.add_argument("--seed", type=int, default=0)
    baselines.set_defaults(handler=_experiment_task_baselines)

    gap = experiments.add_parser("information-gap", help="E3: synthetic gap and UCI view pairs; CLIP vs +Sep/+Br/+GC")
    _run_options(gap, "runs/information-gap", seeds=2, quick=None)
    gap.set_defaults(handler=_experiment_information_gap)

    table = experiments.add_parser("regularizers", help="E4: regulariser table on UCI and emoji (or the weight sweep)")
    table.add_argument("--out", default="runs/regularizers")
    table.add_argument("--datasets", nargs="+", default=["uci", "emoji"])
    table.add_argument("--seeds", type=int, default=None, help="default 3 (table) or 2 (weight sweep)")
    table.add_argument("--workers", type=int, default=2)
    table.add_argument("--sweep-weights", action="store_true", help="UCI weight sweep that chose the default weights")
    table.add_argument("--quick", action="store_true")
    table.add_argument("--reuse", action="store_true", help=REUSE_HELP)
    table.add_argument("overrides", nargs="*")
    table.set_defaults(handler=_experiment_regularizers)


def main(argv: list[str] | None = None) -> int:
    """The command line; under torchrun every worker, failed or finished, ends at once with its
    exit code (:func:`plait.distributed.exit_now`), so the agent records that code and not an abort
    in the interpreter's shutdown (gloo's threads can abort a process that finalises beside them)."""
    code = _main(argv)
    from plait.distributed import exit_now, launched

    if launched():
        exit_now(code)
    return code


def _main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come after options too (argparse stops a positional list at them)
    if extra:
        if hasattr(args, "overrides") and all("=" in item and not item.startswith("-") for item in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from plait.distributed import launched, launched_rank

    who = f"[rank {launched_rank()}] " if launched() else ""  # under torchrun: which worker speaks
    try:
        return args.handler(args)
    except ValueError as error:  # bad input: say what and where, no traceback
        print(f"plait: {who}error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("plait: interrupted", file=sys.stderr)
        return 130
    except RuntimeError as error:
        from plait.distributed import PEER_STOPPED, peer_failure

        if not peer_failure(error):
            return _bug(who)
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"plait: {who}stopped: a collective failed, another rank stopped or hung first ({first[:200]})", file=sys.stderr)
        return PEER_STOPPED
    except Exception:  # anything else is a bug in plait: the traceback, and exit code 1
        return _bug(who)


def _bug(who: str) -> int:
    """A bug in plait: the traceback of the exception being handled, a line saying so, exit code 1."""
    import traceback

    traceback.print_exc()
    print(f"plait: {who}internal error (a bug in plait, not in your input); please report it with the traceback above",
          file=sys.stderr)
    return EXIT_BUG


if __name__ == "__main__":
    sys.exit(main())
