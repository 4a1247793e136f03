"""Data parallelism over `torch.distributed`, launched by torchrun / accelerate / srun.

Every rank builds the same global batches (same seed, same bucketing) and trains on its own
contiguous slice of each, so the global batch and the data order equal a single-process run's;
DDP averages the slices' gradients, which equals the full batch's mean-loss gradient when the
slices are equally sized. Rank 0 alone writes logs, checkpoints and artifacts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from budgetlora.errors import BudgetLoraError

_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = DistContext()


def context_from_env(environ: Optional[dict[str, str]] = None) -> DistContext:
    """The launch environment as torchrun sets it; an inconsistent one is refused up front."""
    env = os.environ if environ is None else environ
    present = {k: env.get(k) for k in _ENV if env.get(k) not in (None, "")}
    if not present:
        return SINGLE
    missing = [k for k in _ENV if k not in present]
    if missing:
        raise BudgetLoraError(
            f"inconsistent launch environment: {', '.join(present)} set but {', '.join(missing)} "
            "missing; launch with `torchrun --nproc_per_node N -m budgetlora train CONFIG`"
        )
    try:
        rank, world, local = (int(present[k]) for k in _ENV)
    except ValueError:
        raise BudgetLoraError(f"inconsistent launch environment: non-integer value in {present}") from None
    if world < 1 or not 0 <= rank < world or not 0 <= local < world:
        raise BudgetLoraError(f"inconsistent launch environment: RANK={rank}, LOCAL_RANK={local}, WORLD_SIZE={world}")
    if world > 1 and not (env.get("MASTER_ADDR") and env.get("MASTER_PORT")):
        raise BudgetLoraError(
            "inconsistent launch environment: WORLD_SIZE > 1 but MASTER_ADDR/MASTER_PORT unset; "
            "use torchrun (or set them as torchrun would)"
        )
    return DistContext(rank, world, local)


def check_batch_divides(batch_size: int, ctx: DistContext) -> None:
    if ctx.enabled and batch_size % ctx.world_size:
        raise BudgetLoraError(
            f"config key 'train.batch_size': {batch_size} is the global batch and must be divisible "
            f"by the {ctx.world_size} processes, so every rank gets an equal slice"
        )


def init_process_group(ctx: DistContext, device: torch.device) -> None:
    if not ctx.enabled or torch.distributed.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(ctx.local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    torch.distributed.init_process_group(backend=backend, rank=ctx.rank, world_size=ctx.world_size)


def destroy_process_group(ctx: DistContext) -> None:
    if ctx.enabled and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def device_for(ctx: DistContext, device: torch.device) -> torch.device:
    if ctx.enabled and device.type == "cuda":
        return torch.device("cuda", ctx.local_rank)
    return device


def local_slice(index: np.ndarray, ctx: DistContext) -> np.ndarray:
    """This rank's contiguous share of a global batch."""
    if not ctx.enabled:
        return index
    return np.array_split(index, ctx.world_size)[ctx.rank]


def wrap_model(model: torch.nn.Module, ctx: DistContext, device: torch.device) -> torch.nn.Module:
    """DDP over the trainable parameters: frozen ones get no gradient buckets and no all-reduce."""
    if not ctx.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)


def all_reduce_sum(values: list[float], ctx: DistContext, device: torch.device) -> list[float]:
    if not ctx.enabled:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(tensor)
    return tensor.tolist()


def broadcast(obj: Any, ctx: DistContext) -> Any:
    """Rank 0's value of `obj` on every rank (e.g. the run directory it chose)."""
    if not ctx.enabled:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def gather_rows(index: np.ndarray, rows: np.ndarray, total: int, ctx: DistContext) -> np.ndarray:
    """Reassemble per-rank rows (`rows[i]` belongs to global row `index[i]`) in the original order."""
    if not ctx.enabled:
        out = np.empty((total,) + rows.shape[1:], dtype=rows.dtype)
        out[index] = rows
        return out
    parts: list[Any] = [None] * ctx.world_size
    torch.distributed.all_gather_object(parts, (index, rows))
    width = next(r.shape[1:] for i, r in parts if len(i))
    out = np.empty((total,) + tuple(width), dtype=rows.dtype)
    for part_index, part_rows in parts:
        if len(part_index):
            out[part_index] = part_rows
    return out


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        torch.distributed.barrier()
