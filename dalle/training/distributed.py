"""Data-parallel training across processes started by ``torchrun``: DDP or fully sharded (FSDP).

The paper trained its 12-billion-parameter transformer data-parallel with its parameters
sharded across GPUs (Ramesh et al. 2021, section 2.5).  This module is what a training
loop needs to run unchanged on one process or on ``N`` under::

    torchrun --nproc_per_node=N -m dalle.cli train transformer --data DIR --out DIR

The contract, which makes an ``N``-process run follow the same loss curve as a
one-process run with the same global batch:

* every rank draws the *same* global batch of step ``s`` from ``(seed, s)`` and keeps its
  contiguous slice (:func:`shard_batch_indices`);
* gradients are averaged across ranks (DDP's all-reduce, FSDP's reduce-scatter), and each
  rank's loss is scaled so the average equals the gradient of the whole batch's loss;
* every rank therefore holds the same weights (DDP) or its shard of them (FSDP), and the
  weight average (EMA) is updated identically from them;
* rank 0 alone writes checkpoints, logs, sample grids and the exported model; the others
  wait at a barrier.  Checkpoints hold full, unsharded tensors in the one-process layout,
  so a run may resume at any world size and with either strategy.

Not under ``torchrun`` (no ``WORLD_SIZE`` in the environment, or ``WORLD_SIZE=1``)
everything here is a no-op: :func:`init_distributed` returns a one-process
:class:`DistInfo` and :func:`wrap_model` returns the model itself.

Backends: NCCL on CUDA (each rank on ``cuda:LOCAL_RANK``), Gloo on the CPU.  FSDP uses
PyTorch's per-parameter sharding (``torch.distributed.fsdp.fully_shard``, "FSDP2"), which
also runs on the CPU with Gloo; where it is missing the loop falls back to DDP with a
warning.
"""

from __future__ import annotations

import atexit
import inspect
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterator, Sequence, TypeVar

import torch
import torch.distributed as dist
from torch import nn

STRATEGIES = ("ddp", "fsdp")
T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in the job.  ``is_main``: the rank that writes files."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when there are other ranks to talk to (a process group is up)."""
        return self.world_size > 1


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer (set by torchrun)") from None


def launched_by_torchrun() -> bool:
    """Whether the environment describes a multi-process job (``torchrun`` sets these)."""
    world = _env_int("WORLD_SIZE")
    return world is not None and world > 1


def init_distributed(device: str | torch.device | None = None, timeout_minutes: float = 30.0) -> DistInfo:
    """Join the job ``torchrun`` started (idempotent), or describe the lone process.

    ``device``: ``"cuda"`` (or None with a GPU present) gives each rank ``cuda:LOCAL_RANK``
    and the NCCL backend; ``"cpu"`` gives Gloo.  ``timeout_minutes`` bounds how long a
    rank waits for the others at a collective -- rank 0 may spend minutes writing sample
    grids or the export while the others wait at a barrier.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if not (launched_by_torchrun() or (dist.is_available() and dist.is_initialized())):
        return DistInfo(device=device)
    if not dist.is_available():
        raise RuntimeError("this PyTorch build has no torch.distributed; run a single process instead of torchrun")

    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = _env_int("LOCAL_RANK")
        local_rank = rank % max(torch.cuda.device_count(), 1) if local_rank is None else local_rank
    else:
        rank, world, local_rank = _env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK")
        missing = [n for n, v in (("RANK", rank), ("WORLD_SIZE", world), ("LOCAL_RANK", local_rank)) if v is None]
        missing += [n for n in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(n)]
        if missing:
            raise RuntimeError(f"WORLD_SIZE>1 but {', '.join(missing)} not set: start the job with torchrun "
                               "(torchrun --nproc_per_node=N -m dalle.cli train ...)")
    assert rank is not None and world is not None and local_rank is not None

    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device cuda asked for, but no CUDA GPU is visible; use --device cpu")
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPUs are visible: "
                               "start at most one process per GPU (--nproc_per_node)")
        if device.index is not None and device.index != local_rank and world > 1:
            warnings.warn(f"device {device} ignored: rank {rank} uses cuda:{local_rank} (one GPU per process)",
                          stacklevel=2)
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"

    if not dist.is_initialized():
        kwargs: dict[str, Any] = {"backend": backend, "timeout": timedelta(minutes=timeout_minutes)}
        if backend == "nccl":
            kwargs["device_id"] = device  # binds the communicator to this rank's GPU up front
        try:
            dist.init_process_group(**kwargs)
        except TypeError:  # an older PyTorch without device_id
            kwargs.pop("device_id", None)
            dist.init_process_group(**kwargs)
        atexit.register(shutdown_distributed)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=device)


def shutdown_distributed() -> None:
    """Leave the process group (registered at exit by :func:`init_distributed`)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# --- batches ---------------------------------------------------------------------------------


