"""Forward + backward time and peak memory of each loss, side by side in one run.

    python benchmarks/loss_speed.py [--sizes 256 1024 4096] [--dim 256] [--repeats 7] [--chunk-sizes 128 256 None]

For every batch size B: plait's InfoNCE, the gamma loss (default ema estimator, and the memory
estimator), SogCLR, an open_clip-style CLIP loss written here (two cross-entropies over
s a @ b.T and s b @ a.T, s = 1/0.07), pytorch-metric-learning's NTXentLoss used as a CLIP loss
(both directions, ``ref_emb``; where it fits), and a lower bound made of the same matrix
products alone (logits = a @ b.T and the two products of its backward). The features are
unit-norm rows, as an encoder's normalised output: the open_clip-style loss takes them as they
are (as open_clip's ClipLoss does), plait's losses normalise them again (their default
``normalize=True``); the rows "normalize=False" skip that, the same work as the open_clip-style
loss. ``--chunk-sizes`` adds InfoNCE and SogCLR rows at other ``chunk_size`` values (None: the
dense path). Times are medians of ``--repeats``
runs after a warm-up; peak memory is the rise of the process's peak resident set (VmHWM,
reset before each measurement) over its resident set before the call, measured in a child
process whose glibc MALLOC_MMAP_THRESHOLD_ is fixed at 16 kB so that every tensor buffer is
mapped and unmapped on its own and the resident set follows the live tensors (timing runs in
the parent with the default allocator). Prints ratios.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from plait.losses import GammaContrastiveLoss, InfoNCELoss, SogCLRLoss

DATASET_SIZE = 65536  # N for the stateful losses; the memory estimator scans 4096 random bank rows per step


def _status(key: str) -> int:
    with open("/proc/self/status") as handle:
        return int(re.search(rf"{key}:\s+(\d+)", handle.read()).group(1)) * 1024


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def _pml_clip_loss():
    from pytorch_metric_learning.losses import NTXentLoss

    ntxent = NTXentLoss(temperature=0.07)

    def loss(a, b, index):
        labels = torch.arange(a.shape[0])
        return (ntxent(a, labels, ref_emb=b, ref_labels=labels.clone())
                + ntxent(b, labels, ref_emb=a, ref_labels=labels.clone())) / 2

    return loss


def open_clip_style(a, b, index, scale: float = 1 / 0.07):
    """The CLIP loss as open_clip computes it (both logit matrices, two cross-entropies),
    written here: (CE(s a @ b.T, arange) + CE(s b @ a.T, arange)) / 2."""
    labels = torch.arange(a.shape[0])
    return (F.cross_entropy(scale * a @ b.T, labels) + F.cross_entropy(scale * b @ a.T, labels)) / 2


def _chunk_candidates(chunk_sizes: list) -> dict:
    """InfoNCE and SogCLR at other chunk sizes (None: the dense path)."""
    out = {}
    for chunk in chunk_sizes:
        infonce = InfoNCELoss(temperature=0.07, chunk_size=chunk)
        sogclr = SogCLRLoss(DATASET_SIZE, temperature=0.07, chunk_size=chunk)
        out[f"plait InfoNCE (chunk_size={chunk})"] = lambda a, b, index, loss=infonce: loss(a, b)
        out[f"plait SogCLR (chunk_size={chunk})"] = lambda a, b, index, loss=sogclr: loss(a, b, index=index)
    return out


def _candidates(batch: int, dim: int, chunk_sizes: list = ()) -> dict:
    """name -> callable(a, b, index) returning a scalar to backpropagate."""
    gradient = torch.randn(batch, batch)

    def matmul_bound(a, b, index):
        (a @ b.T).backward(gradient)
        return None

    infonce = InfoNCELoss(temperature=0.07)
    gamma = GammaContrastiveLoss(DATASET_SIZE, temperature=0.07, estimator="ema")
    memory = GammaContrastiveLoss(DATASET_SIZE, temperature=0.07, estimator="memory", memory_candidates=4096)
    sogclr = SogCLRLoss(DATASET_SIZE, temperature=0.07)
    infonce_raw = InfoNCELoss(temperature=0.07, normalize=False)
    sogclr_raw = SogCLRLoss(DATASET_SIZE, temperature=0.07, normalize=False)
    return {
        "matmul bound": matmul_bound,
        "open_clip-style loss": open_clip_style,
        "plait InfoNCE": lambda a, b, index: infonce(a, b),
        "plait gamma (ema)": lambda a, b, index: gamma(a, b, index=index),
        "plait gamma (memory, 4096 bank rows)": lambda a, b, index: memory(a, b, index=index),
        "plait SogCLR": lambda a, b, index: sogclr(a, b, index=index),
        "plait InfoNCE (normalize=False)": lambda a, b, index: infonce_raw(a, b),
        "plait SogCLR (normalize=False)": lambda a, b, index: sogclr_raw(a, b, index=index),
        **_chunk_candidates(chunk_sizes),
        "PML NTXentLoss (CLIP form)": _pml_clip_loss(),
    }


def _inputs(batch: int, dim: int):
    """Unit-norm feature rows (B, d), leaves with gradient, and B distinct dataset indices."""
    generator = torch.Generator().manual_seed(batch)
    a = F.normalize(torch.randn(batch, dim, generator=generator), dim=1).requires_grad_(True)
    b = F.normalize(torch.randn(batch, dim, generator=generator), dim=1).requires_grad_(True)
    return a, b, torch.randperm(DATASET_SIZE, generator=generator)[:batch]


def _step(fn, a, b, index) -> None:
    value = fn(a, b, index)
    if value is not None:
        value.backward()
    a.grad = b.grad = None


def peak_memory(fn, batch: int, dim: int) -> int:
    """Peak bytes of one forward + backward (after a warm-up that allocates any state)."""
    a, b, index = _inputs(batch, dim)
    _step(fn, a, b, index)
    gc.collect()
    before = _status("VmRSS")
    _reset_peak()
    _step(fn, a, b, index)
    return _status("VmHWM") - before


def median_times(fns: dict, batch: int, dim: int, repeats: int) -> dict[str, float]:
    """Median seconds of forward + backward per loss; the losses take turns in every round, so
    that a slow spell of the machine hits all of them alike."""
    a, b, index = _inputs(batch, dim)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for name, fn in fns.items():
        _step(fn, a, b, index)  # warm-up
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            _step(fn, a, b, index)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def _skip(name: str, batch: int, args) -> bool:
    return name.startswith("PML") and batch > args.pml_max_batch


def _peaks(args) -> dict:
    """Peak memory of every (loss, B), measured in a child process with a fixed mmap threshold."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "16384"}
    command = [sys.executable, __file__, "--memory-only", "--dim", str(args.dim), "--pml-max-batch",
               str(args.pml_max_batch), "--sizes", *map(str, args.sizes), "--chunk-sizes", *map(str, args.chunk_sizes)]
    return json.loads(subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--pml-max-batch", type=int, default=256,
                        help="largest B to run PML at (it builds index tensors for all B^2 pairs; default %(default)s)")
    parser.add_argument("--chunk-sizes", nargs="*", default=[], type=lambda x: None if x == "None" else int(x),
                        help="extra InfoNCE and SogCLR rows at these chunk_size values (None: the dense path)")
    parser.add_argument("--memory-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_only:
        peaks = {f"{name}|{batch}": peak_memory(fn, batch, args.dim)
                 for batch in args.sizes for name, fn in _candidates(batch, args.dim, args.chunk_sizes).items()
                 if not _skip(name, batch, args)}
        print(json.dumps(peaks))
        return
    peaks = _peaks(args)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32 CPU, d = {args.dim}, "
          f"median of {args.repeats} runs\n")
    print("| loss | B | fwd+bwd ms | x InfoNCE | x matmul bound | x open_clip-style | peak MB | peak x InfoNCE |")
    print("|---|---|---|---|---|---|---|---|")
    for batch in args.sizes:
        fns = {}
        for name, fn in _candidates(batch, args.dim, args.chunk_sizes).items():
            if _skip(name, batch, args):
                print(f"| {name} | {batch} | not run: builds B^2 pair-index tensors "
                      f"(B=1024 exceeded a 16 GB memory limit) | | | | | |")
                continue
            fns[name] = fn
        times = median_times(fns, batch, args.dim, args.repeats)
        for name, seconds in times.items():
            peak = peaks[f"{name}|{batch}"]
            print(f"| {name} | {batch} | {seconds * 1e3:.1f} | {seconds / times['plait InfoNCE']:.2f} | "
                  f"{seconds / times['matmul bound']:.2f} | {seconds / times['open_clip-style loss']:.2f} | "
                  f"{peak / 2**20:.0f} | {peak / peaks[f'plait InfoNCE|{batch}']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
