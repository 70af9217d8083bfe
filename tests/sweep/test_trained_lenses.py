"""Trained lenses swept like any lens: fitted by sweep.run when missing, decoded from the same
residuals as the final and raw lenses, one row per lens in every artefact."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from sweep.run import main

NAME = "tiny-llama"
LENSES = ["final", "raw", "tuned", "prism"]
FIT = (
    "[fit]\nseq_len = 32\ntrain_tokens = 384\nheldout_tokens = 96\nsteps = 12\n"
    "checkpoint_every = 6\nbatch_rows = 64\nlayers_per_step = 2\nlr = 0.01\n"
)


def _manifest(path: Path, model: Path, lenses: list[str] = LENSES) -> Path:
    path.write_text(
        f'[sweep]\nname = "lenses"\nlenses = {json.dumps(lenses)}\nkeep_residuals = true\n\n'
        f'[[models]]\nname = "{NAME}"\nid = "{model}"\n\n'
        '[[prompts]]\nid = "capital"\nprimary = true\ntext = "The capital of France is"\n'
        'answer = "Paris"\n\n'
        '[[prompts]]\nid = "plain"\nrole = "test"\ntext = "Give the city: Berlin is in"\n'
        'answer = "Germany"\n\n' + FIT
    )
    return path


@pytest.fixture(scope="module")
def swept(tiny_checkpoints, tmp_path_factory) -> dict:
    """One sweep that fits its trained lenses first, then the same manifest again."""
    root = tmp_path_factory.mktemp("trained-lenses")
    manifest = _manifest(root / "m.toml", tiny_checkpoints["llama"])
    out = root / "results"
    argv = [str(manifest), "--out", str(out), "--no-progress", "--num-cpus", "1"]
    code = main(argv)
    run = out / "run-latest"
    first = {p.name: p.read_bytes() for p in run.iterdir() if p.suffix in (".parquet", ".csv")}
    lens_files = {p: p.stat().st_mtime_ns for p in (out / "lenses").rglob("*") if p.is_file()}
    again = main(argv)
    second = {p.name: p.read_bytes() for p in run.iterdir() if p.suffix in (".parquet", ".csv")}
    lens_after = {p: p.stat().st_mtime_ns for p in (out / "lenses").rglob("*") if p.is_file()}
    return {"code": code, "again": again, "run": run, "out": out, "first": first,
            "second": second, "lens_files": lens_files, "lens_after": lens_after,
            "model": tiny_checkpoints["llama"]}  # fmt: skip


def _records(swept) -> pl.DataFrame:
    return pl.read_parquet(swept["run"] / f"records-{NAME}.parquet")


def test_the_sweep_fits_missing_lenses_then_decodes_every_lens(swept) -> None:
    assert swept["code"] == 0
    fitted = sorted(p.name.split("-")[0] for p in (swept["out"] / "lenses" / NAME).iterdir())
    assert fitted == ["prism", "tuned"]
    records = _records(swept)
    assert records["lens"].unique(maintain_order=True).to_list() == LENSES
    # One row per lens for every (prompt, layer, position); a prompt's rows together, its lenses
    # in the manifest's order, the primary first.
    counts = records.group_by("prompt_id", "layer", "pos").len()
    assert counts["len"].unique().to_list() == [4]
    runs = records["prompt_id"].rle()
    assert runs.struct.field("value").to_list() == ["capital", "plain"]
    mine = records.filter(pl.col("prompt_id") == "capital")
    assert mine["lens"].rle().struct.field("value").to_list() == LENSES
    prompts = pl.read_parquet(swept["run"] / f"prompts-{NAME}.parquet")
    assert prompts.select("prompt_id", "lens").rows() == [
        (p, lens) for p in ("capital", "plain") for lens in LENSES
    ]


def test_the_audit_reads_the_primary_lens_and_the_tuned_lens_can_confirm(swept) -> None:
    prompts = pl.read_parquet(swept["run"] / f"prompts-{NAME}.parquet")
    primary = prompts.filter(pl.col("lens") == "final")
    others = prompts.filter(pl.col("lens") != "final")
    assert primary["lens_artefact_score"].null_count() == 0
    assert others["lens_artefact_score"].null_count() == others.height
    assert others["L_semantic_confirmed"].null_count() == others.height
    # L_semantic_confirmed holds exactly when the raw lens (the audit's) or the tuned lens (its
    # own rows) has the answer at rank 1 within +-2 layers of L_semantic.
    records = _records(swept).filter(pl.col("is_next_token"))
    for row in primary.iter_rows(named=True):
        l_sem = row["L_semantic"]
        near = records.filter(
            (pl.col("prompt_id") == row["prompt_id"])
            & (pl.col("layer") - (l_sem if l_sem is not None else -100)).abs().le(2)
        )
        raw = bool((near.filter(pl.col("lens") == "final")["answer_rank_raw"] == 1).any())
        # Not the tuned lens's last layer: there it is the final lens, it would confirm itself.
        tuned_near = near.filter((pl.col("lens") == "tuned") & (pl.col("layer") < row["n_layers"]))
        tuned = bool((tuned_near["answer_rank"] == 1).any())
        want = {(True, True): "both", (True, False): "raw", (False, True): "tuned"}.get(
            (raw, tuned)
        )
        assert row["confirmed_source"] == want
        assert row["L_semantic_confirmed"] == (l_sem if want else None)


def test_the_raw_lens_rows_are_the_audits_raw_decode(swept) -> None:
    """Two independent paths to the same numbers: the audit's raw decode inside the final lens's
    pass, and the raw lens's own pass."""
    nxt = _records(swept).filter(pl.col("is_next_token")).sort("prompt_id", "layer")
    final, raw = nxt.filter(pl.col("lens") == "final"), nxt.filter(pl.col("lens") == "raw")
    np.testing.assert_allclose(
        final["entropy_raw_bits"].to_numpy(), raw["entropy_bits"].to_numpy(), rtol=1e-5, atol=1e-5
    )
    assert final["top1_id_raw"].to_list() == raw["top_ids"].list.first().to_list()
    assert final["answer_rank_raw"].to_list() == raw["answer_rank"].to_list()


