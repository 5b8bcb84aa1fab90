"""Device and numeric-precision choices: CUDA, MPS or CPU; bf16 autocast only where the hardware runs it fast."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import torch


def pick_device() -> torch.device:
    """CUDA if present, else Apple MPS, else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def cpu_has_bf16() -> bool:
    """Whether this CPU has native bf16 arithmetic (AVX512-BF16 or AMX); emulated bf16 would be slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        flags = ""
    native = any(flag in flags for flag in (" avx512_bf16", " amx_bf16"))
    return native and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_precision(precision: str, device: torch.device) -> str:
    """Turn ``auto`` into ``bf16`` or ``fp32`` for ``device``; an explicit choice is kept."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        return "bf16" if cpu_has_bf16() else "fp32"
    return "fp32"


@contextlib.contextmanager
def autocast(device: torch.device, precision: str) -> Iterator[None]:
    """bf16 autocast when ``precision == "bf16"``; a no-op otherwise."""
    if precision == "bf16":
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            yield
    else:
        yield


def distributed() -> tuple[int, int]:
    """(world size, rank) of a multi-process launch, joining its process group on first use.

    Under torchrun or ``accelerate launch`` (``WORLD_SIZE`` > 1) the group is initialised through Accelerate (gloo on
    CPU, NCCL on GPUs) and destroyed at exit, as a clean shutdown requires. Otherwise (1, 0).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 1, 0
    import torch.distributed as dist

    if not dist.is_initialized():
        import atexit

        from accelerate import PartialState

        PartialState(cpu=not torch.cuda.is_available())

        def leave() -> None:
            if dist.is_initialized():
                dist.destroy_process_group()

        atexit.register(leave)
    return dist.get_world_size(), dist.get_rank()


def decode_workers(requested: int = -1) -> int:
    """Decoding processes: the request, or one when there is a core to spare beside the compute threads."""
    if requested >= 0:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if torch.cuda.is_available():
        return min(16, max(1, cores - 1))
    return 1 if cores >= 2 else 0
