"""Hostile input (issue #8): each case starts from what went wrong before it was refused.

Manifest cases go through the CLI: exit 2, one line naming the file and the key, nothing
written. The LLM case runs a real HTTP server on 127.0.0.1 and checks that it heard nothing.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import ClassVar

import pytest

from sweep.errors import ManifestError
from sweep.manifest import load_manifest
from sweep.prompt_files import PROMPT_FILE_MAX_BYTES
from sweep.reports.llm import API_KEY_ENV, ChatEndpoint, LLMError
from tests.sweep.conftest import reply_json
from tests.sweep.test_manifest import MODEL_A, PROMPT_1, SMOLLM2, _run_bad, _write

VALID_BODY = MODEL_A + PROMPT_1


def _refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, key: str, phrase: str
) -> str:
    manifest = _write(tmp_path / "bad.toml", text)
    line = _run_bad(tmp_path, capsys, [], manifest)
    assert str(manifest.resolve()) in line or str(manifest) in line
    assert key in line, line
    assert phrase in line, line
    return line


def _model(name: str) -> str:
    return f'[[models]]\nname = "{name}"\n{SMOLLM2}\n'


def _prompt(pid: str, extra: str = "") -> str:
    return f'[[prompts]]\nid = "{pid}"\ntext = "The capital of Germany is"\n{extra}'


# ---- 1. an empty answer tracked the space token and reported an L_semantic as if real -----


@pytest.mark.parametrize("answer", ["", " ", "\\t\\n  "], ids=["empty", "space", "whitespace"])
def test_empty_or_blank_answer_is_refused(tmp_path, capsys, answer: str) -> None:
    text = MODEL_A + _prompt("p", f'answer = "{answer}"\n')
    _refused(tmp_path, capsys, text, "prompts[0].answer", "only whitespace")


def test_an_answer_with_surrounding_whitespace_is_kept_as_written(tmp_path: Path) -> None:
    m = load_manifest(_write(tmp_path / "m.toml", MODEL_A + _prompt("p", 'answer = " Berlin "\n')))
    assert m.prompts[0].answer == " Berlin "


# ---- 2. a seed above 2**32 - 1 failed torch/numpy seeding at run time, in every model ------


def test_seed_above_2_pow_32_is_refused(tmp_path, capsys) -> None:
    text = f"[sweep]\nseed = {2**32}\n" + VALID_BODY
    _refused(tmp_path, capsys, text, "[sweep].seed", "[0, 2**32 - 1]")


def test_seed_range_ends_are_accepted(tmp_path: Path) -> None:
    for seed in (0, 2**32 - 1):
        m = load_manifest(_write(tmp_path / "m.toml", f"[sweep]\nseed = {seed}\n" + VALID_BODY))
        assert m.options.seed == seed


# ---- 3. inf/nan/1e-300 temperatures wrote NaN and Infinity into the output JSON -------------


@pytest.mark.parametrize("t", ["inf", "-inf", "nan", "1e-300", "1e300", "1e-4", "1001.0"])
def test_temperature_not_finite_or_out_of_range_is_refused(tmp_path, capsys, t: str) -> None:
    text = f"[sweep]\ntemperatures = [0.5, {t}]\n" + VALID_BODY
    _refused(tmp_path, capsys, text, "[sweep].temperatures", "finite and in [0.001, 1000]")


def test_temperature_range_ends_are_accepted(tmp_path: Path) -> None:
    text = "[sweep]\ntemperatures = [1e-3, 1, 1e3]\n" + VALID_BODY
    assert load_manifest(_write(tmp_path / "m.toml", text)).options.temperatures == (
        0.001,
        1.0,
        1000.0,
    )


@pytest.mark.parametrize("key", ["copy_threshold", "copy_margin"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_copy_threshold_and_margin_must_be_finite(tmp_path, capsys, key: str, value: str) -> None:
    # nan fails 0 <= x <= 1 (every comparison with nan is false): refused by the range check.
    text = f"[sweep]\n{key} = {value}\n" + VALID_BODY
    _refused(tmp_path, capsys, text, f"[sweep].{key}", "must be in [0, 1]")


# ---- 4. names with control characters, bidi overrides or 250 characters reached file names ---

BAD_NAMES = [
    ("control", "a\\u0001b"),
    ("nul", "a\\u0000b"),
    ("newline", "a\\nb"),
    ("rtl-override", "evil\\u202Etxt.exe"),
    ("tab", "a\\tb"),
    ("space", "a b"),
    ("leading-dot", ".hidden"),
    ("leading-dash", "-rf"),
    ("slash", "x/y"),
    ("backslash", "x\\\\y"),
    ("non-ascii", "modèle"),
    ("empty", ""),
    ("too-long", "a" * 250),
]


@pytest.mark.parametrize("name", [n for _, n in BAD_NAMES], ids=[i for i, _ in BAD_NAMES])
@pytest.mark.parametrize("kind", ["model-name", "prompt-id"])
def test_hostile_name_is_refused(tmp_path, capsys, kind: str, name: str) -> None:
    if kind == "model-name":
        text, key = _model(name) + PROMPT_1, "models[0].name"
    else:
        text, key = MODEL_A + _prompt(name), "prompts[0].id"
    phrase = (
        "has 250 characters, at most 100 allowed"
        if len(name) > 100
        else "[A-Za-z0-9][A-Za-z0-9._+-]*"
    )
    line = _refused(tmp_path, capsys, text, key, phrase)
    assert all(c not in line for c in "\x00\x01\u202e\t"), repr(line)  # shown escaped


def test_the_repository_s_names_are_accepted(tmp_path: Path) -> None:
    models = ["SmolLM2-135M-Instruct", "Meta-Llama-3-8B", "gemma-2-9b", "tiny-llama", "a+b_c.d"]
    prompts = ["capital-de", "test-01", "p1", "x" * 100]
    text = "".join(_model(n) for n in models) + "".join(_prompt(p) for p in prompts)
    m = load_manifest(_write(tmp_path / "m.toml", text))
    assert [e.name for e in m.models] == models
    assert [p.id for p in m.prompts] == prompts


def test_names_differing_only_in_case_are_duplicates(tmp_path, capsys) -> None:
    # "Llama" and "llama" would overwrite each other's files on macOS and Windows.
    text = _model("Llama") + _model("b") + _model("llama") + PROMPT_1
    _refused(tmp_path, capsys, text, "models", "duplicate model name(s): Llama = llama")


def test_prompt_ids_differing_only_in_case_are_duplicates(tmp_path, capsys) -> None:
    text = MODEL_A + _prompt("Capital") + _prompt("CAPITAL")
    _refused(tmp_path, capsys, text, "prompts", "duplicate prompt id(s): Capital = CAPITAL")


@pytest.mark.parametrize("hub_id", ["org/_private", "org/模型"])
def test_a_derived_name_that_breaks_the_policy_asks_for_a_name(tmp_path, capsys, hub_id) -> None:
    text = f'[[models]]\nid = "{hub_id}"\n' + PROMPT_1
    _refused(tmp_path, capsys, text, "models[0].name", 'give the model a name = "..."')
    ok = f'[[models]]\nname = "m"\nid = "{hub_id}"\n' + PROMPT_1
    assert load_manifest(_write(tmp_path / "ok.toml", ok)).models[0].name == "m"


# ---- 5. a GGUF package that is not installed failed at run time as a model failure ----------


@pytest.mark.parametrize("package", ["not_installed_lens_pkg", "../evil", "os", "a.b.missing"])
def test_a_gguf_package_that_is_not_installed_is_bad_input(tmp_path, capsys, package) -> None:
    text = f'[[models]]\ngguf = {{ package = "{package}", file = "x.gguf" }}\n' + PROMPT_1
    _refused(tmp_path, capsys, text, "models[0].gguf.package", "pip install it")


def test_an_installed_gguf_package_is_found_without_importing_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = tmp_path / "site" / "lens_fake_gguf_pkg"
    _write(package / "__init__.py", "raise RuntimeError('imported at manifest validation')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    text = '[[models]]\ngguf = { package = "lens_fake_gguf_pkg", file = "m.gguf" }\n' + PROMPT_1
    (entry,) = load_manifest(_write(tmp_path / "m.toml", text)).models
    assert entry.source.gguf_package == "lens_fake_gguf_pkg"
    assert "lens_fake_gguf_pkg" not in sys.modules


# ---- 6. file = "/proc/self/environ" put the environment (API key included) into every artefact


def _file_prompt(name: str) -> str:
    return MODEL_A + f'[[prompts]]\nid = "p"\nfile = "{name}"\n'


def test_proc_self_environ_is_refused_and_never_read(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("LENS_SWEEP_TEST_CANARY", "canary-value-in-the-environment")
    line = _refused(
        tmp_path, capsys, _file_prompt("/proc/self/environ"), "prompts[0].file", "system file"
    )
    assert "canary-value" not in line
    with pytest.raises(ManifestError, match="system file"):
        load_manifest(tmp_path / "bad.toml", prompt_files_anywhere=True)


@pytest.mark.parametrize("target", ["/proc/self/environ", "/dev/zero", "/sys/kernel/notes"])
def test_a_symlink_into_a_system_folder_is_refused_even_anywhere(tmp_path: Path, target) -> None:
    (tmp_path / "innocent.txt").symlink_to(target)
    manifest = _write(tmp_path / "m.toml", _file_prompt("innocent.txt"))
    for anywhere in (False, True):
        with pytest.raises(ManifestError, match=r"prompts\[0\]\.file: .*system file"):
            load_manifest(manifest, prompt_files_anywhere=anywhere)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_is_refused_without_being_opened(tmp_path: Path) -> None:
    # Opening a FIFO for reading blocks until a writer comes: the check must come first.
    os.mkfifo(tmp_path / "fifo.txt")
    manifest = _write(tmp_path / "m.toml", _file_prompt("fifo.txt"))
    errors: list[str] = []

    def load() -> None:
        try:
            load_manifest(manifest, prompt_files_anywhere=True)
        except ManifestError as exc:
            errors.append(str(exc))

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive(), "load_manifest blocked on the FIFO"
    assert len(errors) == 1 and "not a regular file" in errors[0]


@pytest.mark.parametrize("key", ["file", "gguf"])
def test_a_path_with_a_newline_or_bidi_override_stays_on_one_line(tmp_path, capsys, key) -> None:
    name = "a\\nb\\u202Ec.txt"
    text = _file_prompt(name) if key == "file" else f'[[models]]\ngguf = "{name}"\n' + PROMPT_1
    where = "prompts[0].file" if key == "file" else "models[0].gguf"
    line = _refused(tmp_path, capsys, text, where, "a\\nb\\u202ec.txt")  # shown escaped
    assert "\u202e" not in line


def test_a_directory_is_not_a_prompt_file(tmp_path, capsys) -> None:
    (tmp_path / "prompts").mkdir()
    _refused(tmp_path, capsys, _file_prompt("prompts"), "prompts[0].file", "not a regular file")


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_a_prompt_file_outside_the_manifest_folder_needs_the_option(
    tmp_path, capsys, how: str
) -> None:
    outside = _write(tmp_path / "elsewhere" / "secret.txt", "private notes\n")
    top = tmp_path / "project"
    if how == "symlink":
        top.mkdir()
        (top / "p.txt").symlink_to(outside)
    name = {"dotdot": "../elsewhere/secret.txt", "absolute": str(outside), "symlink": "p.txt"}
    manifest = _write(top / "m.toml", _file_prompt(name[how]))
    line = _run_bad(tmp_path, capsys, [], manifest)
    assert "prompts[0].file" in line and "--prompt-files-anywhere" in line
    assert "private notes" not in line
    m = load_manifest(manifest, prompt_files_anywhere=True)
    assert m.prompts[0].text == "private notes"


def test_the_folder_is_the_top_level_manifest_s(tmp_path: Path) -> None:
    # An included manifest may use prompt files anywhere under the top-level folder...
    _write(tmp_path / "sub" / "p.txt", "The capital of Germany is\n")
    _write(tmp_path / "sub" / "inc.toml", '[[prompts]]\nid = "p"\nfile = "p.txt"\n')
    top = _write(tmp_path / "top.toml", 'include = ["sub/inc.toml"]\n' + MODEL_A)
    assert load_manifest(top).prompts[0].text == "The capital of Germany is"
    # ...but one included from outside that folder may not use its own neighbours.
    nested = _write(tmp_path / "sub" / "top.toml", 'include = ["../shared/inc.toml"]\n' + MODEL_A)
    _write(tmp_path / "shared" / "p.txt", "x\n")
    _write(tmp_path / "shared" / "inc.toml", '[[prompts]]\nid = "p"\nfile = "p.txt"\n')
    with pytest.raises(ManifestError, match="outside the manifest's folder"):
        load_manifest(nested)


def test_a_prompt_file_over_1_mib_is_refused(tmp_path, capsys) -> None:
    _write(tmp_path / "big.txt", "x" * (PROMPT_FILE_MAX_BYTES + 1))
    _refused(tmp_path, capsys, _file_prompt("big.txt"), "prompts[0].file", "1 MiB")
    _write(tmp_path / "big.txt", "x" * PROMPT_FILE_MAX_BYTES)
    m = load_manifest(tmp_path / "bad.toml")
    assert len(m.prompts[0].text) == PROMPT_FILE_MAX_BYTES


# ---- 7. an LLM bundle holding a secret would have been sent to the endpoint -----------------


class _Recorder(BaseHTTPRequestHandler):
    connections: ClassVar[list[tuple[str, int]]] = []
    bodies: ClassVar[list[dict]] = []

    def do_POST(self) -> None:
        _Recorder.bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        reply_json(self, {"choices": [{"message": {"content": "ok"}}]})

    def log_message(self, *args: object) -> None:
        pass


class _RecordingServer(HTTPServer):
    def verify_request(self, request, client_address) -> bool:  # every TCP connection
        _Recorder.connections.append(client_address)
        return True


@pytest.fixture
def endpoint():
    _Recorder.connections.clear()
    _Recorder.bodies.clear()
    server = _RecordingServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield ChatEndpoint(f"http://127.0.0.1:{server.server_port}/v1", timeout_s=30)
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        (API_KEY_ENV, "sk-test-0123456789abcdef"),
        ("MY_SERVICE_TOKEN", "tok-9f8e7d6c5b4a"),
        ("DB_PASSWORD", 'pa"ss wörd!'),  # JSON would escape it: checked on the texts
        ("aws_secret_access_key", "AKIAEXAMPLEEXAMPLE"),
    ],
)
def test_a_request_holding_a_secret_is_refused_before_anything_is_sent(
    endpoint: ChatEndpoint, monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    bundle = f"# Single-model evaluation request\nprompt text: {variable}={value}\n"
    with pytest.raises(LLMError) as info:
        endpoint.complete("You review lens results.", bundle)
    message = str(info.value)
    assert "\n" not in message and variable in message and "refusing to send" in message
    assert value not in message
    assert _Recorder.connections == [] and _Recorder.bodies == []


def test_a_clean_request_is_sent_and_short_values_do_not_count(
    endpoint: ChatEndpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(API_KEY_ENV, "sk-test-0123456789abcdef")
    monkeypatch.setenv("USE_TOKEN", "true")  # too short to be a secret: matches text by chance
    assert endpoint.complete("system", "a bundle that is true to the run") == "ok"
    assert len(_Recorder.connections) == 1
    assert _Recorder.bodies[0]["messages"][1]["content"] == "a bundle that is true to the run"
