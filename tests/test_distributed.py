"""torchrun/DDP against one process: 2 spawned gloo processes with the same global batch give the
same losses, gradients, per-sample state and parameters (float64: asserted within 1e-9, the issue
asks 1e-6; measured within 1e-11), identical state on both ranks, resume across world sizes, a
failing rank, the fusion model, bf16 autocast."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from plait.data.sampler import EpochSampler
from tests import distributed_workers as workers

ROOT = Path(__file__).resolve().parents[1]
CASES = [
    ("infonce", ["loss.name=infonce"]),
    ("gamma-ema", ["loss.name=gamma", "loss.options={estimator: ema}"]),
    ("gamma-memory", ["loss.name=gamma", "loss.options={estimator: memory}"]),
    ("sogclr", ["loss.name=sogclr"]),
    # augmented views, in-modal terms with their own state, and a regulariser
    ("regularized", ["loss.name=gamma", "loss.options={estimator: ema}", "loss.in_modal=true",
                     "regularizers=[{name: consistency}]"]),
    ("grad-cache", ["loss.name=infonce", "train.grad_cache_chunk=3"]),  # 8 rows a rank: chunks of 3, 3, 2
]
BF16 = ("bf16", ["loss.name=gamma", "loss.options={estimator: ema}", "train.precision=bf16"])  # autocast, loss in float32


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _close(got: dict, want: dict, what: str, tolerance: float = 1e-9) -> None:
    assert got.keys() == want.keys(), what
    for key in want:
        if want[key].is_floating_point():
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=tolerance, msg=f"{what} {key}")
        else:
            assert torch.equal(got[key], want[key]), f"{what} {key}"


def _same(got: dict, want: dict, what: str) -> None:
    for key in want:
        assert torch.equal(got[key], want[key]), f"{what} {key} differs between the ranks"


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    start = time.perf_counter()
    mp.spawn(workers.run_cases, args=(2, _free_port(), [*CASES, BF16], str(out)), nprocs=2, join=True)
    print(f"2-process cases: {time.perf_counter() - start:.1f} s")
    return out


@pytest.mark.parametrize("name,overrides", CASES, ids=[name for name, _ in CASES])
def test_two_processes_equal_one(two_process_runs, tmp_path, name, overrides):
    ranks = [torch.load(two_process_runs / f"{name}-rank{r}.pt") for r in (0, 1)]
    single = workers.train_case([*overrides, f"output_dir={tmp_path / name}"])
    assert ranks[0]["step"] == single["step"] == 5
    assert ranks[0]["losses"] == pytest.approx(single["losses"], abs=1e-9)
    _close(ranks[0]["grads"], single["grads"], "gradient")  # DDP-averaged: not off by world_size
    _close(ranks[0]["model"], single["model"], "parameter")
    _close(ranks[0]["loss"], single["loss"], "loss state")
    # every rank holds the same parameters and the same per-sample state, bit for bit
    _same(ranks[1]["model"], ranks[0]["model"], "parameter")
    _same(ranks[1]["loss"], ranks[0]["loss"], "loss state")


def test_bf16_autocast_under_two_processes(two_process_runs, tmp_path):
    """bf16 autocast on the CPU under DDP: the same run as one process up to bf16 rounding of the
    towers (the loss is computed in float32 on the gathered features), identical on both ranks."""
    name, overrides = BF16
    ranks = [torch.load(two_process_runs / f"{name}-rank{r}.pt") for r in (0, 1)]
    single = workers.train_case([*overrides, f"output_dir={tmp_path / name}"])
    assert ranks[0]["losses"] == pytest.approx(single["losses"], abs=2e-2)
    assert ranks[0]["loss"]["base.log_z"].dtype == torch.float32
    _close(ranks[0]["model"], single["model"], "parameter", tolerance=2e-2)
    _same(ranks[1]["model"], ranks[0]["model"], "parameter")
    _same(ranks[1]["loss"], ranks[0]["loss"], "loss state")


def test_gradient_of_gathered_loss_is_not_scaled_by_world_size(two_process_runs, tmp_path):
    """The peers' bug: gather-with-gradient plus DDP's average leaves the gradient W times too large
    or small unless the loss is the global one on every rank; InfoNCE's gradient matches exactly."""
    ranks = [torch.load(two_process_runs / f"infonce-rank{r}.pt") for r in (0, 1)]
    single = workers.train_case(["loss.name=infonce", f"output_dir={tmp_path / 'ref'}"])
    for key, want in single["grads"].items():
        ratio = ranks[0]["grads"][key].norm() / want.norm()
        assert abs(float(ratio) - 1.0) < 1e-9, f"{key}: gradient norm ratio {float(ratio)}"


