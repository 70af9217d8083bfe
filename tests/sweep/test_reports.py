"""Reports, plots and LLM bundles generated from a real sweep of tiny checkpoints."""

from __future__ import annotations

import json
import re
import shutil
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import ClassVar

import matplotlib.image as mpimg
import polars as pl
import pytest

from sweep.report import main as report_main
from sweep.reports.data import load_run
from sweep.reports.markdown import fmt, tok
from sweep.reports.model_report import _quantitative
from sweep.reports.plots import (
    DPI,
    cross_figsize,
    entropy_answer_figsize,
    heatmap_figsize,
    raw_vs_norm_figsize,
)
from tests.sweep.conftest import reply_json
from tests.sweep.markdown_tables import table_rows

GOOD = ("tiny-gemma2", "tiny-llama")
SECTIONS = (
    "## 1. Overview",
    "## 2. Method sanity check",
    "## 3. Next-token lens by layer (primary prompt)",
    "## 4. Test prompts and temperature exploration",
    "## 5. Across prompts",
    "## 6. Lens-artefact audit",
)


@pytest.mark.parametrize("name", GOOD)
def test_model_report_has_every_section_and_the_parquet_numbers(first_run, name):
    run = first_run["run"]
    text = (run / f"evaluation-{name}.md").read_text()
    positions = [text.index(s) for s in SECTIONS]
    assert positions == sorted(positions)
    records = pl.read_parquet(run / f"records-{name}.parquet")
    pure = records.filter((pl.col("prompt_id") == "capital-de") & pl.col("is_next_token")).sort(
        "layer"
    )
    rows = table_rows(text, "| layer | entropy (bits)")
    assert len(rows) == pure.height == 4
    for cells, r in zip(rows, pure.iter_rows(named=True), strict=True):
        cells = [c.strip("*") for c in cells]
        assert cells == [
            str(r["layer"]), fmt(r["entropy_bits"]), tok(r["top_tokens"][0]), fmt(r["top_probs"][0]),
            fmt(r["answer_prob"]), fmt(r["answer_rank"]), fmt(r["kl_to_final_bits"]),
        ]  # fmt: skip
    # Missing data reads as a plain sentence, not a crash: the no-answer prompt, no collapse.
    assert re.search(r"\| `no-answer` \| n/a \| n/a \| n/a \|", text)
    summary = (
        pl.read_parquet(run / f"prompts-{name}.parquet")
        .filter(pl.col("role") == "primary")
        .row(0, named=True)
    )
    if summary["L_copy"] is None:
        assert "Copy collapse: never fires" in text
    if summary["L_semantic"] is None:
        assert "no row is bold" in text and "**" not in "\n".join("|".join(r) for r in rows)
    assert "ends exactly as written" in text
    # The method check reports the model's parity: the worst of every prompt's.
    worst = pl.read_parquet(run / f"prompts-{name}.parquet")["parity_max_abs"].max()
    assert f"max |diff| = {fmt(worst)}" in text


def test_bold_row_is_the_semantic_layer(first_run):
    """On real records, the row of L_semantic (whichever layer it is) is the bold one."""
    model = load_run(first_run["run"]).models["tiny-llama"]
    rows = model.pure_next()
    summary = model.prompts.filter(pl.col("role") == "primary").row(0, named=True)
    for layer in range(rows.height):
        text = _quantitative(rows, {**summary, "L_semantic": layer}, model.n_layers)
        cells_by_row = table_rows(text, "| layer |")
        bold = [i for i, cells in enumerate(cells_by_row) if cells[0].startswith("**")]
        assert bold == [layer]


def test_plots_decode_at_their_expected_size(first_run):
    run = first_run["run"]
    for name in GOOD:
        n_tokens = pl.read_parquet(run / f"prompts-{name}.parquet").filter(
            pl.col("role") == "primary"
        )["n_tokens"][0]
        expected = {
            f"plot-{name}-entropy-answer.png": entropy_answer_figsize(),
            f"plot-{name}-top1-heatmap.png": heatmap_figsize(4, int(n_tokens)),
            f"plot-{name}-raw-vs-norm.png": raw_vs_norm_figsize(),
        }
        for file, (w, h) in expected.items():
            image = mpimg.imread(run / file)
            assert image.shape[:2] == (round(h * DPI), round(w * DPI)), file
            assert image.std() > 0.01  # not a blank canvas
        assert f"]({next(iter(expected))})" in (run / f"evaluation-{name}.md").read_text()
    w, h = cross_figsize()
    assert mpimg.imread(run / "plot-cross-model.png").shape[:2] == (round(h * DPI), round(w * DPI))


