"""Process-wide policy every stage shares: device, precision, seeding, memory readings, the
quieting of third-party loggers, and the one setup (threads, launch environment, device, process
group) that training, resuming and prediction run inside."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import re
import resource
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from budgetlora.config.schema import DEVICE_PATTERN
from budgetlora.distributed import (SINGLE, DistContext, check_batch_divides, context_from_env,
                                    destroy_process_group, device_for, init_process_group)
from budgetlora.errors import BudgetLoraError

@dataclass(frozen=True)
class Runtime:
    """Where and how this process computes."""

    device: torch.device
    precision: str  # fp32, bf16 or fp16
    dist: DistContext = SINGLE


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def resolve_device(name: str) -> torch.device:
    if not re.fullmatch(DEVICE_PATTERN, name):
        raise BudgetLoraError(f"device {name!r}: expected auto, cpu, cuda, cuda:N or mps")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise BudgetLoraError(f"device '{name}' requested but no CUDA device is available")
        index = torch.device(name).index
        if index is not None and index >= torch.cuda.device_count():
            raise BudgetLoraError(f"device '{name}': this machine has {torch.cuda.device_count()} CUDA device(s)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise BudgetLoraError("device 'mps' requested but MPS is not available")
    return torch.device(name)


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise BudgetLoraError("precision bf16: this GPU does not support bf16; use fp16 or fp32")
    return precision


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision in ("bf16", "fp16") and device.type in ("cuda", "cpu"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(device_type=device.type, dtype=dtype)
    return contextlib.nullcontext()


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: writing 5 to clear_refs resets VmHWM, the peak resident set size
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: max allocated since the last reset; CPU: peak resident memory of this process (since
    the last reset where the kernel allows it, else since start)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        match = re.search(r"VmHWM:\s+(\d+)\s+kB", Path("/proc/self/status").read_text())
        if match:
            return int(match.group(1)) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def quiet_transformers() -> None:
    """Transformers warns that a fresh head is untrained on every load; that is the point here.
    Hub lookups are made to fail at once when the hub cannot be reached (see model/build.py)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # PEFT calls the old name
    warnings.filterwarnings("ignore", message=".*Found missing adapter keys.*")  # checked by budgetlora itself
    for name in ("peft", "huggingface_hub", "urllib3", "filelock"):
        logging.getLogger(name).setLevel(logging.ERROR)


@contextlib.contextmanager
def process_runtime(device: str, precision: str, batch_size: Optional[int] = None,
                    num_threads: Optional[int] = None) -> Iterator[Runtime]:
    """Threads, the launch environment (torchrun), the device and precision, and the process
    group for the block. Every check that can refuse the work comes before the group forms."""
    quiet_transformers()
    if num_threads:
        torch.set_num_threads(num_threads)
    dist = context_from_env()
    if batch_size is not None:
        check_batch_divides(batch_size, dist)
    resolved = device_for(dist, resolve_device(device))
    runtime = Runtime(resolved, resolve_precision(precision, resolved), dist)
    init_process_group(dist, resolved)
    try:
        yield runtime
    finally:
        destroy_process_group(dist)