def shard_bounds(total: int, info: DistInfo) -> tuple[int, int]:
    """``(start, stop)`` of this rank's contiguous share of ``total`` items (equal shares required)."""
    if total % info.world_size:
        raise ValueError(f"the global batch of {total} does not split evenly over {info.world_size} processes: "
                         f"use a batch size divisible by {info.world_size}")
    per = total // info.world_size
    return info.rank * per, (info.rank + 1) * per


def shard_batch_indices(global_indices: Sequence[T] | torch.Tensor, info: DistInfo) -> Sequence[T] | torch.Tensor:
    """This rank's contiguous slice of the global batch ``global_indices`` (the same on every rank).

    Rank ``r`` of ``W`` keeps items ``[r * B / W, (r + 1) * B / W)``; the concatenation over
    ranks is the global batch, in order.
    """
    start, stop = shard_bounds(len(global_indices), info)
    return global_indices[start:stop]


# --- collectives (no-ops on one process) -----------------------------------------------------


def barrier(info: DistInfo) -> None:
    if info.distributed:
        if info.device.type == "cuda":
            dist.barrier(device_ids=[info.device.index])
        else:
            dist.barrier()


def all_reduce_sum(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum of ``tensor`` over ranks (in place, also returned)."""
    if info.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True on every rank when ``flag`` is True on any: a decision all ranks must share (stop now)."""
    if not info.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def broadcast_object(obj: T, info: DistInfo, src: int = 0) -> T:
    """Rank ``src``'s ``obj`` on every rank (a small picklable value: a step count, a flag)."""
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=info.device if info.device.type == "cuda" else None)
    return box[0]


@contextmanager
def main_process_first(info: DistInfo) -> Iterator[None]:
    """Rank 0 runs the body first, the others after it finishes (build a cache once, then read it)."""
    if not info.is_main:
        barrier(info)
    try:
        yield
    finally:
        if info.is_main:
            barrier(info)


# --- wrapping --------------------------------------------------------------------------------


def _fully_shard() -> Any:
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        try:
            from torch.distributed._composable.fsdp import fully_shard
        except ImportError:
            return None
    return fully_shard


