"""E1: the gradient bias of minibatch InfoNCE, and the decomposable loss that removes it.

The toy of DESIGN.md section 1: x ~ N(0, I_4), y = x + 0.5 * noise, N = 2048 fixed pairs, critic
s_ij = kappa * cos(x_i, y_j), one learnable parameter kappa (the logit scale). kappa_inf is the
minimiser of the generalised loss (every item a candidate); minibatch InfoNCE's minimiser
kappa_B is smaller, and SGD on it lands there. Each run is plain SGD on kappa with a decaying
step size lr0 / (1 + t / t0); the reported value is kappa / kappa_inf averaged over the second
half of the run (Polyak averaging).
"""

from __future__ import annotations

import json
import math
import multiprocessing
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from plait.atomic import atomic_write_text, save_figure
from plait.losses import GammaContrastiveLoss, InfoNCELoss, SogCLRLoss, generalized_contrastive_loss

# name -> (loss class name, options). Every gamma variant uses the loss's defaults unless named.
# E1 studies the estimators as the paper states them: the anchor-side gradient over the table
# (unbiased with an exact table) and no cap on the M-step weight. On real data the defaults differ
# (anchor gradient from the batch, weight cap 20; docs/losses.md): stale bank rows do not exist in
# this one-parameter toy, whose candidates are fixed vectors.
_TOY = {"anchor_gradient": "table", "max_weight": float("inf")}
METHODS: dict[str, tuple[str, dict]] = {
    "infonce": ("infonce", {}),
    "sogclr": ("sogclr", {}),
    "gamma-ema": ("gamma", {"estimator": "ema"}),  # the defaults: gamma 0.5, weight cap 20 (uncapped, B = 4 overflows)
    "gamma-exact": ("gamma", {"estimator": "exact", **_TOY}),
    "gamma-memory": ("gamma", {"estimator": "memory", **_TOY}),
    # Ablations of the two choices that matter at B = 4 (run at the smallest batch only).
    "gamma-exact-shape1": ("gamma", {"estimator": "exact", "shape": 1.0, **_TOY}),
    "gamma-exact-batch-grad": ("gamma", {"estimator": "exact", "anchor_gradient": "batch", "max_weight": float("inf")}),
}
MAIN_METHODS = ("infonce", "sogclr", "gamma-ema", "gamma-exact", "gamma-memory")
ABLATIONS = ("gamma-exact-shape1", "gamma-exact-batch-grad")
COLORS = {
    "infonce": "tab:blue", "sogclr": "tab:green", "gamma-ema": "tab:orange", "gamma-exact": "tab:red",
    "gamma-memory": "darkred", "gamma-exact-shape1": "tab:pink", "gamma-exact-batch-grad": "tab:purple",
}


@dataclass
class GradientBiasConfig:
    """E1's settings: the toy data (N pairs in ``dim`` dimensions, ``noise``), the batch sizes,
    seeds and methods, SGD on kappa (steps, lr0 / (1 + t / t0), kappa's initial range), the
    ``checkpoints`` log-spaced steps of the curves and the band counted as reaching kappa_inf."""

    dataset_size: int = 2048
    dim: int = 4
    noise: float = 0.5
    data_seed: int = 0
    batch_sizes: tuple[int, ...] = (4, 16)
    seeds: int = 10
    steps: int = 2000
    lr: float = 5.0
    lr_decay_steps: float = 200.0
    init_range: tuple[float, float] = (2.0, 20.0)
    methods: tuple[str, ...] = MAIN_METHODS
    ablations: tuple[str, ...] = ABLATIONS
    checkpoints: int = 30
    band: tuple[float, float] = (0.97, 1.03)
    extra: dict = field(default_factory=dict)

    @classmethod
    def quick(cls) -> "GradientBiasConfig":
        """A run small enough for a test (seconds): 3 seeds, B = 4, 600 steps."""
        return cls(batch_sizes=(4,), seeds=3, steps=600, lr_decay_steps=100.0, ablations=())


