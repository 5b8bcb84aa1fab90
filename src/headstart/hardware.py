"""Device and numeric-precision choices: CUDA, MPS or CPU; bf16 autocast only where the hardware runs it fast."""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

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


def int8_saturates() -> bool:
    """Whether onnxruntime's uint8 x int8 kernels can saturate on this CPU: x86 with AVX2 but no int8 dot-product
    instruction (AVX512-VNNI, AVX-VNNI or AMX), where pairs of products are added in 16 bits.

    onnxruntime's remedy there is ``reduce_range`` (7-bit weights). Measured on a 2-core AMD EPYC with AVX2 only,
    EfficientNet-Lite0 on ants/bees val (153 images): top-1 agreement with fp32 97.4% with 8-bit weights (largest
    logit change 1.55), 99.3% with 7-bit (0.71); uint8 weights (no saturation) 99.3% (0.40) but 11 times slower.
    Other CPUs (Arm, or no /proc/cpuinfo) do not saturate this way.
    """
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return False
    return "avx2" in flags and not {"avx512_vnni", "avx_vnni", "amx_int8"} & flags


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


_SOLO = False  # True inside single_process(): collective work runs as a world of one


def launch_rank() -> int:
    """This process's rank under torchrun or ``accelerate launch`` (0 otherwise), without joining the process group."""
    return int(os.environ.get("RANK", "0"))


def launch_world_size() -> int:
    """The number of processes of a torchrun or ``accelerate launch`` launch (1 otherwise), without joining a group."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@contextlib.contextmanager
def single_process() -> Iterator[None]:
    """Inside the block :func:`distributed` answers (1, 0): for work that one rank does alone after the shared part.

    Under a multi-process launch, rank 0 alone evaluates the saved model, builds the report and writes the run folder.
    Any feature pass it runs there must not shard over the world and wait in a collective for ranks that have left.
    """
    global _SOLO
    previous, _SOLO = _SOLO, True
    try:
        yield
    finally:
        _SOLO = previous


def distributed() -> tuple[int, int]:
    """(world size, rank) of a multi-process launch, joining its process group on first use.

    Under torchrun or ``accelerate launch`` (``WORLD_SIZE`` > 1) the group is initialised through Accelerate (gloo on
    CPU, NCCL on GPUs) and destroyed at exit, as a clean shutdown requires. Otherwise, and inside
    :func:`single_process`, (1, 0).
    """
    if _SOLO or launch_world_size() <= 1:
        return 1, 0
    import torch.distributed as dist

    if not dist.is_initialized():
        from accelerate import PartialState

        PartialState(cpu=not torch.cuda.is_available())
    leave_group_at_exit()
    return dist.get_world_size(), dist.get_rank()


_LEAVING = False


def leave_group_at_exit() -> None:
    """Destroy the process group when this process exits (once), as a clean shutdown requires.

    Each rank leaves when its own share is done: rank 0 may go on alone (evaluation, report) while the others have
    exited, so no rank waits at a final barrier for work it takes no part in.
    """
    global _LEAVING
    if _LEAVING:
        return
    _LEAVING = True
    import atexit

    import torch.distributed as dist

    def leave() -> None:
        if not dist.is_initialized():
            return
        dist.destroy_process_group()
        # DDP keeps the gloo group (and its worker threads) alive past destroy_process_group. A worker that has just
        # finished a collective may still hold its tensors, and dropping them takes the GIL: once the interpreter is
        # finalising, that thread is ended mid-destructor and the process aborts ("terminate called without an
        # active exception"). Letting go of the GIL for a moment lets such a worker finish first. Measured on 2
        # busy cores, a DDP rank ending right after a collective (the script of benchmarks/torchrun_exit.py): 6 of
        # 30 runs aborted, 0 of 30 with it. Only :func:`exit_process` (the command line's way out) rules it out.
        time.sleep(_RELEASE_SECONDS)

    atexit.register(leave)


_RELEASE_SECONDS = 0.05


def exit_process(code: int) -> NoReturn:
    """End this process with exit status ``code``.

    Alone, as :func:`sys.exit` does. Under a multi-process launch, the exit handlers run (they leave the process
    group, flush the logs, remove temporary folders), the standard streams are flushed, and then the process ends
    without the interpreter's finalisation: gloo's worker threads, kept alive by DDP, may still need the GIL there,
    and a thread that asks for it during finalisation aborts the whole rank. Every file headstart writes is closed
    before this point (atomic writes), so nothing is lost by skipping it.
    """
    if launch_world_size() <= 1:
        sys.exit(code)
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed or broken stream must not change the exit status
            stream.flush()
    os._exit(code)


_ALLOCATOR_TUNED: bool | None = None


def tune_allocator() -> bool:
    """Stop glibc's malloc from handing every large tensor back to the kernel; True when the setting is in force.

    By default glibc serves allocations above a (dynamic, at most 32 MiB) threshold with a fresh ``mmap`` and unmaps
    them on free, and trims the heap top as soon as it frees: a CPU forward pass then page-faults and zeroes its
    activation buffers anew at every batch. Measured on 2 cores, EfficientNet-Lite0, 256 px, batch 32, bf16: 62-76
    images/s before, 151-155 after (the PyTorch CPU tuning guide's advice of jemalloc/tcmalloc, without preloading).
    Freed memory up to the thresholds stays in the process instead of returning to the system.

    Only on glibc, once per process, and not when the user set ``MALLOC_*`` variables of their own or
    ``HEADSTART_MALLOC=0``. Worker processes forked afterwards inherit it.
    """
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED is not None:
        return _ALLOCATOR_TUNED
    _ALLOCATOR_TUNED = False
    if sys.platform != "linux" or os.environ.get("HEADSTART_MALLOC") == "0":
        return False
    if any(name.startswith("MALLOC_") for name in os.environ) or "GLIBC_TUNABLES" in os.environ:
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018  # present on glibc only; musl's mallopt does nothing
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    _ALLOCATOR_TUNED = bool(libc.mallopt(m_mmap_threshold, 1 << 30)) and bool(libc.mallopt(m_trim_threshold, 1 << 29))
    return _ALLOCATOR_TUNED


def usable_cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def cpu_inference_workers(device: torch.device, requested: int = -1) -> tuple[int, int]:
    """(processes, threads each) for CPU inference that decodes and computes in worker processes; (0, 0): don't.

    On a CPU, one single-threaded process per core that decodes its own batch then runs the network beats one
    process running the network on every core beside a decoding worker: measured on 2 cores with EfficientNet-Lite0
    at 256 px, one thread gives 20.5 ms per image and two threads 11.9 ms (1.7x, not 2x), and a decoding worker that
    shares the cores stalls both compute threads at every barrier. Chosen only when ``requested`` is ``-1`` (auto),
    on a CPU with at least two cores for this process (cores are split between the ranks of a multi-process launch).
    At most eight processes, each with ``cores // processes`` threads, bound the memory held by batches in flight.
    """
    if requested != -1 or device.type != "cpu":
        return 0, 0
    cores = usable_cores() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if cores < 2:
        return 0, 0
    processes = min(8, cores)
    return processes, cores // processes


def decode_workers(requested: int = -1) -> int:
    """Decoding processes: the request, or one when there is a core to spare beside the compute threads."""
    if requested >= 0:
        return requested
    cores = usable_cores()
    if torch.cuda.is_available():
        return min(16, max(1, cores - 1))
    return 1 if cores >= 2 else 0
