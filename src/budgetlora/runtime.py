"""Process-wide policy every stage shares: device, precision, seeding, memory readings, the
quieting of third-party loggers, and the one setup (threads, launch environment, device, process
group) that training, resuming and prediction run inside."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import random
import re
import resource
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from budgetlora.config.schema import DEVICE_PATTERN
from budgetlora.distributed import (
    SINGLE,
    DistContext,
    check_batch_divides,
    context_from_env,
    destroy_process_group,
    device_for,
    init_process_group,
)
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


NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
BF16_MIN_GAIN = 1.5  # native bf16 linears measure several times fp32; emulated ones a fraction of it


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    match = re.search(r"^flags\s*:(.*)$", text, re.MULTILINE)
    return set(match.group(1).split()) if match else set()


def _linear_seconds(dtype: Optional[torch.dtype], repeats: int = 5) -> float:
    """The best time of one training-shaped linear layer (1,024 tokens, 384 -> 1,536), as the
    model runs it: F.linear, under CPU autocast for bf16."""
    x, w = torch.randn(1024, 384), torch.randn(1536, 384)
    best = float("inf")
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
        for _ in range(repeats + 1):
            start = time.perf_counter()
            torch.nn.functional.linear(x, w)
            best = min(best, time.perf_counter() - start)
    return best


CPU_BF16_ENV = "BUDGETLORA_CPU_BF16"  # "0": `precision: auto` stays fp32 on CPUs (reproducible across machines)


@functools.lru_cache(maxsize=1)
def cpu_bf16_pays() -> bool:
    """Whether bf16 autocast pays on this CPU: it has native bf16 matmul instructions (AMX or
    AVX512-BF16) and a bf16 linear layer, as autocast runs it, is measured at least 1.5x faster
    than fp32 here (a bf16 path that does not reach those kernels is several times slower).
    BUDGETLORA_CPU_BF16=0 says no without measuring (fp32 answers on every CPU)."""
    choice = os.environ.get(CPU_BF16_ENV, "auto").strip().lower()
    if choice not in ("auto", "0"):
        raise BudgetLoraError(
            f"{CPU_BF16_ENV}={os.environ[CPU_BF16_ENV]!r}: use 0 (precision auto stays fp32 on CPUs) or auto "
            "(bf16 where a measured bf16 matmul pays), or unset it"
        )
    if choice == "0" or not cpu_flags() & set(NATIVE_BF16_FLAGS):
        return False
    return _linear_seconds(None) >= BF16_MIN_GAIN * _linear_seconds(torch.bfloat16)


def resolve_precision(precision: str, device: torch.device) -> str:
    """`train.precision`: auto is bf16 on CUDA GPUs that support it and on CPUs where it pays
    (`cpu_bf16_pays`), else fp32."""
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        return "bf16" if device.type == "cpu" and cpu_bf16_pays() else "fp32"
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
def process_runtime(
    device: str, precision: str, batch_size: Optional[int] = None, num_threads: Optional[int] = None
) -> Iterator[Runtime]:
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
