"""Reports for a run directory: python -m sweep.report results/run-latest [--llm-endpoint URL].

Runs at the end of every sweep, and on its own for any existing run directory.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sweep.files import write_text
from sweep.reports.bundles import (
    SYSTEM,
    bundle_path,
    cross_model_bundle,
    meta_bundle,
    single_model_bundle,
)
from sweep.reports.cross_report import cross_report, curves
from sweep.reports.data import load_run
from sweep.reports.llm import ChatEndpoint, LLMError
from sweep.reports.model_report import LENS_KL, RAW_VS_NORM, model_report
from sweep.reports.plots import (
    plot_cross_model,
    plot_depth_distributions,
    plot_entropy_answer,
    plot_lens_kl,
    plot_raw_vs_norm,
    plot_top1_heatmap,
)
from sweep.stats import relative_depths


def build_reports(run_dir: Path, llm: ChatEndpoint | None = None) -> dict[str, Path]:
    """Write every report, plot and bundle for ``run_dir``; returns paths by name."""
    run = load_run(run_dir)
    written: dict[str, Path] = {}
    reports: dict[str, str] = {}
    for name, m in run.models.items():
        pure = m.pure_next()
        plots = {
            "entropy and answer probability by layer": plot_entropy_answer(
                m, pure, run_dir / f"plot-{name}-entropy-answer.png"
            ),
            "top-1 token by layer and position": plot_top1_heatmap(
                m, m.all_positions(), run_dir / f"plot-{name}-top1-heatmap.png"
            ),
            RAW_VS_NORM: plot_raw_vs_norm(m, pure, run_dir / f"plot-{name}-raw-vs-norm.png"),
        }
        if len(m.lenses) > 1:
            plots[LENS_KL] = plot_lens_kl(m, run_dir / f"plot-{name}-lenses.png")
        written.update({p.name: p for p in plots.values()})
        reports[name] = model_report(m, run, plots)
        written[f"evaluation-{name}.md"] = write_text(
            run_dir / f"evaluation-{name}.md", reports[name]
        )
        bundle = single_model_bundle(m, run, reports[name])
        written[f"single-{name}"] = write_text(bundle_path(run_dir, f"single-{name}"), bundle)
    plot = plot_cross_model(curves(run), run_dir / "plot-cross-model.png") if run.models else None
    if plot is not None:
        written[plot.name] = plot
    # Distributions across prompts, when some model has more than one prompt of a role.
    depth_plot = None
    if any(m.many_prompts for m in run.models.values()):
        depths = {name: relative_depths(m.prompts) for name, m in run.models.items()}
        depth_plot = plot_depth_distributions(depths, run_dir / "plot-cross-model-depths.png")
        written[depth_plot.name] = depth_plot
    cross = cross_report(run, plot, depth_plot)
    written["evaluation-cross-model.md"] = write_text(run_dir / "evaluation-cross-model.md", cross)
    cross_bundle = cross_model_bundle(run, cross, reports)
    written["cross-model"] = write_text(bundle_path(run_dir, "cross-model"), cross_bundle)

    answers: dict[str, str] = {}
    if llm is not None:
        for name in reports:
            text = llm.complete(
                SYSTEM, bundle_path(run_dir, f"single-{name}").read_text(encoding="utf-8")
            )
            answers[name] = text
            written[f"llm-evaluation-{name}.md"] = write_text(
                run_dir / f"llm-evaluation-{name}.md", text
            )
        answers["cross-model"] = llm.complete(SYSTEM, cross_bundle)
        written["llm-evaluation-cross-model.md"] = write_text(
            run_dir / "llm-evaluation-cross-model.md", answers["cross-model"]
        )
    meta = meta_bundle(run, cross, answers)
    written["meta"] = write_text(bundle_path(run_dir, "meta"), meta)
    if llm is not None:
        written["llm-evaluation-meta.md"] = write_text(
            run_dir / "llm-evaluation-meta.md", llm.complete(SYSTEM, meta)
        )
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sweep.report", description=__doc__)
    p.add_argument("run_dir", type=Path, help="a run directory, e.g. results/run-latest")
    p.add_argument(
        "--llm-endpoint", default=None, help="OpenAI-compatible base URL (e.g. http://host/v1)"
    )
    p.add_argument("--llm-model", default="gpt-4o", help="model name sent to the endpoint")
    args = p.parse_args(argv)
    if not (args.run_dir / "ledger.json").is_file():
        print(f"error: {args.run_dir}: not a run directory (no ledger.json)", file=sys.stderr)
        return 2
    llm = ChatEndpoint(args.llm_endpoint, args.llm_model) if args.llm_endpoint else None
    try:
        written = build_reports(args.run_dir, llm)
    except LLMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{len(written)} report files in {args.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
