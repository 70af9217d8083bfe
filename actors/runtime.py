"""The process an actor runs in: determinism switches and the device it was placed for."""

from __future__ import annotations

import contextlib
import os
import random

import torch

from actors.config import DEFAULT_SEED, WORKER_ENV
from actors.errors import DeviceUnavailable

# glibc mallopt parameters (malloc.h): freed blocks above the mmap threshold go back to the OS
# at once, so the next [rows, vocab] buffer of the same size is page-faulted in afresh, which
# costs more than the arithmetic done in it. An actor allocates the same few sizes batch after
# batch: keep them in the heap.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_HEAP_KEPT_BYTES = 2**31 - 1


def keep_freed_memory() -> bool:
    """Make glibc reuse freed large buffers instead of returning them to the OS (the process's
    resident memory then stays near its peak, which a placed actor holds anyway). Returns
    whether it took effect: False off glibc (macOS, musl), where nothing changes."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, 1 << 30)) and bool(
        mallopt(_M_TRIM_THRESHOLD, _HEAP_KEPT_BYTES)
    )


def set_threads(n: int | None) -> int:
    """Run torch on ``n`` threads, the CPUs Ray reserved for this actor; None: torch's default.

    Ray sets OMP_NUM_THREADS to an actor's ``num_cpus``, so without this a CPU actor that
    reserved a node's cores would still compute on its default share. The inter-op pool can be
    sized only once per process, before any parallel work: where that has passed it is left as
    it is. Returns the intra-op thread count torch then uses.
    """
    if n is None:
        return torch.get_num_threads()
    if n < 1:
        raise ValueError(f"torch_threads must be a positive number of threads, got {n}")
    torch.set_num_threads(n)
    # Refused where the pool is already sized or parallel work has started in this process.
    with contextlib.suppress(RuntimeError):
        if torch.get_num_interop_threads() != n:
            torch.set_num_interop_threads(n)
    return torch.get_num_threads()


def set_determinism(seed: int = DEFAULT_SEED) -> None:
    """Seed every RNG and make torch pick deterministic kernels (bit-identical reruns)."""
    for key, value in WORKER_ENV.items():
        if key not in os.environ:
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                raise RuntimeError(
                    f"{key} was not set before CUDA started in this process, so cuBLAS may not "
                    f"be deterministic: start the process with {key}={value} in its environment"
                )
            os.environ[key] = value
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:  # numpy is optional for the lens itself
        pass
    torch.use_deterministic_algorithms(True)
    # float32 stays float32 on Ampere and later: no TF32 in matmuls the lens compares exactly.
    torch.backends.cuda.matmul.allow_tf32 = False
    if torch.backends.cudnn.is_available():
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.allow_tf32 = False


def check_device(device: str) -> torch.device:
    """The torch device for ``device``, or DeviceUnavailable saying what this process has."""
    dev = torch.device(device)
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = dev.index or 0
        if index >= count:
            raise DeviceUnavailable(
                f"placed on {device} but this worker sees {count} CUDA device(s): check the node's "
                'drivers and CUDA_VISIBLE_DEVICES, or set device = "cpu" for this model'
            )
        return dev
    if dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise DeviceUnavailable(
                "placed on mps but this worker has no usable Apple MPS backend: the node "
                "advertises an 'mps' resource it cannot serve; fix the node or set device = \"cpu\""
            )
        return dev
    raise DeviceUnavailable(f"unknown device {device!r}: use cpu, cuda[:N] or mps")