def resolve_strategy(strategy: str, info: DistInfo) -> str:
    """``strategy`` after checking it and what this PyTorch supports ("ddp" when FSDP2 is missing)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if strategy == "fsdp" and info.distributed and _fully_shard() is None:
        warnings.warn("this PyTorch has no torch.distributed.fsdp.fully_shard: training with DDP instead of FSDP "
                      "(same results, unsharded parameters)", stacklevel=2)
        return "ddp"
    return strategy


def wrap_model(
    model: nn.Module, info: DistInfo, strategy: str = "ddp", units: Sequence[nn.Module] | None = None,
    broadcast_buffers: bool = True,
) -> nn.Module:
    """``model`` ready for data-parallel training; itself on one process.

    ``ddp``: every rank keeps all the weights and gradients are all-reduced (rank 0's
    initial weights are broadcast, so the replicas start equal).  ``fsdp``: each rank keeps
    a shard of every parameter, gathered layer by layer for the forward and backward and
    reduce-scattered after; ``units`` are the modules gathered one at a time (the
    transformer's blocks; default: ``model.blocks`` if it has them), the rest is one unit
    with the root.  Parameters must be on ``info.device`` already.  Train through the
    returned module's ``forward`` (the hooks that average gradients live there); keep the
    original ``model`` for checkpoints (see :func:`full_state_dict`).

    ``broadcast_buffers`` (DDP): True, DDP's default, copies rank 0's buffers to every rank
    at the start of each forward.  False copies them once, here, and then leaves each rank
    its own: for buffers the model itself keeps equal on all ranks (the dVAE's VQ codebook,
    updated in forward from statistics summed over ranks), where a broadcast would be
    redundant and would hide a drift from :func:`check_replicas_identical`.
    """
    strategy = resolve_strategy(strategy, info)
    if not info.distributed:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [info.device.index] if info.device.type == "cuda" else None
        kwargs: dict[str, Any] = {}
        if not broadcast_buffers:
            if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
                kwargs["forward_sync_buffers"] = False  # PyTorch >= 2.13: buffers still synced at construction
            else:  # older: broadcast_buffers=False also skips the sync at construction, so sync them here
                for buffer in model.buffers():
                    dist.broadcast(buffer.data, src=0)
                kwargs["broadcast_buffers"] = False
        return DistributedDataParallel(model, device_ids=device_ids, **kwargs)
    fully_shard = _fully_shard()
    if units is None:
        units = list(getattr(model, "blocks", []))
    # Equal start on every rank: shard rank 0's weights (a seed mismatch must not split the replicas).
    for tensor in list(model.parameters()) + list(model.buffers()):
        dist.broadcast(tensor.data, src=0)
    for unit in units:
        fully_shard(unit)
    fully_shard(model)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (an FSDP2 module is its own inner module)."""
    return model.module if hasattr(model, "no_sync") and hasattr(model, "module") else model


@contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce in this backward when ``enabled`` is False (micro-batches but the last)."""
    if enabled:
        yield
    elif hasattr(model, "no_sync"):  # DDP
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:  # a plain module on one process: nothing to skip
        yield


# --- full (unsharded) state for checkpoints ---------------------------------------------------


def _is_dtensor(t: Any) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - very old PyTorch
        return False
    return isinstance(t, DTensor)


def _full(t: torch.Tensor) -> torch.Tensor:
    """A full CPU copy of ``t`` (gathered from the shards of a DTensor: a collective)."""
    if _is_dtensor(t):
        t = t.full_tensor()
    return t.detach().to("cpu", copy=True)


def is_sharded(model: nn.Module) -> bool:
    return any(_is_dtensor(p) for p in model.parameters())


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with full CPU tensors, in the one-process layout.

    With FSDP the shards are gathered: every rank must call this, in the same order.
    """
    return {k: _full(v) for k, v in unwrap(model).state_dict().items()}


@torch.no_grad()
def load_full_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Fill ``model`` (plain, DDP or FSDP-sharded) from a full state dict; every rank passes the same one."""
    model = unwrap(model)
    if not is_sharded(model):
        model.load_state_dict(state)
        return
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise KeyError(f"state dict does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, target in own.items():
        _copy_full_into(target, state[name])


def _copy_full_into(target: torch.Tensor, full: torch.Tensor) -> None:
    if tuple(full.shape) != tuple(target.shape):
        raise ValueError(f"tensor of shape {tuple(full.shape)} cannot fill one of shape {tuple(target.shape)}")
    if _is_dtensor(target):
        from torch.distributed.tensor import distribute_tensor

        local = distribute_tensor(full.to(target.device, target.dtype), target.device_mesh, target.placements)
        target.to_local().copy_(local.to_local())
    else:
        target.copy_(full)


def _optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def full_optimizer_state_dict(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` with full CPU tensors in place of sharded ones (a collective under FSDP)."""
    state = optimizer.state_dict()
    return {
        "state": {pid: {k: _full(v) if isinstance(v, torch.Tensor) else v for k, v in entries.items()}
                  for pid, entries in sorted(state["state"].items())},
        "param_groups": state["param_groups"],
    }


def load_full_optimizer_state_dict(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a full optimizer state dict (from any world size) into an optimizer over sharded or plain parameters."""
    params = _optimizer_params(optimizer)
    converted: dict[int, dict[str, Any]] = {}
    for pid, entries in state["state"].items():
        p = params[int(pid)]
        converted[int(pid)] = {}
        for k, v in entries.items():
            if isinstance(v, torch.Tensor) and _is_dtensor(p) and tuple(v.shape) == tuple(p.shape):
                from torch.distributed.tensor import distribute_tensor

                v = distribute_tensor(v.to(p.device, p.dtype), p.device_mesh, p.placements)
            converted[int(pid)][k] = v
    optimizer.load_state_dict({"state": converted, "param_groups": state["param_groups"]})


class StateHolder:
    """Holds a state dict for :class:`dalle.training.state.Checkpointer` (which only calls these two methods).

    Saving: wrap a gathered full state dict.  Loading: the checkpointer's ``load_state_dict``
    call leaves the dict in :attr:`state` for the caller to shard.
    """

    def __init__(self, state: dict[str, Any] | None = None):
        self.state = state

    def state_dict(self) -> dict[str, Any]:
        if self.state is None:
            raise RuntimeError("StateHolder is empty")
        return self.state

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        self.state = state


class ShardedEMA:
    """Exponential moving average of a sharded (FSDP) model's weights, kept as shards too.

    Each rank averages its own shard of every parameter; the full average is gathered only
    to evaluate, checkpoint or export it (:meth:`state_dict`, a collective).  For a plain or
    DDP model use :class:`dalle.training.state.EMA`, which keeps a whole copy.
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        model = unwrap(model)
        self.names = [name for name, _ in model.named_parameters()]
        self.shadow = [p.detach().clone() for _, p in model.named_parameters()]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        params = [p.detach() for p in unwrap(model).parameters()]
        local = [s.to_local() if _is_dtensor(s) else s for s in self.shadow]
        torch._foreach_lerp_(local, [p.to_local() if _is_dtensor(p) else p for p in params], 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The full averaged weights as CPU tensors (every rank must call it)."""
        return {name: _full(s) for name, s in zip(self.names, self.shadow)}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = sorted(set(self.names) - set(state))
        if missing:
            raise KeyError(f"EMA state lacks {missing[:5]}")
        for name, s in zip(self.names, self.shadow):
            _copy_full_into(s, state[name])


# --- consistency -----------------------------------------------------------------------------


@torch.no_grad()
def fingerprint(module: nn.Module) -> torch.Tensor:
    """Per-tensor (sum, sum of squares) in float64: equal on two replicas iff (almost surely) equal weights."""
    values = []
    for t in unwrap(module).state_dict().values():
        t = t.detach().to(torch.float64)
        values += [t.sum(), (t * t).sum()]
    return torch.stack(values) if values else torch.zeros(0, dtype=torch.float64)


def check_replicas_identical(module: nn.Module, info: DistInfo, what: str = "model") -> None:
    """Raise if the ranks' copies of ``module`` differ at all (replicated training only, not FSDP)."""
    if not info.distributed:
        return
    mine = fingerprint(module).to(info.device)
    gathered = [torch.empty_like(mine) for _ in range(info.world_size)]
    dist.all_gather(gathered, mine)
    for r, other in enumerate(gathered):
        if not torch.equal(other, mine):
            raise RuntimeError(f"the {what} on rank {r} differs from rank {info.rank}'s: the replicas have drifted "
                               "apart (non-deterministic kernels or a rank-dependent step)")