def test_checkpoint_resumes_under_one_and_two_processes(tmp_path):
    settings = ["loss.name=gamma", "loss.options={estimator: ema}"]
    whole = workers.train_case([*settings, "optim.max_steps=6", f"output_dir={tmp_path / 'whole'}"])
    workers.train_case([*settings, "optim.max_steps=3", f"output_dir={tmp_path / 'one'}"])  # 1 process -> resumed by 2
    mp.spawn(workers.run_resume, args=(2, _free_port(), settings, str(tmp_path)), nprocs=2, join=True)
    for name in ("two", "one"):  # saved by 2 resumed by 2; saved by 1 resumed by 2
        resumed = [torch.load(tmp_path / f"resumed-{name}-rank{r}.pt") for r in (0, 1)]
        assert resumed[0]["step"] == 6
        _close(resumed[0]["model"], whole["model"], f"{name} -> 2 processes: parameter")
        _close(resumed[0]["loss"], whole["loss"], f"{name} -> 2 processes: loss state")
        _same(resumed[1]["loss"], resumed[0]["loss"], "loss state")
    # saved by 2, resumed by 1
    alone = workers.train_case([*settings, "optim.max_steps=6", f"output_dir={tmp_path / 'two-copy'}"],
                               resume=str(tmp_path / "two-copy" / "checkpoint.pt"))
    _close(alone["model"], whole["model"], "2 -> 1 process: parameter")
    _close(alone["loss"], whole["loss"], "2 -> 1 process: loss state")
    assert alone["losses"] == pytest.approx(whole["losses"], abs=1e-9)  # the metrics log continues where it stopped


def _plait_train_nproc2(*overrides: str) -> subprocess.CompletedProcess:
    """``python -m plait train uci BASE... OVERRIDES... --nproc 2`` (torchrun's agent), one thread a worker."""
    command = [sys.executable, "-m", "plait", "train", "uci", *workers.BASE, *overrides, "--nproc", "2"]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_failing_rank_stops_the_job_with_its_error(tmp_path):
    """``plait train --nproc 2`` (torchrun's agent): rank 1 raises at its third step; the job ends
    within seconds, never hangs, and says which rank failed and why."""
    start = time.perf_counter()
    done = _plait_train_nproc2("optim.max_steps=8", f"output_dir={tmp_path / 'run'}", "--allow-import",
                               "model.a={name: 'tests.distributed_workers:FailingMLP', in_dim: 240, hidden: [32], out_dim: 24}")
    elapsed = time.perf_counter() - start
    assert done.returncode == 2, done.stderr[-2000:]
    assert "[rank 1] error: injected failure on rank 1" in done.stderr
    assert "rank 1 exited with code 2" in done.stderr
    assert elapsed < 120, f"the job took {elapsed:.0f} s to stop"


def test_finished_job_exits_zero_with_every_file_whole(tmp_path):
    """``plait train --nproc 2`` that finishes: its workers end through ``exit_now(0)`` (no
    interpreter shutdown), so the job's code is 0 and what rank 0 wrote is complete: the
    checkpoint at the last step, the exported weights, one metrics line per step, eval.json."""
    from plait.checkpoint import load_checkpoint, load_weights

    run = tmp_path / "run"
    done = _plait_train_nproc2(f"output_dir={run}")
    assert done.returncode == 0, done.stderr[-2000:]
    assert load_checkpoint(run / "checkpoint.pt")["progress"]["step"] == 5
    state, _ = load_weights(run / "model.safetensors")
    assert state and all(torch.isfinite(v).all() for v in state.values())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "split" not in r] == [1, 2, 3, 4, 5]
    assert "image_retrieval_recall@1" in json.loads((run / "eval.json").read_text())["metrics"]
    assert f"wrote {run}" in done.stdout


