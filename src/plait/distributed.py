"""torch.distributed in one place: the process group, the gathered features, the rank-0 rule.

plait trains under torchrun (``torchrun --nproc_per_node=N -m plait train CONFIG`` or ``plait
train CONFIG --nproc N``, which starts torchrun's elastic agent). What distributed training
changes, and where:

- **Data** (``plait.data.sampler.EpochSampler``): ``data.batch_size`` is the *global* batch B;
  rank r reads rows [r B/W, (r+1) B/W) of every global batch of the seeded epoch order, so the
  gathered batch is, row for row, the batch a single process would have read.
- **Features** (:func:`gather_features`, called by ``plait.models.contract.apply_objective``,
  the one feature path of every model): each rank's (B/W, d) features are all-gathered *with
  gradient* (``torch.distributed.nn.functional.all_gather``) together with their dataset
  indices; every rank then evaluates the loss on the same global batch, so the per-sample state
  (gamma loss, SogCLR, memory bank) receives the same writes on every rank.
- **Gradient scale**: every rank computes the same global loss L; the backward of the gather
  sums the W ranks' identical gradients (W dL/dz_r for rank r's rows) and DDP averages the
  parameter gradients over the W ranks, so each parameter receives exactly dL/dtheta: not W times
  it (the peers' bug). Terms a model computes on its own rows only (the fusion model's ITM and
  MLM, means over B/W rows) are averaged by DDP into the global mean.
- **Writes**: rank 0 alone writes files (config, metrics, checkpoints, weights, evaluations,
  reports); the other ranks wait for it at the next collective.

Failure: torchrun's agent stops every worker when one exits with an error; collectives carry a
timeout (``train.dist_timeout_s``) so that a rank blocked on a dead peer ends too, never hangs.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import fields, replace

import torch
import torch.distributed as dist
from torch import Tensor

DEFAULT_TIMEOUT_S = 1800.0  # train.dist_timeout_s's default (torch's own for gloo)


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher setting WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    """Whether a process group of more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank in the process group (0 outside one)."""
    return dist.get_rank() if active() else 0


def world_size() -> int:
    """The number of ranks W in the process group (1 outside one)."""
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Whether this process writes files (rank 0, or the only process)."""
    return rank() == 0


def local_rank() -> int:
    """This process's rank on its machine, from torchrun's LOCAL_RANK (0 when unset): its CUDA device."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def init(device: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """Join the process group torchrun described in the environment (RANK, WORLD_SIZE,
    MASTER_ADDR, ...): NCCL when this rank uses CUDA, else gloo. Returns False (nothing done)
    outside a launcher or when a group already exists. ``device`` is ``train.device``."""
    if not launched() or (dist.is_available() and dist.is_initialized()):
        return False
    if not dist.is_available():
        raise ValueError("this torch build has no torch.distributed; run without torchrun")
    cuda = torch.cuda.is_available() and device in ("auto", "cuda") or str(device).startswith("cuda")
    if cuda:
        torch.cuda.set_device(local_rank())
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=float(timeout_s)))
    return True


def teardown(finished: bool = False) -> None:
    """Leave the process group when ``finished`` (every rank got here normally): the ranks meet at
    a barrier, then each destroys its group. After a failure the group is left as it is: gloo
    aborts a process (SIGABRT) that destroys its group while a peer still uses it, and a rank
    that destroys its group first makes its peers fail before it has exited with its own error.
    The process ends without destructors instead (:func:`exit_now`, as ``plait`` does)."""
    if finished and dist.is_available() and dist.is_initialized():
        if active():
            dist.barrier()
        dist.destroy_process_group()


def exit_now(code: int) -> None:
    """End this worker at once with ``code``: stdout and stderr flushed, no atexit handlers, no
    interpreter finalisation and no C++ destructors (a gloo/NCCL group, broken or not, can abort or
    hang in them). The kernel closes the sockets, so peers see this rank stop only after its
    message is written and its code set. Call it only when every file has been written and closed."""
    import sys

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can be said
            pass
    os._exit(code)


def device_for_rank(device: torch.device) -> torch.device:
    """Under torchrun each rank takes the GPU of its LOCAL_RANK (``cuda`` without an index)."""
    if active() and device.type == "cuda" and device.index is None:
        return torch.device("cuda", local_rank())
    return device


def local_batch_size(global_batch: int) -> int:
    """B / W rows per rank; a ValueError when the global batch does not split evenly."""
    world = world_size()
    if global_batch % world:
        raise ValueError(f"data.batch_size={global_batch} (the global batch) must be a multiple of the {world} processes")
    return global_batch // world


def local_rows(global_size: int) -> slice:
    """This rank's rows of a gathered (global) batch of ``global_size`` rows."""
    size = global_size // world_size()
    return slice(rank() * size, (rank() + 1) * size)


