"""The sweep-scale bench at a tiny size: its prompts, its workload, and a report from real runs.

Two driver runs (``python -m sweep.run`` through Ray) of a tiny random Llama at 12 and 24
prompts, and the in-process lens-vs-forward part on the same model. Nothing asserts a timing.
"""

from __future__ import annotations

import csv

import pytest

from bench.sweep_scale import (
    FACTS,
    PASSES,
    PROMPT_SET_COLUMNS,
    TEMPLATES,
    generate_prompts,
    lens_vs_forward,
    measure_sizes,
    parse_args,
    report,
    tiny_source,
    write_workload,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm2_tok):
    """(name, source) of the bench's tiny random Llama, built once for this module."""
    return tiny_source(tmp_path_factory.mktemp("sweep-scale-checkpoints"))


def test_generated_prompts_are_the_same_every_time_and_mix_lengths():
    prompts = generate_prompts(700)
    assert prompts == generate_prompts(700)
    assert prompts[:50] == generate_prompts(50)  # a smaller set is a prefix of a larger one
    assert len({p.id for p in prompts}) == 700
    assert {p.template for p in prompts} == set(TEMPLATES)
    assert {p.group for p in prompts} == {continent for _, _, continent in FACTS}
    assert all(p.text.endswith((" is", " simply", "Answer:")) for p in prompts)
    # Shuffled: one batch of 16 already spans short and long texts.
    lengths = [len(p.text) for p in prompts[:16]]
    assert max(lengths) > 4 * min(lengths)
    # 608 distinct texts, then repeats under new ids.
    assert len({p.text for p in prompts}) == 608


def test_the_workload_is_a_csv_prompt_set_at_next_token_positions(tmp_path, tiny):
    from sweep.manifest import load_manifest

    manifest = write_workload(tmp_path / "w", *tiny, n=30)
    with open(tmp_path / "w" / "prompts.csv", encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    assert tuple(rows[0]) == PROMPT_SET_COLUMNS and len(rows) == 31
    m = load_manifest(manifest)
    assert [e.name for e in m.models] == ["tiny-llama"]
    expected = generate_prompts(30)
    assert [(p.id, p.text, p.answer) for p in m.prompts] == [
        (p.id, p.text, p.answer) for p in expected
    ]
    assert {p.positions for p in m.prompts} == {"next"}


def test_sizes_are_sorted_once_and_must_be_positive():
    args = parse_args(["--sizes", "2000", "1000", "1000", "--only", "time", "time"])
    assert (args.sizes, args.only) == ([1000, 2000], ["time"])
    assert parse_args([]).only == ["time", "rss", "lens"]
    assert parse_args([]).rss_sizes == [1000, 10000]
    with pytest.raises(SystemExit):
        parse_args(["--rss-sizes", "0"])


def test_a_tiny_run_reports_time_per_1000_prompts_and_the_ratios(tmp_path, tiny):
    from actors import ActorConfig, LensActor

    name, source = tiny
    runs = measure_sizes(name, source, [12, 24], tmp_path, timeout_s=300)
    assert [r.n_prompts for r in runs] == [12, 24]
    assert all(r.wall_s > 0 and r.peak_rss_bytes > 50 * 2**20 for r in runs)  # the driver's
    assert not list(tmp_path.glob("out-*/*"))  # results are removed after each run

    actor = LensActor(ActorConfig(name=name, source=source))
    lens = lens_vs_forward(actor, 24, batch_size=8, rounds=1)
    assert (lens.n_prompts, lens.n_batches, lens.rounds) == (24, 3, 1)
    assert set(lens.seconds) == set(PASSES) and all(s > 0 for s in lens.seconds.values())

    context = {"time_model": name, "rss_model": name, "lens_model": name, "threads": "1"}
    lines = report(runs, runs, lens, context)
    text = "\n".join(lines)
    ratio_lines = [line.strip() for line in lines if "ratio 24 / 12 prompts" in line]
    assert [line.split(":")[0] for line in ratio_lines] == [
        "time ratio 24 / 12 prompts",
        "driver peak RSS ratio 24 / 12 prompts",
        "time ratio 24 / 12 prompts",  # part 2: no target on time
        "driver peak RSS ratio 24 / 12 prompts",
    ]
    assert ratio_lines[0].endswith(("PASS", "FAIL")) and "(target <= 2.10x)" in ratio_lines[0]
    assert ratio_lines[1].endswith(("PASS", "FAIL")) and "(target <= 1.10x)" in ratio_lines[1]
    assert ratio_lines[2].endswith("(no target here)")
    assert text.count("s per 1,000 prompts") == 2
    assert 0 <= lens.padding_planned < lens.padding_fixed < 1  # mixed lengths, sorted batches
    assert "padding: " in text and "token-sized batches" in text
    assert "lens pass / hooked forward time:" in text
    assert "lens pass / plain forward time:" in text
    assert "prompts/s" in text


def test_padding_fraction_counts_empty_slots():
    from bench.sweep_scale import padding_fraction

    assert padding_fraction([[3, 1], [2]]) == 1 - 6 / 8
    assert padding_fraction([[4, 4]]) == 0
