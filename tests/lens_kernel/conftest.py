"""Kernel tests run on tiny tensors, where torch's intra-op thread pool costs more than it gives
(milliseconds per op on a busy machine): run them on one thread, and restore the setting after."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True, scope="package")
def _one_torch_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