def toy_pairs(dataset_size: int = 2048, dim: int = 4, noise: float = 0.5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, dim) L2-normalised views x and y = x + noise * eps of N Gaussian points."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(dataset_size, dim, generator=generator)
    y = x + noise * torch.randn(dataset_size, dim, generator=generator)
    return F.normalize(x, dim=1), F.normalize(y, dim=1)


def _minimise_convex(loss_and_grad, low: float, high: float, tol: float = 1e-7) -> float:
    """Root of the derivative of a convex 1-D function by bisection on its sign."""
    for _ in range(200):
        mid = (low + high) / 2
        if loss_and_grad(mid) > 0:
            high = mid
        else:
            low = mid
        if high - low < tol:
            break
    return (low + high) / 2


def optimal_scale(a: torch.Tensor, b: torch.Tensor, low: float = 0.01, high: float = 200.0) -> float:
    """kappa_inf = argmin of the generalised loss (convex in kappa), to 1e-7."""
    a64, b64 = a.double(), b.double()

    def derivative(kappa: float) -> float:
        scale = torch.tensor(kappa, dtype=torch.float64, requires_grad=True)
        loss = generalized_contrastive_loss(a64, b64, logit_scale=scale, normalize=False)
        return torch.autograd.grad(loss, scale)[0].item()

    return _minimise_convex(derivative, low, high)


def minibatch_optimal_scale(
    a: torch.Tensor, b: torch.Tensor, batch_size: int, batches: int = 20000, seed: int = 0,
    low: float = 0.01, high: float = 200.0,
) -> float:
    """kappa_B = argmin of minibatch InfoNCE's expected loss, over ``batches`` random batches."""
    generator = torch.Generator().manual_seed(seed)
    n = a.shape[0]
    index = torch.stack([torch.randperm(n, generator=generator)[:batch_size] for _ in range(batches)])
    cos = (a.double()[index] @ b.double()[index].transpose(1, 2))  # (batches, B, B)

    def derivative(kappa: float) -> float:
        scale = torch.tensor(kappa, dtype=torch.float64, requires_grad=True)
        logits = scale * cos
        diagonal = logits.diagonal(dim1=1, dim2=2)
        loss = ((torch.logsumexp(logits, 2) - diagonal).mean() + (torch.logsumexp(logits, 1) - diagonal).mean()) / 2
        return torch.autograd.grad(loss, scale)[0].item()

    return _minimise_convex(derivative, low, high)


def _build(method: str, dataset_size: int, seed: int) -> torch.nn.Module:
    kind, options = METHODS[method]
    if kind == "infonce":
        return InfoNCELoss()
    if kind == "sogclr":
        return SogCLRLoss(dataset_size, **options)
    return GammaContrastiveLoss(dataset_size, seed=seed, **options)


def train_scale(
    method: str, a: torch.Tensor, b: torch.Tensor, batch_size: int, seed: int, config: GradientBiasConfig
) -> tuple[torch.Tensor, dict[str, float]]:
    """SGD on kappa with ``method``'s loss.

    Returns kappa after every step, shape (steps,), and the loss's staleness statistics (mean
    state age in steps, mean |log Zbatch - log Zhat|) over the second half, if it keeps state.
    """
    generator = torch.Generator().manual_seed(1000 + seed)
    low, high = config.init_range
    kappa = torch.nn.Parameter(torch.tensor(math.exp(math.log(low) + (math.log(high) - math.log(low))
                                                     * torch.rand((), generator=generator).item())))
    loss_fn = _build(method, a.shape[0], seed)
    optimizer = torch.optim.SGD([kappa], lr=config.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1.0 + step / config.lr_decay_steps))
    needs_index = not isinstance(loss_fn, InfoNCELoss)
    exact = getattr(loss_fn, "estimator", None) == "exact"
    trace = torch.empty(config.steps)
    staleness: dict[str, torch.Tensor] = {}
    order, position = torch.randperm(a.shape[0], generator=generator), 0
    for step in range(config.steps):
        if position + batch_size > a.shape[0]:
            order, position = torch.randperm(a.shape[0], generator=generator), 0
        index = order[position:position + batch_size]
        position += batch_size
        options = {"index": index} if needs_index else {}
        if exact:
            options["candidates"] = (a, b)
        loss = loss_fn(a[index], b[index], logit_scale=kappa, **options)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            kappa.clamp_(min=0.1)
        trace[step] = kappa.detach()
        if step >= config.steps // 2:
            for key, value in getattr(loss_fn, "stats", {}).items():
                staleness[key] = staleness.get(key, 0.0) + value
    half = config.steps - config.steps // 2
    return trace, {key: float(total) / half for key, total in staleness.items()}


