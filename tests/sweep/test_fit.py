"""python -m sweep.fit: trained lenses fitted by Ray actors, cached, resumed after a kill."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import sweep.fit as fit_module
from sweep.fit import CARD_FILE, CHECKPOINT_CARD, LENS_FILE, LensCardError, check_card, main
from tests.sweep.conftest import kill_actor_workers

NAME = "tiny-llama"
FIT = (
    "[fit]\nseq_len = 32\ntrain_tokens = 384\nheldout_tokens = 96\nsteps = 12\n"
    "checkpoint_every = 4\nbatch_rows = 64\nlayers_per_step = 2\nlr = 0.01\n"
)
KILL_AT_CHECKPOINT = 2  # the worker dies as the driver stores the tuned lens's second checkpoint


def _manifest(path: Path, model: Path, fit: str = FIT) -> Path:
    path.write_text(
        f'[sweep]\nname = "fit"\n\n[[models]]\nname = "{NAME}"\nid = "{model}"\n\n'
        '[[prompts]]\nid = "p"\ntext = "The capital of France is"\nanswer = "Paris"\n\n' + fit
    )
    return path


def _lenses(out: Path) -> dict[str, Path]:
    """lens kind -> its folder."""
    return {p.name.split("-")[0]: p for p in (out / "lenses" / NAME).iterdir()}


@pytest.fixture(scope="module")
def fits(tiny_checkpoints, tmp_path_factory) -> dict:
    """One uninterrupted fit; one whose worker is killed mid-fit, then the same command again."""
    root = tmp_path_factory.mktemp("fit")
    manifest = _manifest(root / "m.toml", tiny_checkpoints["llama"])
    argv = [str(manifest), "--no-progress", "--num-cpus", "1"]
    whole, resumed = root / "whole", root / "resumed"
    assert main([*argv, "--out", str(whole)]) == 0

    real_write = fit_module.write_json
    checkpoints: list[dict] = []

    def write_then_kill(path: Path, data):
        out = real_write(path, data)
        if path.name == CHECKPOINT_CARD:
            checkpoints.append(dict(data))
            if len(checkpoints) == KILL_AT_CHECKPOINT:
                kill_actor_workers("FitActor")
        return out

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fit_module, "write_json", write_then_kill)
        killed_code = main([*argv, "--out", str(resumed)])
    left = {k: sorted(p.name for p in f.iterdir()) for k, f in _lenses(resumed).items()}
    rerun_code = main([*argv, "--out", str(resumed)])
    return {"whole": whole, "resumed": resumed, "killed_code": killed_code, "left": left,
            "checkpoints": checkpoints, "rerun_code": rerun_code, "argv": argv}  # fmt: skip


def _card(folder: Path) -> dict:
    return json.loads((folder / CARD_FILE).read_text())


def test_both_lenses_are_fitted_and_lower_the_heldout_kl(fits) -> None:
    lenses = _lenses(fits["whole"])
    assert sorted(lenses) == ["prism", "tuned"]
    for kind, folder in lenses.items():
        card = _card(folder)
        assert sorted(p.name for p in folder.iterdir()) == [CARD_FILE, LENS_FILE]
        kl = card["heldout_kl_bits_by_layer"]
        mean = {k: sum(v[:-1]) / len(v[:-1]) for k, v in kl.items()}
        assert mean[kind] < mean["final"], (kind, kl)
        assert card["steps"] == 12 and len(card["loss_bits"]) == 12
        assert card["n_lens_layers"] == 4 and card["d_model"] == 64
        assert card["text"]["text"] == "pydoc:topics" and len(card["text"]["sha256"]) == 64
        assert card["data"]["heldout_rows"] == 96 and card["data"]["train_rows"] == 384
        assert card["versions"]["torch"]


def test_the_last_layers_translator_stays_the_identity(fits) -> None:
    change = _card(_lenses(fits["whole"])["tuned"])["change_by_layer"]
    assert change[-1] == 0.0 and min(change[:-1]) > 0.0, change


def test_a_killed_fit_resumes_from_its_checkpoint_with_the_same_weights(fits) -> None:
    assert fits["killed_code"] == 1
    assert fits["left"]["tuned"] == ["checkpoint.json", "checkpoint.safetensors"]
    assert [c["step"] for c in fits["checkpoints"]] == [4, 8]
    assert fits["rerun_code"] == 0
    whole, resumed = _lenses(fits["whole"]), _lenses(fits["resumed"])
    assert whole.keys() == resumed.keys()
    for kind in whole:
        assert whole[kind].name == resumed[kind].name  # the same key
        assert (whole[kind] / LENS_FILE).read_bytes() == (resumed[kind] / LENS_FILE).read_bytes()
    card = _card(resumed["tuned"])
    assert card["resumed_from_step"] == 8
    assert card["loss_bits"] == _card(whole["tuned"])["loss_bits"]


def test_a_fitted_lens_is_not_fitted_again(fits, capsys) -> None:
    folder = _lenses(fits["whole"])["tuned"]
    before = (folder / CARD_FILE).stat().st_mtime_ns
    assert main([*fits["argv"], "--out", str(fits["whole"])]) == 0
    assert "already fitted (cached)" in capsys.readouterr().out
    import ray

    assert not ray.is_initialized()  # nothing to fit: no Ray was started
    assert (folder / CARD_FILE).stat().st_mtime_ns == before


def test_a_card_for_another_model_or_shape_is_refused(fits) -> None:
    card = _card(_lenses(fits["whole"])["tuned"])
    shapes = {k: card[k] for k in ("n_lens_layers", "d_model", "d_vocab")}
    check_card(card, NAME, card["model_identity"], shapes)  # its own model: accepted
    with pytest.raises(LensCardError, match=r"d_model 64 != the model's 128.*Refit"):
        check_card(card, NAME, card["model_identity"], {**shapes, "d_model": 128})
    with pytest.raises(LensCardError, match="fitted to model identity"):
        check_card(card, NAME, "0123456789abcdef", shapes)


@pytest.mark.parametrize(
    ("fit", "phrase"),
    [
        ("[fit]\nstepz = 3\n", "unknown key(s) stepz"),
        ('[fit]\nlenses = ["tuned", "magic"]\n', "lenses must be distinct names"),
        ("[fit]\nsteps = 0\n", "steps must be >= 1"),
        ('[fit]\nrank = "huge"\n', 'rank must be "auto", "full" or >= 1'),
        ('[fit]\ntext = "missing.txt"\n', "missing.txt"),
    ],
)
def test_a_bad_fit_table_is_one_clear_error(tmp_path, tiny_checkpoints, capsys, fit, phrase):
    manifest = _manifest(tmp_path / "m.toml", tiny_checkpoints["llama"], fit)
    assert main([str(manifest), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert phrase in err and err.count("\n") == 1, err


def test_the_driver_knows_the_kernels_lens_kinds() -> None:
    from lens_kernel.translators import TRANSLATOR_KINDS
    from sweep.fit_options import TRAINED_LENSES

    assert TRAINED_LENSES == TRANSLATOR_KINDS


def _options(tmp_path: Path, fit: str):
    from sweep.fit_options import load_fit_options

    path = tmp_path / "m.toml"
    path.write_text(fit)
    return load_fit_options(path, sweep_seed=316)


def test_fit_text_reads_txt_jsonl_and_parquet_the_same(tmp_path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sweep.fit_options import read_documents

    docs = ["First document,\nwith two lines.", "Second one: a, b; c.", "Third."]
    (tmp_path / "t.txt").write_text("\n\n".join(docs) + "\n\n\n")
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
    pq.write_table(pa.table({"body": docs}), tmp_path / "t.parquet")
    seen = {}
    for name in ("t.txt", "t.jsonl", "t.parquet"):
        options = _options(tmp_path, f'[fit]\ntext = "{name}"\ntext_column = "body"\n')
        got, source = read_documents(options, tmp_path)
        assert [d.strip() for d in got] == docs, name
        seen[name] = source
    assert seen["t.jsonl"]["sha256"] == seen["t.parquet"]["sha256"]
    assert seen["t.txt"]["documents"] == 3
    limited = _options(
        tmp_path, '[fit]\ntext = "t.jsonl"\ntext_column = "body"\nmax_documents = 2\n'
    )
    assert len(read_documents(limited, tmp_path)[0]) == 2


def test_fit_text_errors_name_the_file_and_what_is_wrong(tmp_path) -> None:
    from sweep.errors import ManifestError
    from sweep.fit_options import read_documents

    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": 3}\n')
    with pytest.raises(ManifestError, match=r"bad.jsonl: line 2: no string column 'text'"):
        read_documents(_options(tmp_path, '[fit]\ntext = "bad.jsonl"\n'), tmp_path)
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    with pytest.raises(ManifestError, match="no documents"):
        read_documents(_options(tmp_path, '[fit]\ntext = "empty.txt"\n'), tmp_path)
    with pytest.raises(ManifestError, match="dataset"):  # offline here, or no datasets package
        read_documents(_options(tmp_path, '[fit]\ntext = "someone/some-corpus"\n'), tmp_path)


def test_a_missing_model_is_one_clear_error_and_nothing_is_written(tmp_path, capsys) -> None:
    manifest = _manifest(tmp_path / "m.toml", tmp_path / "no-such-model", FIT)
    assert main([str(manifest), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "local model directory not found" in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_is_used_only_if_its_card_describes_its_state(tmp_path) -> None:
    from sweep.fit import CHECKPOINT_FILE, _checkpoint, _sha256

    state = b"state bytes"
    (tmp_path / CHECKPOINT_FILE).write_bytes(state)
    card = {"key": "k1", "step": 4, "losses": [1.0], "sha256": _sha256(state)}
    (tmp_path / CHECKPOINT_CARD).write_text(json.dumps(card))
    assert _checkpoint(tmp_path, "k1") == (state, card)
    assert _checkpoint(tmp_path, "k2") == (None, {})  # another fit's
    (tmp_path / CHECKPOINT_FILE).write_bytes(b"state bytes, cut shor")  # a write that was cut
    assert _checkpoint(tmp_path, "k1") == (None, {})
    (tmp_path / CHECKPOINT_CARD).write_text("{")
    assert _checkpoint(tmp_path, "k1") == (None, {})
