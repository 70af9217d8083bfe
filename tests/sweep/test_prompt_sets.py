"""[[prompt_sets]]: CSV, JSONL, Parquet and hub rows validated as [[prompts]] are, errors that
name the file, row and column, the shipped world-capitals set, and one sweep through Ray."""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import sys
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from actors import PromptSpec
from sweep.errors import ManifestError
from sweep.manifest import Manifest, load_manifest
from sweep.prompt_sets import SET_COLUMNS, rows_from_dataset
from sweep.run import main
from tests.sweep.conftest import write_manifest
from tests.sweep.test_manifest import MODEL_A, PROMPT_1, _run_bad, _write

REPO = Path(__file__).resolve().parents[2]
HEADER = ("id", "text", "answer", "template", "group")
ROWS = [
    ("fr", "The capital of France is", "Paris", "plain", "Europe"),
    ("jp", 'Q: What is "the" capital of Japan, then? A:', "Tokyo", "qa", "Asia"),
    ("year", "The Second World War ended in", "1945", "plain", ""),  # stays text
    ("open", "Once upon a time", "", "", ""),  # no answer, no labels
]
ROWS_ABC = [("a", "Alpha is", "x"), ("b", "Beta is", "y"), ("c", "Gamma is", "z")]


def _csv(path: Path, header, rows) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _jsonl(path: Path, header, rows) -> Path:
    lines = [json.dumps(dict(zip(header, r, strict=True))) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _parquet(path: Path, header, rows) -> Path:
    columns = {h: [r[i] or None for r in rows] for i, h in enumerate(header)}
    pq.write_table(pa.table(columns, schema=pa.schema([(h, pa.string()) for h in header])), path)
    return path


WRITERS: dict[str, Callable[..., Path]] = {"csv": _csv, "jsonl": _jsonl, "parquet": _parquet}


def _set(name: str, file: str, extra: str = "") -> str:
    return f'[[prompt_sets]]\nname = "{name}"\nfile = "{file}"\n{extra}'


def _load(tmp_path: Path, text: str, **kwargs: bool) -> Manifest:
    return load_manifest(_write(tmp_path / "m.toml", text), **kwargs)


def _refused(tmp_path: Path, text: str, *phrases: str) -> str:
    """The ManifestError of a manifest; every phrase must be in its one line."""
    with pytest.raises(ManifestError) as info:
        _load(tmp_path, text)
    line = str(info.value)
    assert "\n" not in line
    for phrase in phrases:
        assert phrase in line, line
    return line


# ---- the three formats ------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_each_format_gives_the_same_prompts(tmp_path: Path, fmt: str) -> None:
    WRITERS[fmt](tmp_path / f"caps.{fmt}", HEADER, ROWS)
    m = _load(tmp_path, MODEL_A + PROMPT_1 + _set("caps", f"caps.{fmt}"))
    expected = [
        PromptSpec("fr", ROWS[0][1], "Paris", prompt_set="caps", template="plain", group="Europe"),
        PromptSpec("jp", ROWS[1][1], "Tokyo", prompt_set="caps", template="qa", group="Asia"),
        PromptSpec("year", ROWS[2][1], "1945", prompt_set="caps", template="plain"),
        PromptSpec("open", "Once upon a time", None, prompt_set="caps"),
    ]
    assert m.prompts[0].id == "p1" and m.prompts[0].role == "primary"
    assert list(m.prompts[1:]) == expected
    (info,) = m.resolved()["prompt_sets"]
    data = (tmp_path / f"caps.{fmt}").read_bytes()
    assert info == {
        "name": "caps",
        "rows": 4,
        "sha256": hashlib.sha256(data).hexdigest(),
        "file": str((tmp_path / f"caps.{fmt}").resolve()),
    }


def test_a_csv_cell_keeps_its_commas_quotes_newlines_and_spaces(tmp_path: Path) -> None:
    rows = [("a", 'Line one,\nline two: say "hi" ', " Berlin "), ("b", "Next", "x")]
    _csv(tmp_path / "s.csv", ("id", "text", "answer"), rows)
    m = _load(tmp_path, MODEL_A + _set("s", "s.csv"))
    assert [(p.text, p.answer) for p in m.prompts] == [(r[1], r[2]) for r in rows]
    # Row b starts on line 4: the quoted newline makes row a two lines long.
    (tmp_path / "s.csv").write_text('id,text,answer\na,"one\ntwo",x\nb,Next,  \n')
    _refused(tmp_path, MODEL_A + _set("s", "s.csv"), "row 2 (line 4), column 'answer'")


def test_a_byte_order_mark_and_blank_lines_are_not_rows(tmp_path: Path) -> None:
    (tmp_path / "s.csv").write_bytes(b"\xef\xbb\xbfid,text,answer\r\n\r\na,Hello,x\r\n\r\n")
    (tmp_path / "s.jsonl").write_text('\n{"id": "b", "text": "Hi", "answer": null}\n\n')
    m = _load(tmp_path, MODEL_A + _set("c", "s.csv") + _set("j", "s.jsonl"))
    assert [(p.id, p.text, p.answer) for p in m.prompts] == [("a", "Hello", "x"), ("b", "Hi", None)]


def test_columns_map_our_names_to_the_files_and_extra_columns_are_ignored(tmp_path: Path) -> None:
    header = ("key", "question", "target", "kind", "notes")
    rows = [
        ("q1", "Two plus two is", "four", "control", "ignored"),
        ("q0", "One and one", "two", "", ""),
    ]
    _csv(tmp_path / "qa.csv", header, rows)
    columns = 'columns = { id = "key", text = "question", answer = "target", role = "kind" }\n'
    m = _load(tmp_path, MODEL_A + _set("qa", "qa.csv", columns))
    control, plain = m.prompts
    assert (control.id, control.text, control.answer, control.role) == (
        "q1",
        "Two plus two is",
        "four",
        "control",
    )
    assert (control.reference, control.foil) == ("q0", "two")  # read against the primary, q0
    assert plain.role == "primary"
    # An error names the file's column and ours.
    (tmp_path / "qa.csv").write_text("key,question,target\nq1,Hi, \n")
    _refused(tmp_path, MODEL_A + _set("qa", "qa.csv", columns), "column 'target' (answer)")


def test_limit_takes_the_first_rows_and_reads_no_further(tmp_path: Path) -> None:
    _csv(tmp_path / "s.csv", ("id", "text", "answer"), [*ROWS_ABC, ("bad id!", "", "  ")])
    m = _load(tmp_path, MODEL_A + _set("s", "s.csv", "limit = 2\n"))
    assert [p.id for p in m.prompts] == ["a", "b"]
    assert m.resolved()["prompt_sets"][0]["rows"] == 2
    for limit in ("0", "1.5", "true"):
        _refused(
            tmp_path, MODEL_A + _set("s", "s.csv", f"limit = {limit}\n"), "prompt_sets[0].limit"
        )


def test_positions_apply_to_every_row(tmp_path: Path) -> None:
    _csv(tmp_path / "s.csv", ("id", "text", "answer"), ROWS_ABC)
    m = _load(tmp_path, MODEL_A + _set("s", "s.csv", 'positions = "all"\n'))
    assert {p.positions for p in m.prompts} == {"all"}


# ---- roles and references across sets and [[prompts]] -----------------------------------------


def test_controls_and_ablations_reference_across_sets_and_prompts(tmp_path: Path) -> None:
    header = ("id", "text", "answer", "role", "control_of", "ablation_of", "suite")
    rows = [
        ("s-fr", "The capital of France is", "Paris", "", "", "", "caps"),
        ("s-it", "The capital of Italy is", "Rome", "control", "p1", "", "caps"),  # -> TOML
        ("s-jp", "The capital of Japan is", "Tokyo", "control", "", "", ""),  # -> the primary
        ("s-de2", "The capital of Germany is:", "", "", "", "p1", ""),
    ]
    _csv(tmp_path / "s.csv", header, rows)
    toml_control = (
        '[[prompts]]\nid = "t-es"\ntext = "The capital of Spain is"\nanswer = "Madrid"\n'
        'role = "control"\ncontrol_of = "s-fr"\n'
    )
    m = _load(tmp_path, MODEL_A + PROMPT_1 + toml_control + _set("s", "s.csv"))
    by_id = {p.id: p for p in m.prompts}
    assert [p.id for p in m.prompts] == ["p1", "t-es", "s-fr", "s-it", "s-jp", "s-de2"]
    assert by_id["p1"].role == "primary"
    assert (by_id["t-es"].reference, by_id["t-es"].foil) == ("s-fr", "Paris")
    assert (by_id["s-it"].role, by_id["s-it"].reference, by_id["s-it"].foil) == (
        "control",
        "p1",
        "Berlin",
    )
    assert (by_id["s-jp"].reference, by_id["s-jp"].foil) == ("p1", "Berlin")
    assert (by_id["s-de2"].role, by_id["s-de2"].reference) == ("ablation", "p1")
    assert by_id["s-fr"].suite == by_id["s-it"].suite == "caps"
    # The resolved manifest lists the set rows with a role (their test rows stay in the file).
    listed = [p["id"] for p in m.resolved()["prompts"]]
    assert listed == ["p1", "t-es", "s-it", "s-jp", "s-de2"]


def test_a_set_row_is_primary_only_when_there_are_no_prompts_tables(tmp_path: Path) -> None:
    rows = [("ctl", "C is", "w", "control"), *[(*r, "") for r in ROWS_ABC]]
    _csv(tmp_path / "s.csv", ("id", "text", "answer", "role"), rows)
    only_sets = _load(tmp_path, MODEL_A + _set("s", "s.csv"))
    assert [p.role for p in only_sets.prompts] == ["control", "primary", "test", "test"]
    assert only_sets.prompts[0].reference == "a"
    control = '[[prompts]]\nid = "t"\ntext = "T is"\nanswer = "y"\nrole = "control"\n'
    _refused(tmp_path, MODEL_A + control + _set("s", "s.csv"), "every prompt is a control")


def test_order_is_includes_first_then_each_files_prompts_then_its_sets(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    _csv(tmp_path / "sub" / "inc.csv", ("id", "text", "answer"), [("inc-row", "I is", "i")])
    _csv(tmp_path / "top.csv", ("id", "text", "answer"), [("top-row", "T is", "t")])
    inc = '[[prompts]]\nid = "inc-prompt"\ntext = "P is"\n' + _set("inc", "inc.csv")
    _write(tmp_path / "sub" / "inc.toml", inc)
    top = _set("top", "top.csv") + '[[prompts]]\nid = "top-prompt"\ntext = "Q is"\n'
    m = _load(tmp_path, 'include = ["sub/inc.toml"]\n' + MODEL_A + top)
    assert [p.id for p in m.prompts] == ["inc-prompt", "inc-row", "top-prompt", "top-row"]
    assert [s["name"] for s in m.resolved()["prompt_sets"]] == ["inc", "top"]


def test_changed_data_changes_the_fingerprint(tmp_path: Path) -> None:
    _csv(tmp_path / "s.csv", ("id", "text", "answer"), ROWS_ABC)
    text = MODEL_A + _set("s", "s.csv")
    before = _load(tmp_path, text)
    _csv(tmp_path / "s.csv", ("id", "text", "answer"), [*ROWS_ABC[:2], ("c", "Gamma is", "w")])
    after = _load(tmp_path, text)
    assert before.fingerprint(before.models[0]) != after.fingerprint(after.models[0])
    assert (
        before.resolved()["prompt_sets"][0]["sha256"]
        != after.resolved()["prompt_sets"][0]["sha256"]
    )


# ---- bad rows, bad files, bad tables ----------------------------------------------------------

BAD_ROWS = [
    # (name, file name, content, where, phrase)
    (
        "missing-column",
        "s.csv",
        "id,text\na,Hello\n",
        "line 1",
        "no column 'answer'; columns found: 'id', 'text'",
    ),
    (
        "empty-text",
        "s.csv",
        "id,text,answer\na,Hi,x\nb,,y\n",
        "row 2 (line 3), column 'text'",
        "empty",
    ),
    ("empty-id", "s.csv", "id,text,answer\n,Hi,x\n", "row 1 (line 2), column 'id'", "empty"),
    (
        "whitespace-answer",
        "s.csv",
        'id,text,answer\na,Hi,x\nb,Ho,"  "\n',
        "row 2 (line 3), column 'answer'",
        "only whitespace",
    ),
    (
        "bad-role",
        "s.csv",
        "id,text,answer,role\na,Hi,x,primary\n",
        "row 1 (line 2), column 'role'",
        "must be 'test' or 'control', got 'primary'",
    ),
    (
        "bad-id",
        "s.csv",
        "id,text,answer\nnot ok,Hi,x\n",
        "row 1 (line 2), column 'id'",
        "prompt id 'not ok' does not match",
    ),
    (
        "unknown-reference",
        "s.csv",
        "id,text,answer,role,control_of\na,Hi,x,,\nb,Ho,y,control,aa\n",
        "row 2 (line 3), column 'control_of'",
        "no prompt has the id 'aa'",
    ),
    (
        "lonely-suite",
        "s.csv",
        "id,text,answer,suite\na,Hi,x,solo\nb,Ho,y,\n",
        "row 1 (line 2), column 'suite'",
        "has only this prompt",
    ),
    ("field-count", "s.csv", "id,text,answer\na,Hi,x,extra\n", "row 1 (line 2)", "has 4 fields"),
    ("bad-quote", "s.csv", 'id,text,answer\na,"Hi"x,y\n', "line 2", "malformed CSV"),
    ("header-only", "s.csv", "id,text,answer\n", "prompt_sets[0]", "has no rows"),
    ("empty-file", "s.csv", "", "line 1", "the file is empty"),
    (
        "non-utf8",
        "s.csv",
        b"id,text,answer\na,Hi,x\nb,caf\xe9,y\n",
        "line 3",
        "not UTF-8 text (byte 6 of the line)",
    ),
    (
        "json-number",
        "s.jsonl",
        '{"id": "a", "text": "The war ended in", "answer": 1945}\n',
        "row 1 (line 1), column 'answer'",
        "expected a string, got int 1945",
    ),
    (
        "json-bool-text",
        "s.jsonl",
        '{"id": "a", "text": "Hi", "answer": "x"}\n\n{"id": "b", "text": true, "answer": "x"}\n',
        "row 2 (line 3), column 'text'",
        "expected a string, got a boolean",
    ),
    (
        "json-malformed",
        "s.jsonl",
        '{"id": "a", "text": "Hi", "answer": "x"}\n{"id": "b", "text": "Ho" "answer": "y"}\n',
        "row 2 (line 2)",
        "malformed JSON: Expecting ',' delimiter",
    ),
    ("json-array", "s.jsonl", '["a", "Hi", "x"]\n', "row 1 (line 1)", "expected a JSON object"),
    (
        "json-missing-key",
        "s.jsonl",
        '{"id": "a", "text": "Hi"}\n',
        "row 1 (line 1)",
        "no column 'answer'; columns found: 'id', 'text' (null for no answer)",
    ),
]


@pytest.mark.parametrize(
    ("file", "content", "where", "phrase"), [b[1:] for b in BAD_ROWS], ids=[b[0] for b in BAD_ROWS]
)
def test_a_bad_row_names_the_file_row_and_column(
    tmp_path: Path, file: str, content: str | bytes, where: str, phrase: str
) -> None:
    data = tmp_path / file
    data.write_bytes(content if isinstance(content, bytes) else content.encode())
    line = _refused(tmp_path, MODEL_A + _set("s", file), f": {where}: ", phrase)
    named = str(tmp_path / "m.toml") if where.startswith("prompt_sets") else str(data)
    assert line.startswith(f"{named}: {where}: "), line


def test_a_parquet_column_of_numbers_is_refused_not_coerced(tmp_path: Path) -> None:
    table = pa.table({"id": ["a"], "text": ["The war ended in"], "answer": pa.array([1945])})
    pq.write_table(table, tmp_path / "s.parquet")
    _refused(
        tmp_path,
        MODEL_A + _set("s", "s.parquet"),
        f"{tmp_path / 's.parquet'}: column 'answer': expected text (strings), found int64",
    )
    pq.write_table(pa.table({"id": ["a"], "prompt": ["Hi"]}), tmp_path / "s.parquet")
    _refused(tmp_path, MODEL_A + _set("s", "s.parquet"), "no column 'text'", "'id', 'prompt'")
    (tmp_path / "s.parquet").write_text("id,text,answer\n")
    _refused(tmp_path, MODEL_A + _set("s", "s.parquet"), "not a readable Parquet file")


def test_a_duplicate_id_names_the_sets_file_and_row(tmp_path: Path) -> None:
    _csv(tmp_path / "s.csv", ("id", "text", "answer"), [("a", "A is", "x"), ("P1", "B is", "y")])
    line = _refused(tmp_path, MODEL_A + PROMPT_1 + _set("s", "s.csv"))
    assert line.startswith(f"{tmp_path / 's.csv'}: row 2 (line 3), column 'id': "), line
    assert "duplicate prompt id 'P1'" in line and f"{tmp_path / 'm.toml'}: prompts[0]" in line
    # Two sets: the second row is named, the first by its row.
    _csv(tmp_path / "t.csv", ("id", "text", "answer"), [("z", "Z is", "x"), ("a", "A2 is", "y")])
    line = _refused(tmp_path, MODEL_A + _set("s", "s.csv") + _set("t", "t.csv"))
    assert line.startswith(f"{tmp_path / 't.csv'}: row 2 (line 3), column 'id': "), line
    assert f"{tmp_path / 's.csv'}: row 1 (line 2) has 'a' already" in line


BAD_TABLES = [
    ("unknown-key", 'fle = "s.csv"\n', "prompt_sets[0]", "unknown key 'fle'; did you mean 'file'?"),
    ("both", 'file = "s.csv"\ndataset = "a/b"\n', "prompt_sets[0]", "exactly one of 'file'"),
    ("neither", "", "prompt_sets[0]", "exactly one of 'file'"),
    ("split-with-file", 'file = "s.csv"\nsplit = "test"\n', "prompt_sets[0].split", "hub dataset"),
    ("positions", 'file = "s.csv"\npositions = "first"\n', "prompt_sets[0].positions", "'first'"),
    (
        "columns-key",
        'file = "s.csv"\ncolumns = { txt = "q" }\n',
        "prompt_sets[0].columns",
        "unknown key 'txt'; did you mean 'text'?",
    ),
    ("columns-type", 'file = "s.csv"\ncolumns = { text = 1 }\n', "columns.text", "a column name"),
    ("suffix", 'file = "s.tsv"\n', "prompt_sets[0].file", "unknown format '.tsv'"),
    ("missing", 'file = "nope.csv"\n', "prompt_sets[0].file", "prompt set file not found"),
    ("directory", 'file = "d.csv"\n', "prompt_sets[0].file", "not a regular file"),
]


@pytest.mark.parametrize(
    ("body", "where", "phrase"), [b[1:] for b in BAD_TABLES], ids=[b[0] for b in BAD_TABLES]
)
def test_a_bad_prompt_sets_table_names_the_manifest_and_key(
    tmp_path: Path, body: str, where: str, phrase: str
) -> None:
    _csv(tmp_path / "s.csv", ("id", "text", "answer"), ROWS_ABC)
    (tmp_path / "d.csv").mkdir()
    line = _refused(tmp_path, MODEL_A + f'[[prompt_sets]]\nname = "s"\n{body}', where, phrase)
    assert line.startswith(f"{tmp_path / 'm.toml'}: "), line


def test_set_names_follow_the_name_rules_and_are_unique(tmp_path: Path) -> None:
    _csv(tmp_path / "s.csv", ("id", "text", "answer"), ROWS_ABC)
    _csv(tmp_path / "t.csv", ("id", "text", "answer"), [("d", "D is", "x")])
    _refused(tmp_path, MODEL_A + _set("a b", "s.csv"), "prompt_sets[0].name", "does not match")
    _refused(
        tmp_path,
        MODEL_A + _set("S", "s.csv") + _set("s", "t.csv"),
        "duplicate prompt set name: S = s",
    )


def test_a_file_outside_the_manifests_folder_is_refused_unless_allowed(tmp_path: Path) -> None:
    outside = _csv(tmp_path / "data.csv", ("id", "text", "answer"), ROWS_ABC)
    text = MODEL_A + _set("s", str(outside))
    with pytest.raises(ManifestError, match=r"prompt_sets\[0\]\.file: .*outside the manifest's"):
        load_manifest(_write(tmp_path / "sub" / "m.toml", text))
    m = load_manifest(tmp_path / "sub" / "m.toml", prompt_files_anywhere=True)
    assert [p.id for p in m.prompts] == ["a", "b", "c"]
    with pytest.raises(ManifestError, match="system file"):
        load_manifest(
            _write(tmp_path / "m.toml", MODEL_A + _set("s", "/dev/stdin.csv")),
            prompt_files_anywhere=True,
        )


def test_a_bad_set_through_the_cli_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "s.csv").write_text("id,text,answer\na,Hi,x\nb,Ho,\t\n")
    line = _run_bad(tmp_path, capsys, [], _write(tmp_path / "m.toml", MODEL_A + _set("s", "s.csv")))
    assert line.startswith(f"error: {tmp_path / 's.csv'}: row 2 (line 3), column 'answer': ")


def test_ten_thousand_rows_load(tmp_path: Path) -> None:
    rows = [(f"p{i}", f"The capital of country {i} is", f"C{i}") for i in range(10_000)]
    _csv(tmp_path / "big.csv", ("id", "text", "answer"), rows)
    m = _load(tmp_path, MODEL_A + _set("big", "big.csv"))
    assert len(m.prompts) == 10_000 and m.prompts[-1].answer == "C9999"


# ---- hub datasets -----------------------------------------------------------------------------


def test_a_hub_dataset_offline_is_a_clear_error_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    body = MODEL_A + '[[prompt_sets]]\nname = "h"\ndataset = "lens-sweep-tests/no-such-set"\n'
    _refused(
        tmp_path,
        body,
        "prompt_sets[0].dataset: cannot load hub dataset 'lens-sweep-tests/no-such-set' "
        "(split 'train')",
        "HF_HUB_OFFLINE",
    )


def test_a_hub_dataset_without_the_datasets_package_says_how_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets raises ImportError
    body = MODEL_A + '[[prompt_sets]]\nname = "h"\ndataset = "org/set"\nsplit = "test"\n'
    _refused(tmp_path, body, "hub dataset 'org/set' (split 'test')", "pip install datasets")


def test_a_path_is_not_taken_for_a_hub_dataset(tmp_path: Path) -> None:
    body = MODEL_A + '[[prompt_sets]]\nname = "h"\ndataset = "./data"\n'
    _refused(tmp_path, body, "prompt_sets[0].dataset", "a path, not a hub dataset id")


def test_a_loaded_datasets_dataset_gives_its_rows_as_text(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    columns = {c: c for c in SET_COLUMNS} | {"text": "question"}
    ds = datasets.Dataset.from_dict(
        {"id": ["a", "b"], "question": ["Hi", "Ho"], "answer": ["x", None], "n": [1, 2]}
    )
    data = rows_from_dataset(ds, columns, limit=None)
    assert [
        (r.number, r.line, r.cells["id"], r.cells["text"], r.cells["answer"]) for r in data.rows
    ] == [
        (1, None, "a", "Hi", "x"),
        (2, None, "b", "Ho", None),
    ]
    assert len(rows_from_dataset(ds, columns, limit=1).rows) == 1
    numbers = datasets.Dataset.from_dict({"id": ["a"], "question": ["Hi"], "answer": [3]})
    with pytest.raises(
        ValueError, match=r"column 'answer': expected text \(strings\), found int64"
    ):
        rows_from_dataset(numbers, columns, limit=None)


# ---- the shipped world-capitals set -----------------------------------------------------------


def test_the_shipped_world_capitals_set_loads_through_capitals_toml() -> None:
    m = load_manifest(REPO / "manifests" / "capitals.toml")
    assert m.options.batch_size == 32 and len(m.models) == 2
    assert m.prompts[0].id == "capital-de" and m.prompts[0].role == "primary"
    caps = [p for p in m.prompts if p.prompt_set == "world-capitals"]
    templates = {p.template for p in caps}
    countries = {p.id.removeprefix("cap-").removesuffix(f"-{p.template}") for p in caps}
    assert len(templates) >= 3 and len(countries) >= 180
    assert len(caps) == len(countries) * len(templates)
    assert len({p.id.lower() for p in m.prompts}) == len(m.prompts)
    assert all(p.answer and p.answer.strip() == p.answer for p in caps)
    assert all(p.role == "test" and p.group for p in caps)
    by_id = {p.id: p for p in caps}
    assert by_id["cap-netherlands-plain"].text == "The capital of the Netherlands is"
    assert by_id["cap-netherlands-plain"].answer == "Amsterdam"
    assert by_id["cap-australia-qa"].answer == "Canberra"
    assert by_id["cap-united-states-qa"].answer == "Washington, D.C."
    (info,) = m.resolved()["prompt_sets"]
    assert info["rows"] == len(caps)


def test_the_world_capitals_script_reproduces_the_committed_csv() -> None:
    script = REPO / "manifests" / "prompts" / "make_world_capitals.py"
    spec = importlib.util.spec_from_file_location("make_world_capitals", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.render() == module.CSV_PATH.read_text(encoding="utf-8")


# ---- one sweep through Ray --------------------------------------------------------------------


def test_set_prompts_run_through_the_sweep_with_their_labels(
    tmp_path: Path, tiny_checkpoints: dict[str, Path]
) -> None:
    manifest = write_manifest(tmp_path / "m.toml", {"tiny-llama": tiny_checkpoints["llama"]})
    facts = [
        ("France", "Paris", "Europe"),
        ("Japan", "Tokyo", "Asia"),
        ("Peru", "Lima", "Americas"),
    ]
    wordings = [("plain", "The capital of {c} is"), ("qa", "Q: What is the capital of {c}? A:")]
    csv_rows = [
        (f"cap-{c.lower()}-{t}", w.format(c=c), a, t, g) for c, a, g in facts for t, w in wordings
    ]
    _csv(tmp_path / "caps.csv", HEADER, csv_rows)
    _jsonl(tmp_path / "more.jsonl", HEADER, [("j1", "Chile's capital is", "Santiago", "plain", "")])
    _parquet(
        tmp_path / "pq.parquet", HEADER, [("q1", "Kenya's capital is", "Nairobi", "qa", "Africa")]
    )
    with open(manifest, "a") as f:
        f.write(_set("caps", "caps.csv") + _set("more", "more.jsonl") + _set("pq", "pq.parquet"))
    out = tmp_path / "results"
    assert main([str(manifest), "--out", str(out), "--no-progress", "--num-cpus", "1"]) == 0
    run = out / "run-latest"
    rows = {
        r["prompt_id"]: r for r in pq.read_table(run / "prompts-tiny-llama.parquet").to_pylist()
    }
    expected = {r[0]: ("caps", r[3], r[4]) for r in csv_rows}
    expected |= {"j1": ("more", "plain", None), "q1": ("pq", "qa", "Africa")}
    for pid, labels in expected.items():
        assert (rows[pid]["prompt_set"], rows[pid]["template"], rows[pid]["group"]) == labels
        assert rows[pid]["role"] == "test"
    assert rows["capital-de"]["prompt_set"] is None and rows["capital-de"]["role"] == "primary"
    resolved = json.loads((run / "manifest.resolved.json").read_text())
    assert [(s["name"], s["rows"]) for s in resolved["prompt_sets"]] == [
        ("caps", 6),
        ("more", 1),
        ("pq", 1),
    ]
    # The JSON keeps per-prompt blocks and temperature rows for the [[prompts]] only; a set's
    # prompts are counted there and read from the Parquet (its size follows the hand-written
    # prompts, not the data set).
    info = json.loads((run / "output-tiny-llama.json").read_text())
    own = {pid for pid, r in rows.items() if r["prompt_set"] is None}
    assert {p["prompt_id"] for p in info["prompts"]} == own
    assert {t["prompt_id"] for t in info["temperature_exploration"]} == own
    assert info["prompt_sets"] == {
        name: {"n_prompts": n, "per_prompt": "prompts-tiny-llama.parquet"}
        for name, n in (("caps", 6), ("more", 1), ("pq", 1))
    }
    assert info["statistics"]["sets"]
