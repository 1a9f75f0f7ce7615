"""Peak memory and time of each loss at a large batch: chunked against unchunked, one run.

    python benchmarks/loss_memory.py [--batch 16384] [--dim 256] [--repeats 3] [--losses "gamma (ema)"]

For InfoNCE, SogCLR and the gamma loss (``estimator="ema"``), at temperature 0.07 on float32 CPU:
plait's loss at its defaults against the plain dense formula of the same value written here (it
materialises the (B, B) logit matrix and lets autograd keep what it needs): the open_clip-style
cross-entropy for InfoNCE, a dense log-sum-exp of the first visit's estimate for SogCLR and the
gamma loss (on a first visit both return the batch estimate, so the two formulas give the same
value and gradient); for the gamma loss also plait's loss with ``batch_chunk_size=None`` (its
dense path, which forms the logits). Every variant runs alone in a child process: peak memory is measured as in
benchmarks/loss_speed.py (the rise of VmHWM over VmRSS for one forward + backward after a
warm-up, glibc's mmap threshold fixed at 16 kB so that the resident set follows the live
tensors), the time (median of ``--repeats`` forward + backward) in another child with the default
allocator. The value and the gradients of both variants are compared (max abs difference).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from loss_speed import DATASET_SIZE, _reset_peak, _status

from plait.losses import GammaContrastiveLoss, InfoNCELoss, SogCLRLoss

TEMPERATURE = 0.07


def _normalized(a, b):
    return F.normalize(a, dim=1), F.normalize(b, dim=1)


def dense_infonce(a, b, index):
    """(CE(s, arange) + CE(s.T, arange)) / 2, s = a @ b.T / T on unit rows."""
    a, b = _normalized(a, b)
    logits = (a @ b.T) / TEMPERATURE
    labels = torch.arange(a.shape[0])
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def _diagonal(n: int):
    i = torch.arange(n)
    return i, i


def dense_sogclr(a, b, index):
    """First visit: mean over both directions of log(eps + mean_{j != i} exp(s_ij - s_ii)) + log((N-1)/N),
    eps = 1/(N - 1)."""
    a, b = _normalized(a, b)
    logits = (a @ b.T) / TEMPERATURE
    positive = logits.diagonal()
    negatives = logits.index_put(_diagonal(a.shape[0]), torch.tensor(-math.inf))
    log_mean = torch.stack([torch.logsumexp(negatives, 1), torch.logsumexp(negatives, 0)]) - math.log(a.shape[0] - 1)
    log_g = torch.logaddexp(log_mean - positive, torch.tensor(-math.log(DATASET_SIZE - 1)))
    return log_g.mean() + math.log((DATASET_SIZE - 1) / DATASET_SIZE)


def dense_gamma(a, b, index):
    """First visit: mean over both directions of log Zbatch_i - s_ii,
    Zbatch_i = 1/N exp(s_ii) + (N-1)/N mean_{j != i} exp(s_ij)."""
    a, b = _normalized(a, b)
    n = DATASET_SIZE
    logits = (a @ b.T) / TEMPERATURE
    positive = logits.diagonal()
    weighted = (logits + (math.log((n - 1) / n) - math.log(a.shape[0] - 1))).index_put(
        _diagonal(a.shape[0]), positive - math.log(n))
    log_z = torch.stack([torch.logsumexp(weighted, 1), torch.logsumexp(weighted, 0)])
    return (log_z - positive).mean()


def _plait(name: str, chunked: bool = True):
    """A fresh plait loss (stateful ones: every call a first visit), as callable(a, b, index);
    ``chunked=False``: the gamma loss with ``batch_chunk_size=None``."""
    if name == "InfoNCE":
        loss = InfoNCELoss(temperature=TEMPERATURE)
        return lambda a, b, index: loss(a, b)
    if name == "SogCLR":
        loss = SogCLRLoss(DATASET_SIZE, temperature=TEMPERATURE)
    else:
        options = {} if chunked else {"batch_chunk_size": None}
        loss = GammaContrastiveLoss(DATASET_SIZE, temperature=TEMPERATURE, estimator="ema", **options)
    return lambda a, b, index: loss(a, b, index=index)


DENSE = {"InfoNCE": dense_infonce, "SogCLR": dense_sogclr, "gamma (ema)": dense_gamma}
# loss -> [(variant, label)], the unchunked formula last
VARIANTS = {
    "InfoNCE": [("plait", "plait InfoNCE (chunked)"), ("dense", "open_clip-style cross-entropy (dense)")],
    "SogCLR": [("plait", "plait SogCLR (chunked)"), ("dense", "dense log-sum-exp formula")],
    "gamma (ema)": [
        ("plait", "plait gamma, ema (chunked)"),
        ("unchunked", "plait gamma, ema, batch_chunk_size=None (its dense path: the (B, B) logits formed)"),
        ("dense", "dense log-sum-exp formula"),
    ],
}


def _make(name: str, variant: str):
    if variant in ("plait", "unchunked"):
        return _plait(name, chunked=variant == "plait")
    return DENSE[name]


def _inputs(batch: int, dim: int):
    generator = torch.Generator().manual_seed(batch)
    a = torch.randn(batch, dim, generator=generator, requires_grad=True)
    b = torch.randn(batch, dim, generator=generator, requires_grad=True)
    return a, b, torch.randperm(DATASET_SIZE, generator=generator)[:batch]


def _step(make, a, b, index):
    """One forward + backward of a fresh loss; returns the value."""
    value = make()(a, b, index)
    value.backward()
    return value.detach()


def _child(args) -> None:
    """Run one variant: ``--measure peak`` (value and gradients saved to ``--out``) or ``time``."""
    name, variant = args.loss, args.variant
    a, b, index = _inputs(args.batch, args.dim)
    make = lambda: _make(name, variant)  # noqa: E731
    _step(make, a, b, index)  # warm-up
    a.grad = b.grad = None
    gc.collect()
    if args.measure == "peak":
        before = _status("VmRSS")
        _reset_peak()
        value = _step(make, a, b, index)
        peak = _status("VmHWM") - before
        torch.save({"value": value, "grad_a": a.grad, "grad_b": b.grad}, args.out)
        print(json.dumps({"peak": peak}))
        return
    times = []
    for _ in range(args.repeats):
        a.grad = b.grad = None
        start = time.perf_counter()
        _step(make, a, b, index)
        times.append(time.perf_counter() - start)
    print(json.dumps({"seconds": statistics.median(times)}))


def _run(args, name: str, variant: str, measure: str, out: str) -> dict:
    env = dict(os.environ)
    if measure == "peak":
        env["MALLOC_MMAP_THRESHOLD_"] = "16384"
    command = [sys.executable, __file__, "--child", "--loss", name, "--variant", variant, "--measure", measure,
               "--out", out, "--batch", str(args.batch), "--dim", str(args.dim), "--repeats", str(args.repeats)]
    result = subprocess.run(command, env=env, check=True, capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def _max_difference(paths: list[str]) -> tuple[float, float, float]:
    """|value - value'|, max |gradient - gradient'| over a and b, and max |gradient'| (the second: the reference)."""
    first, second = (torch.load(path) for path in paths)
    value = (first["value"] - second["value"]).abs().item()
    grad = max((first[k] - second[k]).abs().max().item() for k in ("grad_a", "grad_b"))
    scale = max(second[k].abs().max().item() for k in ("grad_a", "grad_b"))
    return value, grad, scale


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16384)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--losses", nargs="+", default=list(DENSE), choices=list(DENSE))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--loss", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args)
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32 CPU, B = {args.batch}, "
          f"d = {args.dim}, temperature {TEMPERATURE}, time: median of {args.repeats} runs\n")
    print("| loss | computation | peak MB | peak x unchunked | fwd+bwd s | time x unchunked | "
          "max abs diff: value | max abs diff: gradient (max abs gradient) |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        for name in args.losses:
            rows = {}
            for variant, _ in VARIANTS[name]:
                path = os.path.join(folder, f"{variant}.pt")
                rows[variant] = (_run(args, name, variant, "peak", path)["peak"],
                                 _run(args, name, variant, "time", path)["seconds"])
            base_peak, base_seconds = rows["dense"]
            for variant, label in VARIANTS[name]:
                peak, seconds = rows[variant]
                diff = " | "
                if variant != "dense":
                    value, grad, scale = _max_difference([os.path.join(folder, f"{v}.pt") for v in (variant, "dense")])
                    diff = f"{value:.1e} | {grad:.1e} ({scale:.1e})"
                print(f"| {name} | {label} | {peak / 2**20:.0f} | {peak / base_peak:.3f} | {seconds:.2f} | "
                      f"{seconds / base_seconds:.2f} | {diff} |", flush=True)


if __name__ == "__main__":
    main()
