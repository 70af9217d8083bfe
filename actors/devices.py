"""Where an actor's weights go, and the check that they went there.

A model loads straight onto its device(s) through transformers' ``device_map`` (safetensors are
read shard by shard into device memory: no full copy in host RAM first). A model split over k
devices keeps its blocks spread evenly over them and everything else (embeddings, final norm,
unembedding) on the lens device, where residuals are gathered and decoded.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from actors.errors import DeviceMismatch


def same_device(a: torch.device, b: torch.device) -> bool:
    """Device equality where a missing index means 0 ('cuda' == 'cuda:0', 'mps' == 'mps:0')."""
    return a.type == b.type and (a.index or 0) == (b.index or 0)


def block_list_path(model: torch.nn.Module, n_layers: int) -> str:
    """Dotted path of the ModuleList that holds the model's ``n_layers`` blocks."""
    found = [
        name
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.ModuleList) and len(m) == n_layers and name
    ]
    if not found:
        raise DeviceMismatch(f"found no list of {n_layers} blocks to split across devices")
    return min(found, key=lambda n: n.count("."))  # the outermost such list


def split_device_map(
    skeleton: torch.nn.Module, n_layers: int, devices: Sequence[str], lens_device: str
) -> dict[str, str]:
    """A complete, non-overlapping transformers ``device_map`` for a split model.

    Block i goes to devices[i * k // n_layers] (contiguous, even runs); every module off the
    path to the block list (embeddings, rotary tables, final norm, lm_head) to ``lens_device``.
    ``skeleton`` is the model built on the meta device: only its module names are read.
    """
    blocks = block_list_path(skeleton, n_layers)
    k = len(devices)
    mapping: dict[str, str] = {f"{blocks}.{i}": devices[i * k // n_layers] for i in range(n_layers)}
    parts = blocks.split(".")
    for depth in range(len(parts)):
        parent = ".".join(parts[:depth])
        module = skeleton.get_submodule(parent)
        on_path = parts[depth]
        for child, _ in module.named_children():
            if child != on_path:
                mapping[f"{parent}.{child}" if parent else child] = lens_device
        own = [n for n, _ in module.named_parameters(recurse=False)]
        own += [n for n, _ in module.named_buffers(recurse=False)]
        for name in own:
            mapping[f"{parent}.{name}" if parent else name] = lens_device
    return mapping


def weight_device_map(
    config: Any, devices: Sequence[str], lens_device: torch.device
) -> dict[str, str] | None:
    """``device_map`` for from_pretrained: None on the CPU, everything on the lens device for
    one device, or a block split for several."""
    if not devices:
        return None if lens_device.type == "cpu" else {"": str(lens_device)}
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    return split_device_map(skeleton, int(config.num_hidden_layers), devices, str(lens_device))


def misplaced(
    named: Iterable[tuple[str, torch.Tensor]], allowed: Sequence[torch.device]
) -> list[str]:
    """Names (with their device) of tensors that sit on none of the ``allowed`` devices."""
    return [
        # TransformerBridge wraps each HF module; name tensors as the HF model does.
        f"{name.replace('._original_component', '')} on {t.device}"
        for name, t in named
        if not any(same_device(t.device, d) for d in allowed)
    ]


def verify_placement(
    model: torch.nn.Module,
    lens_tensors: dict[str, torch.Tensor | None],
    weight_devices: Sequence[torch.device],
    lens_device: torch.device,
    model_name: str,
) -> None:
    """Raise DeviceMismatch unless every parameter and buffer of ``model`` is on one of
    ``weight_devices`` and every lens tensor (norms, W_U) is on ``lens_device``."""
    bad = misplaced(model.named_parameters(), weight_devices)
    bad += misplaced(model.named_buffers(), weight_devices)
    bad += misplaced(((n, t) for n, t in lens_tensors.items() if t is not None), [lens_device])
    if bad:
        shown = "; ".join(bad[:5]) + (f"; and {len(bad) - 5} more" if len(bad) > 5 else "")
        where = ", ".join(str(d) for d in weight_devices)
        raise DeviceMismatch(
            f"{model_name}: {len(bad)} tensor(s) are not where the actor was placed "
            f"(weights on {where}, lens on {lens_device}): {shown}. This is a loading bug: "
            "please report it with the model's architecture"
        )


def peak_memory_bytes(devices: Sequence[torch.device]) -> dict[str, int]:
    """Peak bytes this process held: host RSS, and allocator peaks summed over CUDA devices
    (or MPS's driver allocation, the nearest it reports)."""
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    out = {"host_peak_rss_bytes": int(rss if sys.platform == "darwin" else rss * 1024)}
    cuda = {d.index or 0 for d in devices if d.type == "cuda"}
    if cuda:
        out["device_peak_bytes"] = sum(torch.cuda.max_memory_allocated(i) for i in sorted(cuda))
    elif any(d.type == "mps" for d in devices):
        out["device_peak_bytes"] = int(torch.mps.driver_allocated_memory())
    return out