def tail_average(trace: torch.Tensor, steps: list[int]) -> list[float]:
    """Polyak average of kappa over the second half of the first t steps, for each t."""
    cumulative = torch.cat([torch.zeros(1, dtype=torch.float64), trace.double().cumsum(0)])
    return [((cumulative[t] - cumulative[t // 2]) / (t - t // 2)).item() for t in steps]


def _run_one(job: tuple) -> dict:
    method, batch_size, seed, config, a, b, kappa_inf = job
    torch.set_num_threads(1)
    start = time.perf_counter()
    trace, staleness = train_scale(method, a, b, batch_size, seed, config)
    steps = sorted({max(2, round(config.steps ** (k / config.checkpoints))) for k in range(1, config.checkpoints + 1)})
    curve = [value / kappa_inf for value in tail_average(trace, steps)]
    return {
        "method": method, "batch_size": batch_size, "seed": seed, "final": curve[-1],
        "curve_steps": steps, "curve": curve, "staleness": staleness, "seconds": time.perf_counter() - start,
    }


def run_gradient_bias(config: GradientBiasConfig, out_dir: str | Path, workers: int = 2, progress: bool = True) -> dict:
    """Run every (method, batch size, seed), write results.json, table.md and kappa.png."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    a, b = toy_pairs(config.dataset_size, config.dim, config.noise, config.data_seed)
    kappa_inf = optimal_scale(a, b)
    reference = {str(bs): minibatch_optimal_scale(a, b, bs) / kappa_inf for bs in config.batch_sizes}
    jobs = [(m, bs, s, config, a, b, kappa_inf) for bs in config.batch_sizes for m in config.methods for s in range(config.seeds)]
    smallest = min(config.batch_sizes)
    jobs += [(m, smallest, s, config, a, b, kappa_inf) for m in config.ablations for s in range(config.seeds)]
    # Slowest jobs first so the pool finishes together.
    jobs.sort(key=lambda job: (METHODS[job[0]][0] != "gamma", job[0] == "gamma-ema"))
    runs = _map(jobs, workers, progress)
    runs.sort(key=lambda r: (r["batch_size"], list(METHODS).index(r["method"]), r["seed"]))
    result = {
        "optimum": 1.0,
        "kappa_inf": kappa_inf,
        "infonce_minibatch_optimum": reference,
        "band": list(config.band),
        "config": {k: v for k, v in asdict(config).items() if k != "extra"},
        "seconds": time.perf_counter() - started,
        "runs": runs,
    }
    atomic_write_text(out / "results.json", json.dumps(result, indent=1))
    atomic_write_text(out / "table.md", summary_table(result))
    plot_curves(result, out / "kappa.png")
    return result


def _map(jobs: list, workers: int, progress: bool) -> list[dict]:
    from plait.runtime import progress_bar

    bar = progress_bar(len(jobs), progress, desc="gradient-bias runs", leave=False)
    results = []
    if workers <= 1:
        for job in jobs:
            results.append(_run_one(job))
            bar.update()
    else:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            for item in pool.imap_unordered(_run_one, jobs):
                results.append(item)
                bar.update()
    bar.close()
    return results


def summary_rows(result: dict) -> list[dict]:
    """One row per (method, batch size): median, min, max of the final kappa / kappa_inf."""
    low, high = result["band"]
    groups: dict[tuple[str, int], list[dict]] = {}
    for run in result["runs"]:
        groups.setdefault((run["method"], run["batch_size"]), []).append(run)
    rows = []
    for (method, batch_size), runs in groups.items():
        values = torch.tensor([run["final"] for run in runs], dtype=torch.float64)
        ages = [run["staleness"]["state_age"] for run in runs if "state_age" in run["staleness"]]
        ratios = [run["staleness"]["log_ratio"] for run in runs if "log_ratio" in run["staleness"]]
        rows.append({
            "method": method, "batch_size": batch_size, "runs": len(runs),
            "median": values.median().item(), "min": values.min().item(), "max": values.max().item(),
            "within": int(((values >= low) & (values <= high)).sum()),
            "state_age": sum(ages) / len(ages) if ages else None,
            "log_ratio": sum(ratios) / len(ratios) if ratios else None,
        })
    return rows


def summary_table(result: dict) -> str:
    """The markdown table of :func:`summary_rows` (one row per method and batch size), then
    kappa_inf and minibatch InfoNCE's own optimum kappa_B / kappa_inf at each batch size."""
    low, high = result["band"]
    lines = [
        f"| method | B | runs | median kappa/kappa_inf | min | max | runs in [{low}, {high}] | state age (steps) | "
        "mean abs log(Zbatch/Zhat) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def fmt(value: float | None, digits: int) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    for row in summary_rows(result):
        lines.append(
            f"| {row['method']} | {row['batch_size']} | {row['runs']} | {row['median']:.3f} | "
            f"{row['min']:.3f} | {row['max']:.3f} | {row['within']}/{row['runs']} | "
            f"{fmt(row['state_age'], 0)} | {fmt(row['log_ratio'], 2)} |"
        )
    reference = ", ".join(f"B={bs}: {value:.3f}" for bs, value in result["infonce_minibatch_optimum"].items())
    lines.append("")
    lines.append(f"kappa_inf = {result['kappa_inf']:.4f}; minibatch InfoNCE's own optimum kappa_B / kappa_inf: {reference}.")
    return "\n".join(lines) + "\n"


def plot_curves(result: dict, path: Path) -> None:
    """kappa / kappa_inf against steps: per method the median of its runs and their range."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({run["batch_size"] for run in result["runs"]})
    fig, axes = plt.subplots(1, len(sizes), figsize=(6.5 * len(sizes), 4.8), sharey=True, squeeze=False)
    for ax, batch_size in zip(axes[0], sizes):
        for method in METHODS:
            runs = [run for run in result["runs"] if run["batch_size"] == batch_size and run["method"] == method]
            if not runs:
                continue
            curves = torch.tensor([run["curve"] for run in runs], dtype=torch.float64)
            steps = runs[0]["curve_steps"]
            median = curves.median(dim=0).values
            label = f"{method} ({median[-1].item():.2f})"
            ablation = method in ABLATIONS
            ax.plot(steps, median, color=COLORS[method], lw=1.2 if ablation else 1.8, ls="--" if ablation else "-", label=label)
            if not ablation:
                ax.fill_between(steps, curves.min(dim=0).values, curves.max(dim=0).values, color=COLORS[method], alpha=0.12)
        ax.axhline(1.0, color="black", lw=1, ls="--")
        ax.axhline(result["infonce_minibatch_optimum"][str(batch_size)], color="tab:blue", lw=1, ls=":")
        ax.axhspan(*result["band"], color="grey", alpha=0.2)
        ax.set_xscale("log")
        ax.set_ylim(0.5, 1.5)
        ax.set_xlabel("SGD steps")
        ax.set_title(f"B = {batch_size}: median and range over seeds (final median in legend)")
        ax.legend(fontsize=8, loc="lower right")
    axes[0][0].set_ylabel("kappa / kappa_inf (Polyak average of the second half)")
    fig.suptitle("E1 gradient bias. Dashed: the optimum; dotted: minibatch InfoNCE's own optimum; grey: [0.97, 1.03]")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)