def test_cross_model_report_sorts_models_and_lists_the_failed_one(first_run):
    text = (first_run["run"] / "evaluation-cross-model.md").read_text()
    rows = table_rows(text, "| model | layers")
    assert sorted(r[0] for r in rows) == list(GOOD)
    depths = [float(r[4]) if r[4] != "n/a" else float("inf") for r in rows]
    assert depths == sorted(depths)
    assert "## Models without results" in text
    assert re.search(r"- \*\*broken\*\*: failed: .*could not load", text)
    assert "![answer probability and entropy against relative depth](plot-cross-model.png)" in text


def test_llm_bundles_are_filled_with_the_run(first_run):
    run = first_run["run"]
    for name in GOOD:
        bundle = (run / f"llm-prompt-single-{name}.md").read_text()
        assert str(run) in bundle and f"records-{name}.parquet" in bundle
        assert (run / f"evaluation-{name}.md").read_text().strip() in bundle
        assert "layer,pos,token,entropy" in bundle  # the pure next-token CSV is included
    cross = (run / "llm-prompt-cross-model.md").read_text()
    assert (run / "evaluation-cross-model.md").read_text().strip() in cross
    assert "No LLM evaluations were produced" in (run / "llm-prompt-meta.md").read_text()


class _ChatServer(BaseHTTPRequestHandler):
    seen: ClassVar[list[dict]] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _ChatServer.seen.append(
            {"path": self.path, "auth": self.headers.get("Authorization"), "body": body}
        )
        first_line = body["messages"][1]["content"].splitlines()[0]
        answer = {
            "choices": [{"message": {"role": "assistant", "content": f"Reviewed: {first_line}"}}]
        }
        reply_json(self, answer)

    def log_message(self, *args: object) -> None:
        pass


def test_llm_endpoint_answers_are_written_and_the_key_is_not(
    first_run, tmp_path, monkeypatch, capsys
):
    run = tmp_path / "run"
    shutil.copytree(first_run["run"], run)
    secret = "sk-test-not-for-files-1234"
    monkeypatch.setenv("LENS_SWEEP_LLM_API_KEY", secret)
    server = HTTPServer(("127.0.0.1", 0), _ChatServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/v1"
        assert report_main([str(run), "--llm-endpoint", url, "--llm-model", "test-model"]) == 0
    finally:
        server.shutdown()
        server.server_close()
    assert {s["path"] for s in _ChatServer.seen} == {"/v1/chat/completions"}
    assert all(
        s["auth"] == f"Bearer {secret}" and s["body"]["model"] == "test-model"
        for s in _ChatServer.seen
    )
    assert len(_ChatServer.seen) == len(GOOD) + 2  # each model, cross-model, meta
    for name in GOOD:
        assert (
            run / f"llm-evaluation-{name}.md"
        ).read_text() == f"Reviewed: # Single-model evaluation request: {name}"
    assert (run / "llm-evaluation-cross-model.md").read_text().startswith("Reviewed: # Cross-model")
    assert (run / "llm-evaluation-meta.md").read_text().startswith("Reviewed: # Meta-evaluation")
    meta = (run / "llm-prompt-meta.md").read_text()
    assert "## LLM evaluation: cross-model" in meta
    for file in run.rglob("*"):
        if file.is_file():
            assert secret.encode() not in file.read_bytes(), file


def test_report_command_rejects_a_directory_without_a_ledger(tmp_path, capsys):
    assert report_main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a run directory" in err[0]


def test_unreachable_llm_endpoint_is_one_clear_error(first_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(first_run["run"], run)
    server = HTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    port = server.server_port
    server.server_close()  # nothing listens there now
    assert report_main([str(run), "--llm-endpoint", f"http://127.0.0.1:{port}/v1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: could not get an answer")