def test_the_tuned_lens_is_the_final_lens_at_the_last_layer(swept) -> None:
    """Its last layer's map is frozen at the identity, exactly."""
    last = _records(swept).filter(pl.col("layer") == pl.col("layer").max())
    final = last.filter(pl.col("lens") == "final").drop("lens")
    tuned = last.filter(pl.col("lens") == "tuned").drop("lens")
    for column in ("entropy_bits", "top_ids", "top_probs", "kl_to_final_bits", "answer_rank"):
        assert final[column].to_list() == tuned[column].to_list(), column


def test_tuned_and_prism_rows_match_a_float64_reference(swept) -> None:
    """Entropy and KL to the model's output, recomputed in float64 from the saved residuals, the
    lens files and the checkpoint's own final norm and head (read by transformers)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(swept["model"], torch_dtype=torch.float32)
    norm_w = model.model.norm.weight.detach().double()
    eps = model.config.rms_norm_eps
    w_u = model.lm_head.weight.detach().double()  # [V, d]
    resid = {}
    for f in (swept["run"] / f"residuals-{NAME}").iterdir():
        resid.update({k: v.double() for k, v in load_file(f).items()})  # id -> [layers, d]

    def log_probs(h: torch.Tensor) -> torch.Tensor:
        y = h / torch.sqrt((h * h).mean(-1, keepdim=True) + eps) * norm_w
        return torch.log_softmax(y @ w_u.T, dim=-1)

    records = _records(swept).filter(pl.col("is_next_token"))
    folders = {p.name.split("-")[0]: p for p in (swept["out"] / "lenses" / NAME).iterdir()}
    for kind in ("tuned", "prism"):
        w = {
            k.removeprefix("lens."): v.double()
            for k, v in load_file(folders[kind] / "lens.safetensors").items()
        }
        for pid, h in resid.items():
            target = log_probs(h[-1])
            if kind == "tuned":
                moved = h + torch.einsum("ld,lde->le", h, w["weight"]) + w["bias"]
            else:
                s = w["skew"]
                q = torch.linalg.matrix_exp(s - s.T)
                moved = w["out_mean"] + w["out_std"] * (((h - w["mean"]) / w["std"]) @ q.T)
            lp = log_probs(moved)
            entropy = -(lp.exp() * lp).sum(-1) / math.log(2)
            kl = (lp.exp() * (lp - target)).sum(-1) / math.log(2)  # KL(lens || model), as recorded
            rows = records.filter((pl.col("prompt_id") == pid) & (pl.col("lens") == kind))
            rows = rows.sort("layer")
            np.testing.assert_allclose(rows["entropy_bits"], entropy.numpy(), rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(rows["kl_to_final_bits"], kl.numpy(), rtol=1e-4, atol=1e-4)


def test_the_seed_csvs_and_the_json_carry_every_lens(swept) -> None:
    run = swept["run"]
    pure = pl.read_csv(run / f"output-{NAME}-pure-next-token.csv")
    assert pure.columns[-1] == "lens" and pure.columns[:3] == ["layer", "pos", "token"]
    n_rows = pure.height // 4
    assert pure["lens"].to_list() == [lens for lens in LENSES for _ in range(n_rows)]
    assert pure["layer"].to_list() == list(range(n_rows)) * 4
    records_csv = pl.read_csv(run / f"output-{NAME}-records.csv")
    assert records_csv.columns[-1] == "lens"
    assert records_csv["lens"].unique(maintain_order=True).to_list() == LENSES
    info = json.loads((run / f"output-{NAME}.json").read_text())
    block = info["lenses"]
    assert block["primary"] == "final" and block["decoded"] == LENSES
    for lens in LENSES:
        by_layer = block["by_lens"][lens]["kl_to_final_bits_by_layer"]
        assert len(by_layer) == n_rows and all(v >= -1e-6 for v in by_layer)
    assert block["by_lens"]["final"]["kl_to_final_bits_by_layer"][-1] == pytest.approx(0, abs=1e-5)
    cards = info["trained_lenses"]
    assert sorted(cards) == ["prism", "tuned"]
    for card in cards.values():
        import hashlib

        weights = (Path(card["folder"]) / "lens.safetensors").read_bytes()
        assert card["weights_sha256"] == hashlib.sha256(weights).hexdigest()
    assert info["diagnostics"]["lenses"] == LENSES
    assert info["diagnostics"]["translators"]["tuned"]["n_lens_layers"] == n_rows


def test_reports_compare_the_lenses(swept) -> None:
    run = swept["run"]
    assert (run / f"plot-{NAME}-lenses.png").stat().st_size > 10_000
    report = (run / f"evaluation-{NAME}.md").read_text()
    section = report[report.index("## Lenses compared") :]
    for lens in LENSES:
        assert f"| {lens}" in section
    assert "L_semantic_confirmed (raw lens, or tuned lens below the last layer" in section
    summary = pl.read_csv(run / "cross-model-summary.csv")
    assert {"L_semantic@raw", "L_semantic@tuned", "L_semantic@prism"} <= set(summary.columns)


def test_a_second_run_fits_nothing_and_gives_identical_artefacts(swept) -> None:
    assert swept["again"] == 0
    assert swept["lens_files"] == swept["lens_after"]  # no lens file written again
    assert swept["first"].keys() == swept["second"].keys()
    for name, data in swept["first"].items():
        if name.endswith(".csv"):
            assert data == swept["second"][name], name
        else:
            a = pl.read_parquet(data)
            assert a.equals(pl.read_parquet(swept["second"][name])), name


def test_a_trained_lens_as_the_primary_lens_is_refused(tmp_path, tiny_checkpoints, capsys):
    manifest = _manifest(tmp_path / "m.toml", tiny_checkpoints["llama"])
    manifest.write_text(manifest.read_text().replace('name = "lenses"', 'lens = "tuned"'))
    assert main([str(manifest), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "[sweep].lens" in err and "trained lenses go in lenses" in err
    assert not (tmp_path / "out").exists()