def gather(tensor: Tensor) -> Tensor:
    """All ranks' ``tensor`` concatenated along dim 0 in rank order; with gradient when the
    tensor needs one (the backward sums every rank's gradient of this rank's rows)."""
    if not active():
        return tensor
    if tensor.requires_grad:
        import warnings

        from torch.distributed.nn.functional import all_gather

        # deprecated in torch 2.13 for _functional_collectives.all_gather_single, whose backward is a
        # reduce-scatter that gloo lacks; this one's backward runs on gloo (all-to-all) and NCCL alike
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return torch.cat(all_gather(tensor.contiguous()))
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def gather_features(features):
    """A ``PairFeatures`` of the global batch: every (B/W, d) field and the index gathered (see
    :func:`gather`); the logit scale is one number, the same on every rank. Already gathered
    features (``gathered=True``) and a single process are returned as they are."""
    if not active() or getattr(features, "gathered", False):
        return features
    local = features.index.shape[0] if features.index is not None else features.a.shape[0]
    changes = {}
    for field in fields(features):
        value = getattr(features, field.name)
        if field.name != "logit_scale" and torch.is_tensor(value) and value.dim() >= 1 and value.shape[0] == local:
            changes[field.name] = gather(value)
    return replace(features, **changes, gathered=True)


def all_mean(values: list[float]) -> list[float]:
    """The means over ranks of numbers (logged loss terms), in one all-reduce; the numbers
    themselves in one process."""
    if not active() or not values:
        return [float(v) for v in values]
    tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(tensor)
    return (tensor / world_size()).tolist()


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` holds on some rank (every rank gets the same answer)."""
    if not active():
        return bool(flag)
    tensor = torch.tensor(1 if flag else 0, dtype=torch.int32, device=_collective_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor)


def all_objects(value) -> list:
    """Every rank's ``value`` (a random state: tensors and plain values), in rank order."""
    if not active():
        return [value]
    out = [None] * world_size()
    dist.all_gather_object(out, value)
    return out


def broadcast_error(message: str | None) -> str | None:
    """Rank 0's ``message`` on every rank (None: no error): rank 0 alone checks the run directory
    and writes files, and the others must stop when it cannot."""
    if not active():
        return message
    box = [message]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    """Wait until every rank gets here (nothing outside a process group)."""
    if active():
        dist.barrier()


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def has_batch_norm(module: torch.nn.Module) -> bool:
    """Whether any submodule of ``module`` is a BatchNorm layer (its running statistics are buffers
    that DDP must keep in sync)."""
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in module.modules())


def wrap(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``module`` under DistributedDataParallel (one device per rank), or as it is in one
    process. Parameters are broadcast from rank 0 at construction; with BatchNorm its buffers
    too, at every forward (without, the buffers, e.g. a fusion queue, are identical by
    construction and sending them would cost a queue's size per step)."""
    if not active():
        return module
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    # torch 2.13 renamed broadcast_buffers (deprecated) to forward_sync_buffers
    key = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
           else "broadcast_buffers")
    return DistributedDataParallel(module, device_ids=ids, **{key: has_batch_norm(module)})


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Every floating buffer of ``module`` set to rank 0's (BatchNorm's running statistics, which
    on the CPU each rank updates from its own rows), before a pass every rank must make alike."""
    if not active():
        return
    for buffer in module.buffers():
        if buffer.is_floating_point():
            dist.broadcast(buffer.data, src=0)


class TrainingStep(torch.nn.Module):
    """A model's contract step as a ``forward``, so that DDP wraps the one training step:
    ``forward(batch, objective)`` is ``model.training_step(batch, objective)`` and
    ``forward(batch, None)`` is ``model.contrastive_features(batch)`` (the gradient cache's
    recomputation). Its parameters are the model's."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch, objective):
        if objective is None:
            return self.model.contrastive_features(batch)
        return self.model.training_step(batch, objective)


def launched_rank() -> int:
    """This worker's RANK as its launcher set it (0 outside a launcher), group or no group."""
    return int(os.environ.get("RANK", "0"))


def launch_local(nproc: int, program: str, arguments: list[str], monitor_interval_s: float = 0.5) -> tuple[int, int] | None:
    """Run ``program arguments`` as ``nproc`` workers on this machine under torchrun's elastic
    agent (``torchrun --standalone --nproc_per_node=nproc``; no restarts). Returns None when
    every worker succeeded, else (rank, exit code) of the first that failed; the agent stops the
    other workers as soon as one fails."""
    import uuid

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if nproc > 1 and "OMP_NUM_THREADS" not in os.environ:  # as torchrun does: no more threads than cores
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0,
                          monitor_interval=monitor_interval_s, start_method="spawn")
    try:
        elastic_launch(config, program)(*arguments)
    except ChildFailedError as error:
        # the cause, not its echoes: a worker that exited with its own error comes before one that
        # stopped because a peer died (PEER_STOPPED) and one the agent killed (a negative code)
        def cause_first(item):
            code = item[1].exitcode
            # own error; killed by a signal (OOM, segfault) but not the agent's SIGTERM; peer stopped; SIGTERM
            order = (0 if code > 0 and code != PEER_STOPPED else 1 if code < 0 and code != -15
                     else 2 if code == PEER_STOPPED else 3)
            return order, item[1].timestamp, item[0]

        rank, failure = min(error.failures.items(), key=cause_first)
        return rank, failure.exitcode
    return None


PEER_STOPPED = 3  # the exit code of a worker whose collective failed because another rank stopped
_PEER_SIGNS = ("gloo", "nccl", "processgroup", "c10d", "closed by peer", "reset by peer")  # torch.distributed's messages


def peer_failure(error: BaseException) -> bool:
    """Whether ``error`` is a collective that failed because another rank stopped (or hung past
    ``train.dist_timeout_s``) rather than a fault of this rank."""
    text = str(error).lower()
    return isinstance(error, RuntimeError) and launched() and any(sign in text for sign in _PEER_SIGNS)
