"""The sweep bench's pure helpers: arguments, workloads, time lines from stamps, tables.

Nothing here runs a model or Ray, and nothing asserts a timing.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bench.sweep_bench import (
    parse_args,
    render_loads,
    render_summary,
    render_sweep,
    render_threads,
    verdict,
)
from bench.sweep_timing import ModelTimes, VariantRun, driver_phases, model_times
from bench.sweep_workload import Workload, as_is, research_scale
from sweep.manifest import load_manifest

DEMO = Path(__file__).resolve().parents[2] / "manifests" / "demo.toml"

MODEL = "SmolLM2-135M-Instruct"


def test_quick_makes_one_round_of_ray_and_one_process_on_a_smaller_research_workload():
    args = parse_args(["--quick"])
    assert (args.repeats, args.skip_loads, args.variants) == (1, True, ["ray", "one"])
    assert (args.workloads, args.research_prompts) == (["research"], 32)
    assert parse_args(["--quick", "--repeats", "3"]).repeats == 3
    assert parse_args(["--quick", "--workloads", "demo"]).workloads == ["demo"]


def test_by_default_both_workloads_and_the_one_thread_row_run_twice():
    args = parse_args([])
    assert (args.repeats, args.load_repeats, args.skip_loads) == (2, 2, False)
    assert args.variants == ["ray", "one", "one@1"]
    assert (args.workloads, args.research_prompts) == (["demo", "research"], 340)
    assert parse_args(["--workloads", "research", "research"]).workloads == ["research"]


@pytest.mark.parametrize(
    "flag", ["--repeats", "--load-repeats", "--num-cpus", "--research-prompts"]
)
def test_counts_below_one_are_refused(flag):
    with pytest.raises(SystemExit):
        parse_args([flag, "0"])


def test_each_one_process_thread_setting_is_a_variant_once():
    assert parse_args(["--one-threads", "all", "1", "1"]).variants == ["ray", "one", "one@1"]
    with pytest.raises(SystemExit):
        parse_args(["--one-threads", "0"])
    with pytest.raises(SystemExit):
        parse_args(["--one-threads", "many"])


def test_a_missing_manifest_is_refused(tmp_path):
    with pytest.raises(SystemExit):
        parse_args(["--manifest", str(tmp_path / "nope.toml")])


def test_verdict_reads_the_target_in_its_direction():
    assert verdict(1.1, 1.15, at_most=True) == "PASS"
    assert verdict(1.2, 1.15, at_most=True) == "MISS"
    assert verdict(12.0, 10.0, at_most=False) == "PASS"
    assert verdict(9.0, 10.0, at_most=False) == "MISS"


def _ray_stamps() -> dict[str, float]:
    return {
        "launch": 0.0, "entered": 0.2, "imported": 1.0, "ray_imported": 2.0, "connect_start": 2.0,
        "mps_start": 2.0, "mps_end": 3.0, "ray_init_start": 3.0, "ray_init_end": 7.0,
        "connect_end": 7.0, "sweep_start": 7.1, "probe_start": 7.1, "probe_end": 8.1,
        "run_models_start": 8.5, "actor_module_imported": 9.0, "run_models_end": 49.0,
        "merge_start": 49.0, "merge_end": 49.5, "reports_start": 49.5, "reports_end": 53.5,
        "sweep_end": 53.6, "shutdown_start": 53.6, "shutdown_end": 55.0, "main_end": 55.1,
    }  # fmt: skip


def test_ray_phases_add_up_to_the_wall_time():
    phases = driver_phases("ray", _ray_stamps(), exited=56.0)
    assert phases["import ray"] == pytest.approx(1.0)
    assert phases["MPS check (imports torch)"] == pytest.approx(1.0)
    assert phases["ray.init (local Ray start)"] == pytest.approx(4.0)
    assert phases["plan (GGUF headers, placement)"] == pytest.approx(0.4)
    assert phases["models (actors, batches, artefacts)"] == pytest.approx(40.0)
    assert phases["ray.shutdown"] == pytest.approx(1.4)
    assert phases["interpreter exit"] == pytest.approx(0.9)
    assert phases["run setup (ledger, provenance)"] == pytest.approx(0.1)
    assert phases["rest"] == pytest.approx(0.1 + 0.1)  # between stamped phases
    assert sum(phases.values()) == pytest.approx(56.0)


def test_one_process_phases_have_no_ray_rows():
    stamps = {
        "launch": 0.0, "entered": 0.1, "imported": 1.0, "setup_end": 1.2,
        "actor_module_imported": 3.0, "models_end": 30.0, "merge_start": 30.0,
        "merge_end": 30.5, "reports_start": 30.5, "reports_end": 34.0, "main_end": 34.0,
    }  # fmt: skip
    phases = driver_phases("one", stamps, exited=34.5)
    assert not any(v for k, v in phases.items() if "ray" in k.lower() or "probe" in k)
    assert phases["models (actors, batches, artefacts)"] == pytest.approx(27.0)
    assert sum(phases.values()) == pytest.approx(34.5)


def _events(start: float) -> list[dict]:
    def ev(event: str, t: float, **kw) -> dict:
        return {"model": MODEL, "event": event, "t": start + t, **kw}

    return [
        ev("init_entered", 2.0),
        ev("lens_actor_imported", 5.0),
        ev("transformer_lens_imported", 10.0),
        ev("loaded", 14.0, torch_threads=1, omp_num_threads="1"),
        ev("batch", 16.0, start=start + 14.0, n_prompts=1),
        ev("batch", 21.0, start=start + 16.5, n_prompts=16),
        ev("diagnostics", 21.5, start=start + 21.2),
    ]


def test_a_model_time_line_is_split_into_its_parts():
    stamps = {"sink_add_s": {MODEL: 0.1}, "committed": {MODEL: {"start": 121.6, "end": 121.8}}}
    m = model_times(_events(100.0), stamps, submitted=100.0)[MODEL]
    assert (m.torch_threads, m.omp_num_threads, m.n_batches) == (1, "1", 2)
    assert m.submit_to_init == pytest.approx(2.0)
    assert m.import_actor == pytest.approx(3.0)
    assert m.import_tl == pytest.approx(5.0)
    assert m.load == pytest.approx(4.0)
    assert m.batches == pytest.approx(2.0 + 4.5)
    assert m.commit == pytest.approx(0.2)
    assert m.span == pytest.approx(21.8)
    assert m.other == pytest.approx(21.8 - (2 + 3 + 5 + 4 + 6.5 + 0.3 + 0.1 + 0.2))


def test_a_replicas_start_is_counted_and_its_batches_added_not_its_time_line():
    stamps = {"committed": {MODEL: {"start": 121.6, "end": 121.8}}}
    replica = [
        {**e, "t": e["t"] + 8.0, **({"start": e["start"] + 8.0} if "start" in e else {})}
        for e in _events(100.0)
    ]
    m = model_times(replica + _events(100.0), stamps, submitted=100.0)[MODEL]
    assert m.replicas == 1 and m.n_batches == 4
    assert m.submit_to_init == pytest.approx(2.0)  # the first actor's, whatever the order read
    assert m.load == pytest.approx(4.0)
    assert m.batches == pytest.approx(2 * (2.0 + 4.5))


def test_in_one_process_a_model_starts_at_its_constructor():
    m = model_times(_events(0.0), {}, submitted=None)[MODEL]
    assert m.submit_to_init == 0.0
    assert m.span == 0.0  # no commit stamp: the driver wrote nothing for it


def _run(variant: str, wall: float, threads: int) -> VariantRun:
    phases = {"ray.init (local Ray start)": 4.0} if variant == "ray" else {}
    phases["models (actors, batches, artefacts)"] = wall - 10.0
    times = ModelTimes(torch_threads=threads, omp_num_threads=str(threads), n_batches=2, span=9.0)
    return VariantRun(variant, wall, phases, {MODEL: times})


def _runs() -> dict[str, list[VariantRun]]:
    return {
        "ray": [_run("ray", 60.0, 1), _run("ray", 50.0, 1)],
        "one": [_run("one", 40.0, 2), _run("one", 50.0, 2)],
        "one@1": [_run("one@1", 60.0, 1), _run("one@1", 40.0, 1)],
    }


def test_the_sweep_table_shows_walls_ratios_the_verdict_on_all_cores_and_phases():
    lines = render_sweep(_runs(), target=True)
    one = next(line for line in lines if line.strip().startswith("one process "))
    assert "1.25x" in one  # median of 60/40 and 50/50
    assert "MISS" in one
    one_1 = next(line for line in lines if "one process, 1 thread" in line)
    assert "1.12x" in one_1  # median of 60/60 and 50/40
    assert "extra row" in one_1 and "PASS" not in one_1  # the target is against all cores
    ray_init = next(line for line in lines if "ray.init" in line)
    assert ray_init.split()[-4:] == ["4.00", "0.00", "0.00", "+4.00"]
    rows = [line.split() for line in lines if line.strip().startswith(MODEL[:30])]
    assert [(r[1], r[2]) for r in rows] == [("Ray", "1"), ("one", "2"), ("one@1", "1")]


def test_a_workload_without_the_target_gets_no_verdict():
    lines = render_sweep(_runs(), target=False)
    assert not any("PASS" in line or "MISS" in line for line in lines)
    assert "start-up cost" in next(line for line in lines if "one process " in line)


def test_the_summary_judges_the_research_workload_only():
    demo = Workload("demo", DEMO, 2, 17)
    research = Workload("research", DEMO, 2, 85)
    fast = {"ray": [_run("ray", 55.0, 1)], "one": [_run("one", 50.0, 2)]}
    slow = {"ray": [_run("ray", 40.0, 1)], "one": [_run("one", 20.0, 2)]}
    text = "\n".join(render_summary([demo, research], {"demo": slow, "research": fast}))
    assert "demo" in text and "2.00x" in text and "start-up cost, no target" in text
    research_line = next(line for line in text.splitlines() if "research" in line)
    assert "1.10x" in research_line and "PASS" in research_line


def test_the_summary_warns_where_every_core_was_slower_than_one_thread():
    research = Workload("research", DEMO, 2, 85)
    runs = _runs()  # one process: 45 s at every core, 50 s at one thread
    assert "caution" not in "\n".join(render_summary([research], {"research": runs}))
    runs["one"] = [_run("one", 150.0, 2), _run("one", 100.0, 2)]
    text = "\n".join(render_summary([research], {"research": runs}))
    assert "caution: one process at every core took 2.5x its time at one thread" in text


def test_the_research_workload_repeats_the_prompts_and_keeps_the_manifest_rules(tmp_path):
    demo = load_manifest(DEMO)
    w = research_scale(DEMO, tmp_path, n_prompts=80)
    built = load_manifest(w.manifest)
    n = len(demo.prompts)
    assert (w.name, w.n_models, w.n_prompts) == ("research", 2, n * round(80 / n))
    assert 64 <= w.n_prompts <= 96
    assert [m.source for m in built.models] == [m.source for m in demo.models]
    assert built.options.name == f"{demo.options.name}-research"
    assert built.prompts[:n] == demo.prompts  # the demo's, first and unchanged
    assert [p.role for p in built.prompts].count("primary") == 1
    for r, copy in enumerate(built.prompts[n:]):
        original = demo.prompts[r % n]
        assert copy.id == f"{original.id}-r{r // n + 1}"
        assert (copy.text, copy.answer, copy.positions) == (
            original.text, original.answer, original.positions,
        )  # fmt: skip
        assert (copy.role, copy.reference, copy.suite) == ("test", None, None)
    assert as_is(DEMO).n_prompts == n


def test_threads_table_says_not_recorded_where_the_ledger_has_no_field():
    ledger = {"nodes": [{"cpus": 2.0}], "models": {MODEL: {"status": "ok"}}}
    seen = {MODEL: ModelTimes(torch_threads=1, omp_num_threads="1")}
    row = next(line for line in render_threads(ledger, seen, 2) if MODEL in line)
    assert "not recorded" in row
    assert row.split()[-3:] == ["1", "1", "2.0"]
    ledger["models"][MODEL]["torch_threads"] = 1
    row = next(line for line in render_threads(ledger, seen, 2) if MODEL in line)
    assert "not recorded" not in row


def test_loads_table_gives_the_ratio_of_medians():
    loads = {
        "first": [{"total": 30.0, "sha256 of the GGUF": 0.2}, {"total": 20.0}],
        "cached": [{"total": 2.5, "sha256 of the GGUF": 0.2}, {"total": 2.5}],
    }
    text = "\n".join(render_loads(loads))
    assert "first / cached 10.0x" in text
    assert "PASS" in text


def test_the_traced_actor_answers_every_call_the_driver_makes():
    """Regression: the bench's actor wrapper lacked ``token_lengths`` (added to the driver
    later), so every Ray run of the bench failed at its first call."""
    from bench.sweep_timing import TracedLensActor

    source = (Path(__file__).resolve().parents[2] / "sweep" / "execute.py").read_text()
    called = set(re.findall(r"actor\.(\w+)\.remote\(", source))
    assert called >= {"run_batch", "diagnostics", "token_lengths"}
    assert all(callable(getattr(TracedLensActor, name, None)) for name in called), called