def test_exit_now_flushes_and_skips_exit_handlers():
    """A failed worker ends with its own code at once: what it printed (unflushed) arrives, and no
    atexit handler (nor any C++ destructor of a broken process group) runs after it."""
    script = ("import atexit, sys\nfrom plait.distributed import exit_now\n"
              "atexit.register(lambda: print('ATEXIT'))\n"
              "print('partial', end=''); sys.stderr.write('message')\nexit_now(7)\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (7, "partial", "message")


def test_teardown_destroys_the_group_only_after_a_finished_run(tmp_path):
    """After a failure the group is left (destroying it while a peer uses it aborts the process);
    ``finished=True`` meets at a barrier and destroys it. 2 spawned gloo processes."""
    mp.spawn(workers.run_teardown, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        assert (tmp_path / f"teardown-rank{rank}.txt").read_text() == "True False"


@pytest.mark.parametrize("world", [2, 4])
def test_sampler_shards_are_the_global_batches(world):
    """Rank r reads rows [r B/W, (r+1) B/W) of every global batch, from any resume position."""
    batch, size = 8, 50
    single = EpochSampler(size, seed=3)
    for start in (0, 16):
        single.set_position(2, start)
        order = list(single)
        shards = []
        for rank in range(world):
            sampler = EpochSampler(size, seed=3, rank=rank, world_size=world, batch_size=batch)
            sampler.set_position(2, start)
            shards.append(list(sampler))
            assert len(sampler) == len(shards[-1])
        share = batch // world
        steps = (size - start) // batch
        gathered = [item for step in range(steps) for shard in shards for item in shard[step * share:(step + 1) * share]]
        assert gathered == order[:steps * batch]


def test_batch_not_divisible_by_world_size_is_refused():
    with pytest.raises(ValueError, match="divisible by world_size=3"):
        EpochSampler(10, seed=0, rank=0, world_size=3, batch_size=8)


def test_fusion_model_trains_under_two_processes(tmp_path):
    """The fusion model through the same contract: its ITC over the gathered batch, so the queue
    and the momentum encoders (in its state_dict) stay identical on both ranks; ITM and MLM on each
    rank's own rows. The queue receives both ranks' rows: 4 steps x 8 global rows."""
    mp.spawn(workers.run_fusion, args=(2, _free_port(), [], str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"fusion-rank{r}.pt") for r in (0, 1)]
    assert ranks[0]["step"] == 4
    _same(ranks[1]["model"], ranks[0]["model"], "fusion state")
    filled = ranks[0]["model"]["queue.index"] >= 0
    assert int(filled.sum()) == 32 and int(ranks[0]["model"]["queue.ptr"]) == 32
    assert ranks[1]["metrics"] == ranks[0]["metrics"] and "text_retrieval_recall@1" in ranks[0]["metrics"]
    lines = (tmp_path / "fusion" / "metrics.jsonl").read_text().splitlines()
    assert sum('"split"' not in line for line in lines) == 4  # rank 0 alone logs


def test_batch_norm_tower_keeps_the_state_identical_on_every_rank(tmp_path):
    """A cnn tower (BatchNorm: on the CPU each rank's running statistics come from its own rows) with
    the exact estimator, which re-encodes the training set every step on every rank: the ranks take
    rank 0's buffers first, so the per-sample state stays the same on both."""
    overrides = ["data.options.image_size=16", "model.a={name: cnn, width: 4, out_dim: 16}", "model.b.out_dim=16",
                 "model.embed_dim=16", "loss.options={estimator: exact}", "optim.max_steps=3", "data.batch_size=8",
                 "data.augment={image: false, text: false}", "eval.tasks=[retrieval]", "eval.gallery=0", "train.device=cpu",
                 "train.progress=false", "train.checkpoint_every_epochs=0", "train.staleness_every_epochs=0"]
    mp.spawn(workers.run_cases, args=(2, _free_port(), [("cnn", overrides)], str(tmp_path), "emoji"), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"cnn-rank{r}.pt") for r in (0, 1)]
    assert ranks[0]["step"] == 3
    _same(ranks[1]["loss"], ranks[0]["loss"], "loss state")
    # the parameters are the same; each rank's last forward moved its own running statistics (the
    # next forward, or a refresh, would give it rank 0's again)
    _same(ranks[1]["grads"], ranks[0]["grads"], "gradient")
    _same({k: v for k, v in ranks[1]["model"].items() if "running" not in k and "num_batches" not in k},
          {k: v for k, v in ranks[0]["model"].items() if "running" not in k and "num_batches" not in k}, "parameter")


def test_nproc_checks_the_run_directory_before_starting_workers(tmp_path, capsys):
    """`plait train --nproc 2` into a directory holding another run: one line from the launcher,
    no worker started."""
    from plait.cli import main

    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(b"")
    assert main(["train", "uci", f"output_dir={run}", "--nproc", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("already holds a run") == 1 and "[rank" not in err


def test_nproc_must_be_positive(capsys):
    from plait.cli import main

    assert main(["train", "uci", "output_dir=/nonexistent-plait-run", "--nproc", "0"]) == 2
    assert "--nproc=0 must be a positive number of processes" in capsys.readouterr().err


def test_fusion_refuses_the_gradient_cache():
    from plait.config import load_config
    from plait.training import Trainer

    with pytest.raises(ValueError, match="train.grad_cache_chunk is for two-tower models"):
        Trainer(load_config("fusion", ["train.grad_cache_chunk=8", "data.options.image_size=16",
                                       "model.fusion={preset: tiny, image_size: 16}"]))
