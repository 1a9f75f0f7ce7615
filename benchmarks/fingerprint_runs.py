"""Fingerprints of short runs: that a refactoring leaves results bitwise unchanged.

    python benchmarks/fingerprint_runs.py --out before.json            # on the old tree
    python benchmarks/fingerprint_runs.py --out after.json --compare before.json

Each case is a ``plait`` command (a tiny run of every loss, estimator, regulariser, in-modal and
momentum-bank setting, the gradient cache, fp64, augmentation, periodic evaluation and
staleness, a resume, the fusion model with its own ITC and with plugged losses, fine-tuning, two
torchrun processes, and E1's quick experiment) run in a fresh process with one thread
(``OMP_NUM_THREADS=1``: the float reduction order is part of the result). Its fingerprint is the
sha256 of: every exported tensor (name, dtype, shape, bytes), ``metrics.jsonl`` without wall-clock
fields, ``eval.json``'s metrics, and the checkpoint's loss, optimizer, scheduler, model and
progress state (tensor bytes, plain values). ``--compare`` prints every case whose part differs and
exits 1 if any does.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

TINY = "tiny"
EPOCHS = ["data.batch_size=256", "optim.max_steps=null", "optim.epochs=3"]  # 5 steps an epoch on digits
FUSION = ["optim.max_steps=6", "data.batch_size=16", "eval.tasks=[retrieval]", "train.progress=false",
          "model.fusion.queue_size=32", "train.checkpoint_every_epochs=0"]

# name -> (argument lists run in order in one output directory; '{out}' is that directory)
CASES: dict[str, list[list[str]]] = {
    "gamma-auto": [["train", TINY]],
    "gamma-ema": [["train", TINY, "loss.options.estimator=ema"]],
    "gamma-ema-decay": [["train", TINY, "loss.options.estimator=ema", "loss.options.gamma_decay_visits=3"]],
    "gamma-exact": [["train", TINY, "loss.options.estimator=exact"]],
    "gamma-memory-table": [["train", TINY, "loss.options.estimator=memory", "loss.options.anchor_gradient=table",
                            "loss.options.bank_refresh_steps=2", "loss.options.memory_candidates=64"]],
    "gamma-shape1": [["train", TINY, "loss.options.shape=1.0"]],
    "gamma-unimodal": [["train", TINY, "loss.options.mode=unimodal"]],
    "gamma-chunked": [["train", TINY, "loss.options.batch_chunk_size=4", "loss.options.chunk_size=100"]],
    "infonce": [["train", TINY, "loss.name=infonce"]],
    "ntxent": [["train", TINY, "loss.name=ntxent"]],
    "sogclr": [["train", TINY, "loss.name=sogclr"]],
    "gamma-in-modal": [["train", TINY, "loss.in_modal=true"]],
    "sogclr-in-modal": [["train", TINY, "loss.name=sogclr", "loss.in_modal=true"]],
    "infonce-separation": [["train", TINY, "loss.name=infonce", "regularizers=[{name: separation}]", "eval.features=both",
                            "eval.tasks=[retrieval,linear_probe,few_shot,knn]"]],
    "gamma-bridge": [["train", TINY, "regularizers=[{name: bridge, weight: 0.3, t: uniform}]"]],
    "gamma-consistency": [["train", TINY, "regularizers=[{name: consistency}]"]],
    "gamma-all-regs": [["train", TINY, "loss.in_modal=true",
                        "regularizers=[{name: separation}, {name: bridge}, {name: consistency}]", "eval.features=independent"]],
    "gamma-bank-momentum": [["train", TINY, "loss.options.estimator=memory", "train.bank_momentum=0.9"]],
    "infonce-grad-cache": [["train", TINY, "loss.name=infonce", "train.grad_cache_chunk=5"]],
    "gamma-grad-cache-regs": [["train", TINY, "train.grad_cache_chunk=4", "regularizers=[{name: consistency}]"]],
    "gamma-fp64": [["train", TINY, "train.precision=fp64"]],
    "gamma-clip-off": [["train", TINY, "optim.grad_clip=0"]],
    "augment-image-text": [["train", TINY, "data.augment.image=true", "data.augment.text=true"]],
    "cnn-transformer": [["train", "{root}/towers.yaml", "model.a={name: cnn, width: 8}",
                         "model.b={name: transformer, width: 16, depth: 1, heads: 2}"]],
    "vit": [["train", "{root}/towers.yaml", "model.a={name: vit, width: 16, depth: 1, heads: 2, patch: 4}",
             "model.projection_hidden=8", "data.augment.image=true"]],
    "epochs-val-staleness": [["train", TINY, *EPOCHS, "data.validation_fraction=0.2", "train.eval_every_epochs=1",
                              "train.staleness_every_epochs=1", "train.log_every=1"]],
    "epochs-ema-staleness": [["train", TINY, *EPOCHS, "loss.options.estimator=ema", "train.staleness_every_epochs=1",
                              "eval.split=test", "train.checkpoint_every_steps=4"]],
    "resume": [["train", TINY, "optim.max_steps=3", "train.log_every=1"],
               ["train", TINY, "optim.max_steps=6", "train.log_every=1", "--resume"]],
    "uci": [["train", "uci", "optim.max_steps=8", "train.progress=false", "eval.few_shot=[1]", "eval.few_shot_seeds=1"]],
    "fusion-itc": [["train", "fusion", *FUSION]],
    "fusion-itc-consistency": [["train", "fusion", *FUSION, "regularizers=[{name: consistency}]"]],
    "fusion-gamma": [["train", "fusion", *FUSION, "loss.name=gamma"]],
    "fusion-separation": [["train", "fusion", *FUSION, "regularizers=[{name: separation}]"]],
    "finetune": [["train", "fusion", *FUSION],
                 ["finetune", "{out}/model.safetensors", "--task", "vqa", "max_steps=4", "epochs=1", "output_dir={out}/ft"]],
    "ddp-gamma": [["train", TINY, "--nproc", "2"]],
    "ddp-sogclr-separation": [["train", TINY, "loss.name=sogclr", "regularizers=[{name: separation}]", "--nproc", "2"]],
    "ddp-fusion": [["train", "fusion", *FUSION, "--nproc", "2"]],
    "e1-quick": [["experiment", "gradient-bias", "--quick", "--out", "{out}", "--no-progress", "--workers", "1"]],
}
WALL_CLOCK = {"samples_per_s", "seconds", "elapsed_s", "time"}
# configs the cases name as {root}/NAME: written into the temporary directory first
CONFIG_FILES = {
    "towers.yaml": "name: towers\ndata: {name: digits, options: {image_size: 8}, batch_size: 16}\n"
                   "model: {embed_dim: 16}\noptim: {epochs: 1, max_steps: 6}\ntrain: {log_every: 2, progress: false}\n"
                   "eval: {tasks: [retrieval, knn], few_shot: [1], few_shot_seeds: 1}\n",
}


def _digest() -> "hashlib._Hash":
    return hashlib.sha256()


def _update(digest, value) -> None:
    """Feed a nested value (tensors, dicts, lists, numbers, strings) into ``digest``, order-stable."""
    import torch

    if torch.is_tensor(value):
        tensor = value.detach().cpu().contiguous().reshape(-1)
        shape = tuple(value.shape)
        digest.update(f"T{tensor.dtype}{shape}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    elif isinstance(value, dict):
        digest.update(b"{")
        for key in sorted(value, key=str):
            digest.update(str(key).encode() + b":")
            _update(digest, value[key])
        digest.update(b"}")
    elif isinstance(value, (list, tuple)):
        digest.update(b"[")
        for item in value:
            _update(digest, item)
        digest.update(b"]")
    else:
        digest.update(repr(value).encode())


def _hash(value) -> str:
    digest = _digest()
    _update(digest, value)
    return digest.hexdigest()[:16]


def fingerprint(directory: Path) -> dict[str, str]:
    """The parts of a run directory (recursively: a fine-tuning run inside a run) as short hashes."""
    import torch
    from safetensors.torch import load_file

    parts: dict[str, str] = {}
    for path in sorted(directory.rglob("*")):
        name = str(path.relative_to(directory))
        if path.name == "model.safetensors":
            parts[name] = _hash(load_file(str(path)))
        elif path.name == "metrics.jsonl":
            records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            parts[name] = _hash([{k: v for k, v in r.items() if k not in WALL_CLOCK} for r in records])
        elif path.name in ("eval.json", "finetune.json"):
            data = json.loads(path.read_text())
            parts[name] = _hash(data.get("metrics", data))
        elif path.name == "results.json":
            data = json.loads(path.read_text())
            data.pop("seconds", None)
            parts[name] = _hash(_drop_wall_clock(data))
        elif path.name == "checkpoint.pt":
            state = torch.load(path, map_location="cpu", weights_only=True)
            for key in ("model", "optimizer", "scheduler", "loss", "momentum_model", "progress", "rng", "augment"):
                if key in state:
                    parts[f"{name}:{key}"] = _hash(state[key])
    return parts


def _drop_wall_clock(value):
    if isinstance(value, dict):
        return {k: _drop_wall_clock(v) for k, v in value.items() if k not in WALL_CLOCK}
    if isinstance(value, list):
        return [_drop_wall_clock(v) for v in value]
    return value


def run_case(name: str, root: Path) -> tuple[str, dict]:
    out = root / name
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    for arguments in CASES[name]:
        arguments = [a.replace("{out}", str(out)).replace("{root}", str(root)) for a in arguments]
        if arguments[0] == "train":
            arguments = [*arguments, f"output_dir={out}", "train.progress=false"]
        command = [sys.executable, "-m", "plait", *arguments]
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            return name, {"error": f"exit {done.returncode}: {done.stderr.strip().splitlines()[-1:]}"}
    result = fingerprint(out)
    print(f"{name}: {len(result)} parts in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return name, result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="write the fingerprints here (JSON)")
    parser.add_argument("--compare", help="fingerprints of another tree to compare with")
    parser.add_argument("--cases", nargs="*", help=f"a subset of: {', '.join(CASES)}")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    names = args.cases or list(CASES)
    with tempfile.TemporaryDirectory(prefix="plait-fingerprint-") as tmp:
        for name, text in CONFIG_FILES.items():
            (Path(tmp) / name).write_text(text)
        with ThreadPoolExecutor(args.workers) as pool:
            results = dict(pool.map(lambda n: run_case(n, Path(tmp)), names))
    Path(args.out).write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    if not args.compare:
        return 0
    before = json.loads(Path(args.compare).read_text())
    differ = 0
    for name in names:
        old, new = before.get(name), results[name]
        if old is None:
            print(f"{name}: not in {args.compare}")
            continue
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if changed:
            differ += 1
            print(f"{name}: DIFFERS in {', '.join(changed)}")
    print(f"{len(names) - differ} of {len(names)} cases identical")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
