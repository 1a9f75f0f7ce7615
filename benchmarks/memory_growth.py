"""Memory stays flat over a long run: RSS, Python objects and the loss's state over 20,000 steps.

    OMP_NUM_THREADS=1 python benchmarks/memory_growth.py [--steps 20000] [--every 100]
        [--threshold-mib 5] [--tracemalloc] [--out DIR] [key=value ...]

Trains the packaged tiny config (digits, B = 16: 89 steps an epoch, so 20,000 steps are 225
epochs, each with its staleness pass; a checkpoint every 1,000 steps; a log line every 10 steps)
with ``Trainer.fit`` and, every ``--every`` steps (at a log record, from the trainer's own
``log``; nothing in ``plait`` is changed), samples

- the process RSS (``/proc/self/statm``; psutil is not needed) and its peak (VmHWM),
- the number of objects the garbage collector tracks (``len(gc.get_objects())``),
- the loss's state: tensors, elements and bytes of ``trainer.loss_fn.state_dict()``,
- the optimiser's state tensors and bytes.

Each sample runs ``gc.collect()`` first, so the counts are of live objects, not of garbage
waiting for the collector. It prints RSS at steps 1k, 2k, 5k, 10k and 20k, the growth from 2k to
20k (MiB; as the slope of a least-squares line through every sample from 2k on, MiB per 1k
steps; and as the drift of the median of the window's last tenth against its first tenth, which
the allocator's occasional transient spikes do not move), the object count's and the states'
growth, and PASS / FAIL against ``--threshold-mib``. The default, 5 MiB over 2k -> 20k, is 290
bytes a step: one leaked tensor (its TensorImpl and storage alone are a few hundred bytes) or
one leaked dict of a record per step would exceed it, while the allocator's noise on this run is
well under 1 MiB; a leak of one gc-tracked object per step shows as +18,000 objects. The first
2k steps are warm-up: optimiser state, the loss's lazily sized state, allocator arenas, lazy
imports, the first checkpoint's buffers. Samples go to ``OUT/memory_samples.jsonl``.

With ``--tracemalloc`` it also traces Python allocations from step 2k on and prints the 15 lines
whose live allocations grew most between step 2k and the last step (tracemalloc slows the run
about 2x and its own ~16 MiB of traces show in the RSS: use it to find a leak, not to measure
RSS; no verdict is printed then).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

import torch

from plait.config import load_config
from plait.training import Trainer

PAGE = os.sysconf("SC_PAGE_SIZE")
MIB = 1024 * 1024
MARKS = (1000, 2000, 5000, 10000, 20000)  # and the last step, when --steps is another number


def rss_mib() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * PAGE / MIB


def peak_mib() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def tensor_bytes(state) -> tuple[int, int, int]:
    """(tensors, elements, bytes) in a nested state (dicts, lists, tensors)."""
    if torch.is_tensor(state):
        return 1, state.numel(), state.numel() * state.element_size()
    items = state.values() if isinstance(state, dict) else state if isinstance(state, (list, tuple)) else ()
    total = [0, 0, 0]
    for item in items:
        for i, value in enumerate(tensor_bytes(item)):
            total[i] += value
    return tuple(total)


def slope(points: list[tuple[int, float]]) -> float:
    """Least-squares slope of (step, value), per 1,000 steps."""
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    sxx = sum((x - mean_x) ** 2 for x, _ in points)
    sxy = sum((x - mean_x) * (y - mean_y) for x, y in points)
    return 1000 * sxy / sxx if sxx else 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20000)
    parser.add_argument("--every", type=int, default=100, help="sample every this many steps (a multiple of train.log_every)")
    parser.add_argument("--threshold-mib", type=float, default=5.0)
    parser.add_argument("--tracemalloc", action="store_true")
    parser.add_argument("--out", default="/tmp/plait-memory-growth", help="the run's output_dir (overwritten)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    torch.set_num_threads(1)

    steps_per_epoch = 1438 // 16  # digits' training split at the tiny config's B = 16
    epochs = args.steps // steps_per_epoch + 2
    out = Path(args.out)
    if out.exists():
        for path in out.iterdir():
            if path.is_file():
                path.unlink()
    config = load_config("tiny", [
        f"output_dir={out}", f"optim.max_steps={args.steps}", f"optim.epochs={epochs}", "train.log_every=10",
        "train.checkpoint_every_steps=1000", "train.checkpoint_every_epochs=0", "train.progress=false", *args.overrides,
    ])
    trainer = Trainer(config)
    samples: list[dict] = []
    snapshots: dict[str, tracemalloc.Snapshot] = {}
    started = time.perf_counter()
    log = trainer.log

    def sample(step: int) -> None:
        gc.collect()
        loss_tensors, loss_elements, loss_bytes = tensor_bytes(trainer.loss_fn.state_dict())
        optim_tensors, _, optim_bytes = tensor_bytes(trainer.optimizer.state_dict()["state"])
        samples.append({
            "step": step, "seconds": round(time.perf_counter() - started, 1), "rss_mib": round(rss_mib(), 2),
            "peak_mib": round(peak_mib(), 2), "gc_objects": len(gc.get_objects()),
            "loss_state_tensors": loss_tensors, "loss_state_elements": loss_elements, "loss_state_bytes": loss_bytes,
            "optimizer_state_tensors": optim_tensors, "optimizer_state_bytes": optim_bytes,
            "traced_mib": round(tracemalloc.get_traced_memory()[0] / MIB, 2) if tracemalloc.is_tracing() else None,
        })
        if args.tracemalloc and step == 2000:
            tracemalloc.start(8)
            snapshots["start"] = tracemalloc.take_snapshot()
        # the last step, before the evaluation
        if args.tracemalloc and step == args.steps and "end" not in snapshots and tracemalloc.is_tracing():
            snapshots["end"] = tracemalloc.take_snapshot()

    def sampling_log(record: dict) -> None:
        log(record)
        step = record.get("step", 0)
        if "split" not in record and (step % args.every == 0 or step == 1) and (not samples or samples[-1]["step"] != step):
            sample(step)

    trainer.log = sampling_log  # the instance's attribute: plait itself is unchanged
    sample(0)
    trainer.fit()
    seconds = time.perf_counter() - started
    sample(trainer.step)  # after the final save, export and evaluation
    samples[-1]["after_fit"] = True

    (out / "memory_samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    by_step = {s["step"]: s for s in samples if not s.get("after_fit")}
    print(f"{trainer.step} steps in {seconds:.0f} s ({trainer.step / seconds:.0f} steps/s), torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s); samples in {out / 'memory_samples.jsonl'}")
    print("| step | RSS MiB | peak MiB | gc objects | loss state (tensors, bytes) | optimizer state bytes |")
    print("|---:|---:|---:|---:|---:|---:|")
    last = max(by_step)
    for mark in sorted({0, *MARKS, last}):
        if mark in by_step:
            s = by_step[mark]
            print(f"| {mark} | {s['rss_mib']:.1f} | {s['peak_mib']:.1f} | {s['gc_objects']} | "
                  f"{s['loss_state_tensors']}, {s['loss_state_bytes']} | {s['optimizer_state_bytes']} |")
    s = samples[-1]
    print(f"| after fit() (final save, export, evaluation) | {s['rss_mib']:.1f} | {s['peak_mib']:.1f} | {s['gc_objects']} | "
          f"{s['loss_state_tensors']}, {s['loss_state_bytes']} | {s['optimizer_state_bytes']} |")

    window = [s for step, s in sorted(by_step.items()) if step >= 2000]
    verdict = 0
    if 2000 in by_step and len(window) >= 2:
        first, final = by_step[2000], by_step[last]
        growth = final["rss_mib"] - first["rss_mib"]
        rss_slope = slope([(s["step"], s["rss_mib"]) for s in window])
        objects = final["gc_objects"] - first["gc_objects"]
        objects_slope = slope([(s["step"], s["gc_objects"]) for s in window])
        state_same = all(s["loss_state_bytes"] == first["loss_state_bytes"]
                         and s["optimizer_state_bytes"] == first["optimizer_state_bytes"]
                         for s in window)
        top = max(window, key=lambda s: s["rss_mib"])
        # the allocator now and then holds a few MiB (once ~20) for a sample or two, then returns them:
        # the medians of the window's first and last tenth show the baseline's drift without those spikes
        tenth = max(1, len(window) // 10)
        drift = statistics.median(s["rss_mib"] for s in window[-tenth:]) - statistics.median(s["rss_mib"] for s in window[:tenth])
        baseline = statistics.median(s["rss_mib"] for s in window)
        spikes = sum(s["rss_mib"] > baseline + 1.0 for s in window)
        print(f"\nRSS growth 2k -> {last}: {growth:+.2f} MiB; slope {rss_slope:+.3f} MiB per 1k steps "
              f"(max {top['rss_mib']:.1f} MiB at step {top['step']}, min {min(s['rss_mib'] for s in window):.1f}); "
              f"median of the last tenth minus the first: {drift:+.2f} MiB; {spikes} of {len(window)} samples "
              f"more than 1 MiB above the median {baseline:.1f}")
        print(f"gc objects 2k -> {last}: {objects:+d} (slope {objects_slope:+.1f} per 1k steps); "
              f"loss and optimizer state sizes constant: {state_same}")
        if args.tracemalloc:  # tracemalloc's own traces (~16 MiB from step 2k) are in the RSS: no verdict on it
            traced = [(s["step"], s["traced_mib"]) for s in window if s["traced_mib"] is not None]
            print(f"Python allocations traced from step 2k: {traced[0][1]:.2f} MiB at {traced[0][0]}, {traced[-1][1]:.2f} MiB at "
                  f"{traced[-1][0]} (slope {1024 * slope(traced):+.1f} KiB per 1k steps); the RSS includes tracemalloc's "
                  "own bookkeeping: no verdict")
        else:
            ok = abs(growth) < args.threshold_mib and abs(drift) < args.threshold_mib and state_same
            print(f"{'PASS' if ok else 'FAIL'}: |RSS growth| {abs(growth):.2f} MiB and |drift| {abs(drift):.2f} MiB against the "
                  f"{args.threshold_mib} MiB threshold" + ("" if state_same else "; a state grew"))
            verdict = 0 if ok else 1
    if len(snapshots) == 2:
        print(f"\ntracemalloc: the lines whose live allocations grew most from step 2k to step {args.steps} (the samples "
              "this script keeps included)")
        for stat in snapshots["end"].compare_to(snapshots["start"], "lineno")[:15]:
            print(f"  {stat.size_diff / 1024:+9.1f} KiB {stat.count_diff:+7d} blocks  {stat.traceback[0]}")
    return verdict


if __name__ == "__main__":
    sys.exit(main())
