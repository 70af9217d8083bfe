"""The process an actor runs in: determinism switches and the device it was placed for."""

from __future__ import annotations

import os
import random

import torch

from actors.config import DEFAULT_SEED
from actors.errors import DeviceUnavailable


def set_determinism(seed: int = DEFAULT_SEED) -> None:
    """Seed every RNG and make torch pick deterministic kernels (bit-identical reruns)."""
    # Must be set before the first cuBLAS call to take effect.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:  # numpy is optional for the lens itself
        pass
    torch.use_deterministic_algorithms(True)
    if torch.backends.cudnn.is_available():
        torch.backends.cudnn.benchmark = False


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
