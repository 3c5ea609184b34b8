"""Process-group set-up and the few collectives the trainer uses.

Under torchrun (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set) every process joins one group: NCCL with
one GPU per process (``cuda:LOCAL_RANK``) when CUDA is available, gloo on CPU otherwise. Multi-node
works through torchrun's c10d rendezvous; nothing here is node-specific. Without torchrun the same
code runs as a single process and every collective below is a no-op.
"""

from __future__ import annotations

import datetime
import itertools
import os
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in the job."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str | None  # None: single process, no process group

    @property
    def is_main(self) -> bool:
        """True on the one process that writes files and logs."""
        return self.rank == 0


def init_distributed(timeout_s: float = 600.0) -> DistInfo:
    """Join the torchrun process group if there is one; pick the device."""
    if "RANK" not in os.environ:
        device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        return DistInfo(0, 0, 1, device, None)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) visible: "
                "start at most one process per GPU (torchrun --nproc_per_node)"
            )
        device, backend = torch.device("cuda", local_rank), "nccl"
        torch.cuda.set_device(device)
    else:
        device, backend = torch.device("cpu"), "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    dist.init_process_group(backend, store=_restart_safe_store(world, timeout), rank=rank, world_size=world,
                            timeout=timeout, device_id=device if backend == "nccl" else None)
    return DistInfo(rank, local_rank, world, device, backend)


_GROUPS = itertools.count()  # process groups made by this process: each gets fresh keys in the store


def _restart_safe_store(world: int, timeout: datetime.timedelta) -> dist.Store | None:
    """torchrun's store under a prefix of the restart and of the process group (one process may make several
    in turn: ``dist_train.protocol`` under torchrun trains and evaluates each split in its own); None (plain
    env://) when torchrun shares no store.

    torchrun 2.14 hands every restart round (``--max-restarts``) the same agent TCPStore, keys of the
    dead round included, and the new round's process group reads the dead peers' addresses and hangs
    in init. ``TORCHELASTIC_RESTART_COUNT`` is the same for all workers of one agent, so single-node
    restarts work; with several nodes only the failing node's agent counts the restart, so multi-node
    jobs that restart should run torchrun with ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` (a fresh store
    per round; this function then returns None).
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    base = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                         timeout=timeout)
    return dist.PrefixStore(f"dist_train/restart_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
                            f"group_{next(_GROUPS)}", base)


def cleanup() -> None:
    """Destroy the process group (safe to call when none exists)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier(info: DistInfo) -> None:
    """Wait for every rank."""
    if _active():
        dist.barrier(device_ids=[info.device.index] if info.backend == "nccl" else None)


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce with ``sum`` or ``max``; returns the tensor."""
    if _active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return tensor


def all_gather_object(obj: Any) -> list:
    """Every rank's ``obj``, in rank order (a one-element list without a process group)."""
    if not _active():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` as rank ``src`` has it."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def seed_everything(seed: int, rank: int) -> None:
    """Seed Python, NumPy and torch for this rank (ranks differ, runs repeat)."""
    s = seed * 1000 + rank
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


def max_replica_difference(model: torch.nn.Module) -> float:
    """Largest |parameter - rank 0's parameter| over all ranks (0.0 means replicas are identical)."""
    if not _active():
        return 0.0
    flat = torch.cat([p.detach().reshape(-1).float() for p in model.parameters()])
    ref = flat.clone()
    dist.broadcast(ref, src=0)
    diff = (flat - ref).abs().max().reshape(1)
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return float(diff.item())
