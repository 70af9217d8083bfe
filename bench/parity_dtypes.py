"""What the parity gate must allow: lens vs model logits on real weights, per compute dtype.

For each demo model (real pretrained weights, dequantised from GGUF) and each of float32,
bfloat16 and float16, decode the seed's prompts at the next-token position and compare the lens
at the last layer with the model's own logits, without the gate: max |diff|, KL(model || lens) in
bits, top-1 agreement, and whether the model's own logits were finite. The bounds in
``lens_kernel/parity.py`` sit above the worst figures this prints; README records them.

    python -m bench.parity_dtypes [--manifest manifests/demo.toml]
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

DTYPES = ("float32", "bfloat16", "float16")


def measure(manifest_path: Path, device: str) -> list[dict[str, object]]:
    from actors import ActorConfig, LensActor
    from sweep.manifest import load_manifest

    manifest = load_manifest(manifest_path)
    prompts = [p for p in manifest.prompts]
    rows = []
    for model in manifest.models:
        for dtype in DTYPES:
            config = ActorConfig(name=model.name, source=model.source, device=device, dtype=dtype)
            actor = LensActor(config)
            own = actor.final_norm
            broken = {"own final norm": None, "norm weight dropped": replace(own, weight=None)}
            if own.weight_offset:
                broken["(1 + w) offset dropped"] = replace(own, weight_offset=0.0)
            for lens, norm in broken.items():
                stats = actor.measure_parity(prompts, norm)
                rows.append(_summary(model.name, dtype, lens, stats))
                print(_row(rows[-1]), flush=True)
            del actor
    return rows


def _summary(model: str, dtype: str, lens: str, stats: Any) -> dict[str, Any]:
    from lens_kernel import KL_BOUND_BITS, REL_BOUND, parity_failures

    finite = stats.model_finite
    n = len(finite)
    any_finite = bool(finite.any())

    def worst(values: torch.Tensor) -> float:
        return float(values[finite].max()) if any_finite else float("nan")

    return {
        "model": model,
        "dtype": dtype,
        "lens": lens,
        "finite": f"{int(finite.sum())}/{n}",
        "max_logit": worst(stats.logit_scale),
        "max_abs": worst(stats.max_abs),
        "max_rel": worst(stats.relative_error(dtype)),
        "rel_bound": REL_BOUND[dtype],
        "max_kl_bits": worst(stats.kl_bits),
        "median_kl_bits": float(stats.kl_bits[finite].median()) if any_finite else float("nan"),
        "bound_bits": KL_BOUND_BITS[dtype],
        "top1_differs": int((~stats.top1_agree[finite]).sum()),
        "gate_fails": f"{int(parity_failures(stats, dtype).sum())}/{n}",
        "ok": lens == "own final norm",
    }


def _row(r: dict[str, object]) -> str:
    return (
        f"| {r['model']} | {r['dtype']} | {r['lens']} | {r['finite']} | {r['max_logit']:.3g} | "
        f"{r['max_abs']:.3g} | {r['max_rel']:.3g} (<= {r['rel_bound']:g}) | "
        f"{r['max_kl_bits']:.2e} (<= {r['bound_bits']:g}) | {r['median_kl_bits']:.2e} | "
        f"{r['top1_differs']} | {r['gate_fails']} |"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.parity_dtypes", description=__doc__)
    p.add_argument("--manifest", type=Path, default=Path("manifests/demo.toml"))
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(
        "| model | dtype | lens | finite logits | max abs logit | max abs diff | max relative "
        "error (eps x scale) | max KL bits | median KL bits | top-1 differs | gate fails |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    rows = measure(args.manifest, args.device)
    # The gate must pass every row of the model's own norm and fail every row of a wrong one
    # (where the model's logits are finite at all).
    wrong = [
        r
        for r in rows
        if r["finite"].split("/")[0] != "0" and (r["gate_fails"].startswith("0/") != r["ok"])
    ]
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
