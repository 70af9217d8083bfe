"""The lenses bench's helpers: the translators' weights, ratios, the cost per extra lens, table
lines and arguments; and one untimed round end to end on a tiny random model.

Nothing here loads SmolLM2, and nothing asserts a timing.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load

from bench.lenses_bench import (
    HEADER,
    LENS_SETS,
    Measured,
    cost_per_extra_lens,
    extra_lenses,
    flops_line,
    label,
    load_actors,
    measure,
    parse_args,
    ratio_to,
    render_expectation,
    render_row,
    render_workload,
    translator_weights,
    weights_for,
)
from lens_kernel.translators import Prism, TunedLens, translator_from_state, translator_shape


def test_the_lens_sets_are_the_primary_alone_then_one_two_three_extra():
    assert [label(s) for s in LENS_SETS] == [
        "final", "final+raw", "final+tuned", "final+prism", "final+raw+tuned+prism",
    ]  # fmt: skip
    assert [extra_lenses(label(s)) for s in LENS_SETS] == [0, 1, 1, 1, 3]


def test_translator_weights_round_trip_with_the_right_shapes():
    weights = translator_weights(n_lens_layers=5, d_model=8)
    assert set(weights) == {"tuned", "prism"}
    for kind, blob in weights.items():
        tensors = load(blob)
        assert all(k.startswith("lens.") for k in tensors), kind
        translator = translator_from_state(kind, tensors)
        assert isinstance(translator, TunedLens if kind == "tuned" else Prism)
        assert translator_shape(translator) == ((5, 8) if kind == "tuned" else (None, 8))
    tuned = translator_from_state("tuned", load(weights["tuned"]))
    assert tuned.rank is None and tuned.weight.shape == (5, 8, 8) and tuned.bias.shape == (5, 8)
    prism = translator_from_state("prism", load(weights["prism"]))
    assert prism.skew.shape == (8, 8)
    # Small random weights, not the identity init; whitening mean 0 and std 1 in and out.
    for p in (tuned.weight, tuned.bias, prism.skew):
        assert p.abs().max() > 0 and p.std() < 0.05
    for name in ("mean", "out_mean"):
        assert torch.equal(getattr(prism, name), torch.zeros(8))
    for name in ("std", "out_std"):
        assert torch.equal(getattr(prism, name), torch.ones(8))


def test_translator_weights_are_seeded():
    assert translator_weights(3, 4) == translator_weights(3, 4)
    assert translator_weights(3, 4, seed=1)["tuned"] != translator_weights(3, 4)["tuned"]


def test_each_actor_is_sent_only_its_own_trained_lenses():
    weights = {"tuned": b"t", "prism": b"p"}
    assert weights_for(("final",), weights) == ()
    assert weights_for(("final", "raw"), weights) == ()
    assert weights_for(("final", "prism"), weights) == (("prism", b"p"),)
    assert weights_for(("final", "raw", "tuned", "prism"), weights) == (
        ("tuned", b"t"), ("prism", b"p"),
    )  # fmt: skip


def test_ratio_is_the_median_of_each_rounds_own_ratio():
    # The second round ran on a machine twice as slow: its ratio is still 1.5.
    times = {"final": [1.0, 2.0, 1.0], "final+raw": [1.5, 3.0, 1.2]}
    assert ratio_to(times, "final+raw", "final") == pytest.approx(1.5)  # of 1.5, 1.5, 1.2
    assert ratio_to(times, "final", "final") == 1.0


@pytest.mark.parametrize(
    ("ratio", "extra", "expected"),
    [(1.0, 0, None), (1.4, 1, 0.4), (2.2, 3, 0.4), (1.0, 1, 0.0), (0.97, 1, -0.03)],
)
def test_cost_per_extra_lens(ratio, extra, expected):
    got = cost_per_extra_lens(ratio, extra)
    assert got == (None if expected is None else pytest.approx(expected))


def _measured() -> Measured:
    times = {
        "final": [2.0, 4.0],
        "final+raw": [2.8, 5.6],
        "final+raw+tuned+prism": [4.4, 8.8],
        "forward": [0.8, 1.6],
        "lens": [0.6, 1.2],
    }
    rows = {"final": 100, "final+raw": 200, "final+raw+tuned+prism": 400}
    return Measured(times, rows)


def test_a_workloads_lines_put_the_baseline_first_and_divide_by_the_extra_lenses():
    lines = render_workload("next16", 10.6, _measured())
    assert [line.split() for line in lines] == [
        ["next16", "11", "final", "0", "100", "3.000", "1.00x", "-"],
        ["next16", "11", "final+raw", "1", "200", "4.200", "1.40x", "+0.40x"],
        ["next16", "11", "final+raw+tuned+prism", "3", "400", "6.600", "2.20x", "+0.40x"],
    ]
    assert all(len(line) == len(HEADER) for line in lines)
    assert HEADER.split()[:3] == ["workload", "tok", "lens"]


def test_a_row_of_a_lens_set_faster_than_the_baseline_shows_a_negative_cost():
    row = render_row("all1", 17, "final+raw", 1054, 0.97, 0.97)
    assert row.split()[-2:] == ["0.97x", "-0.03x"]


def test_the_expectation_is_the_lens_pass_share_at_most_all_but_the_forward():
    line = render_expectation("next16", _measured())
    assert "F 40%" in line and "L = 30%" in line
    assert "about +0.30x" in line and "at most +0.60x" in line


def test_the_flops_line_for_smollm2():
    line = flops_line(576, 49_152)
    assert "331,776" in line and "28,311,552" in line and "1.2%" in line


def test_arguments():
    args = parse_args([])
    assert (args.repeats, args.next, args.threads, args.quick) == (5, 16, 1, False)
    quick = parse_args(["--quick"])
    assert (quick.repeats, quick.next) == (2, 8)
    assert parse_args(["--quick", "--repeats", "3", "--next", "4"]).repeats == 3


@pytest.mark.parametrize("flag", ["--repeats", "--next", "--threads"])
def test_counts_below_one_are_refused(flag):
    with pytest.raises(SystemExit):
        parse_args([flag, "0"])


def test_one_round_end_to_end_on_a_tiny_model(tiny_actor):
    from actors.prompts import PromptSpec

    actors = load_actors(
        lambda lenses, weights: tiny_actor("llama", lenses=lenses, translator_weights=weights)
    )
    assert list(actors) == [label(s) for s in LENS_SETS]
    assert set(actors["final+raw+tuned+prism"].translators) == {"tuned", "prism"}
    batch = [PromptSpec(f"p{i}", "Berlin is the capital of", "Germany") for i in range(3)]
    m = measure(actors, [batch], repeats=1)
    assert all(len(t) == 1 and t[0] > 0 for t in m.times.values())
    base = m.rows["final"]
    assert base > 0
    assert m.rows == {label(s): base * len(s) for s in LENS_SETS}
    records = actors["final+raw+tuned+prism"].run_batch(batch).records
    assert set(records.column("lens").to_pylist()) == {"final", "raw", "tuned", "prism"}
    assert render_workload("next3", 6, m)[0].split()[2:4] == ["final", "0"]
