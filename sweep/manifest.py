"""TOML manifests -> one validated, frozen Manifest. Every error names the file and the key.

A manifest may ``include`` others (paths relative to it): their [sweep] tables are merged
(the including file wins) and their models and prompts come first, in include order. Within a
file, its [[prompts]] come before the rows of its [[prompt_sets]] (read by sweep.prompt_sets);
a set's rows pass the same validation as a [[prompts]] table.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import json
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import tomllib

from actors.config import ActorConfig
from actors.prompts import PromptSpec
from actors.sources import ModelSource
from sweep.errors import ManifestError
from sweep.prompt_files import read_prompt_file
from sweep.prompt_sets import (
    SET_COLUMNS,
    RowError,
    SetData,
    column_where,
    hub_name,
    read_hub_set,
    read_set_file,
    row_where,
)

LENS_MODES = ("final", "next_ln1", "raw")
# lens_kernel.translators.TRANSLATOR_KINDS, spelled here so a head node needs no torch.
TRAINED_LENSES = ("tuned", "prism")
DTYPES = ("float32", "float16", "bfloat16")
DEVICES = ("cuda", "mps", "cpu")
# lens_kernel.unembed.PRECISIONS, repeated here: the head node plans without torch.
UNEMBED_PRECISIONS = ("float32", "tf32", "bfloat16")
SEED_MAX = 2**32 - 1  # numpy's seed range; torch and random accept it too
TEMPERATURE_RANGE = (1e-3, 1e3)  # beyond it logits / T overflow to inf and the output to NaN
# Model names and prompt ids become parts of file names, CSV rows and report lines.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
NAME_MAX_CHARS = 100


_LENS_DEFAULTS = {f.name: f.default for f in fields(ActorConfig)}


@dataclass(frozen=True)
class SweepOptions:
    """The [sweep] table. Lens defaults are ActorConfig's (one place); the rest live here."""

    name: str = "sweep"
    lens: str = _LENS_DEFAULTS["lens"]  # the primary lens, a norm mode
    # Every lens to decode (norm modes and trained lenses), the primary first whether listed or
    # not; empty: the primary alone. Trained lenses are fitted by sweep.fit ([fit]) if missing.
    lenses: tuple[str, ...] = ()
    seed: int = _LENS_DEFAULTS["seed"]
    top_k: int = _LENS_DEFAULTS["top_k"]
    copy_threshold: float = _LENS_DEFAULTS["copy_threshold"]
    copy_margin: float = _LENS_DEFAULTS["copy_margin"]
    batch_size: int = 16  # the most prompts in one batch
    batch_tokens: int = 8192  # the most rows x padded tokens in one batch (a longer prompt: alone)
    temperatures: tuple[float, ...] = _LENS_DEFAULTS["temperatures"]
    prepend_bos: bool = _LENS_DEFAULTS["prepend_bos"]
    keep_layernorm_bias: bool = _LENS_DEFAULTS["keep_layernorm_bias"]
    keep_residuals: bool = _LENS_DEFAULTS["keep_residuals"]
    audit: bool = _LENS_DEFAULTS["audit"]
    unembed_precision: str = _LENS_DEFAULTS["unembed_precision"]
    max_seq_len: int = 256  # for memory estimates only; prompts are never cut
    # When a model ends, the CPU cores it held may run another actor of a slower CPU model on
    # that node (sweep.execute); results are the same either way.
    replicas: bool = True

    @property
    def decoded_lenses(self) -> tuple[str, ...]:
        """Every lens decoded, the primary first."""
        return tuple(dict.fromkeys([self.lens, *self.lenses]))

    @property
    def trained_lenses(self) -> tuple[str, ...]:
        return tuple(x for x in self.decoded_lenses if x in TRAINED_LENSES)


@dataclass(frozen=True)
class ModelEntry:
    name: str
    source: ModelSource
    dtype: str | None = None
    device: str | None = None  # None: the planner chooses cuda -> mps -> cpu
    unembed_precision: str | None = None  # None: the [sweep] table's


@dataclass(frozen=True)
class PromptSetInfo:
    """Where a [[prompt_sets]] table's rows came from, as the resolved manifest records it."""

    name: str
    rows: int  # rows used (after limit)
    sha256: str  # a file's: of its bytes; a hub dataset's: of the rows read, as JSON lines
    file: str | None = None  # absolute: the naming manifest's folder / file
    dataset: str | None = None  # hub id, with its split and revision
    split: str | None = None
    revision: str | None = None


@dataclass(frozen=True)
class Manifest:
    path: Path
    options: SweepOptions
    models: tuple[ModelEntry, ...]
    prompts: tuple[PromptSpec, ...]
    sources: tuple[str, ...] = field(default=())  # every manifest file read, includes first
    prompt_sets: tuple[PromptSetInfo, ...] = field(default=())

    def fingerprint(self, model: ModelEntry) -> str:
        """Hash of everything that determines a model's results (not its artefact paths)."""
        payload = {
            "model": {**asdict(model), "source": asdict(model.source)},
            # Scheduling only: how the work is spread leaves every result as it is.
            "options": {k: v for k, v in asdict(self.options).items() if k != "replicas"},
            "prompts": [asdict(p) for p in self.prompts],
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def resolved(self) -> dict[str, Any]:
        """A plain, TOML-like dict of the fully resolved manifest (written into the run): every
        [[prompts]] entry, and of the prompt sets the prompts with another role than test."""
        return {
            "sweep": asdict(self.options),
            "models": [
                {
                    "name": m.name,
                    **{k: v for k, v in asdict(m.source).items() if v not in (None, False)},
                    "dtype": m.dtype,
                    "device": m.device,
                    "unembed_precision": m.unembed_precision,
                }
                for m in self.models
            ],
            # A set's test prompts are rows of its file (path, sha256 and rows under
            # "prompt_sets"): 10,000 of them here would make this file the driver's largest.
            "prompts": [
                asdict(p) for p in self.prompts if p.prompt_set is None or p.role != "test"
            ],
            "prompt_sets": [
                {k: v for k, v in asdict(s).items() if v is not None} for s in self.prompt_sets
            ],
            "files": list(self.sources),
        }


_TOP_KEYS = (
    "include",
    "sweep",
    "models",
    "prompts",
    "prompt_sets",
    "fit",
)  # [fit]: sweep/fit_options.py
_SWEEP_KEYS = tuple(SweepOptions.__dataclass_fields__)
_MODEL_KEYS = (
    "name",
    "id",
    "gguf",
    "dtype",
    "device",
    "unembed_precision",
    "revision",
    "trust_remote_code",
)
_GGUF_KEYS = ("package", "file")
_ROLE_KEYS = ("role", "control_of", "ablation_of", "suite")  # roles, references, suites
_LABEL_KEYS = ("template", "group")  # free labels the statistics are broken down by
_PROMPT_KEYS = ("id", "text", "file", "answer", "positions", "primary", *_ROLE_KEYS, *_LABEL_KEYS)
_SET_KEYS = ("name", "file", "dataset", "split", "revision", "positions", "limit", "columns")
# Roles a prompt may name; "primary" comes from primary = true, "ablation" from ablation_of.
_EXPLICIT_ROLES = ("test", "control")


@dataclass(frozen=True)
class _Origin:
    """Where a prompt was written, for its error lines: a [[prompts]] table, or a set's row."""

    path: Path | str  # the manifest; for a set row its data file (or hub dataset)
    where: str  # "prompts[3]", or "row 17 (line 18)"
    columns: Mapping[str, str] | None = None  # a set's: our column name -> the file's

    def at(self, key: str) -> str:
        if self.columns is None:
            return f"{self.where}.{key}"
        return f"{self.where}, {column_where(key, self.columns)}"


def _fail(path: Path | str, where: str, message: str) -> ManifestError:
    # One line whatever the input: control and bidi characters (in a path, say) are escaped.
    line = f"{path}: {where}: {message}"
    return ManifestError("".join(c if c.isprintable() else ascii(c)[1:-1] for c in line))


def _check_keys(path: Path, where: str, table: dict[str, Any], allowed: tuple[str, ...]) -> None:
    for key in table:
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=3, cutoff=0.6)
            hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            raise _fail(path, where, f"unknown key {key!r}{hint} (allowed: {', '.join(allowed)})")


def _name_problem(name: str) -> str | None:
    """What is wrong with a model name or prompt id, or None."""
    if len(name) > NAME_MAX_CHARS:
        return f"has {len(name)} characters, at most {NAME_MAX_CHARS} allowed"
    if not NAME_PATTERN.fullmatch(name):
        return (
            f"does not match {NAME_PATTERN.pattern} "
            "(letters, digits and . _ + -, starting with a letter or digit)"
        )
    return None


def _shown(name: str) -> str:
    """A name for an error line: repr escapes control and bidi characters; long ones are cut."""
    return repr(name) if len(name) <= 60 else f"{name[:40]!r}..."


def _check_name(path: Path | str, where: str, name: str, what: str) -> None:
    if problem := _name_problem(name):
        raise _fail(path, where, f"{what} {_shown(name)} {problem}")


def _package_installed(name: str) -> bool:
    """Whether ``name`` is an installed package, found without importing it (a dotted name
    imports its parents)."""
    if not all(part.isidentifier() for part in name.split(".")):
        return False
    try:
        spec = importlib.util.find_spec(name)
    except ImportError:  # the parent of a dotted name is missing
        return False
    return spec is not None and spec.submodule_search_locations is not None


def _typed(
    path: Path | str, where: str, value: Any, kind: type | tuple[type, ...], what: str
) -> Any:
    # bool is an int in Python: never accept it where a number is meant.
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise _fail(path, where, f"expected {what}, got a boolean")
    if not isinstance(value, kind):
        raise _fail(path, where, f"expected {what}, got {type(value).__name__} {value!r}")
    return value


def _read_toml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ManifestError(f"{path}: manifest file not found")
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ManifestError(f"{path}: TOML syntax error: {exc}") from None
    except UnicodeDecodeError as exc:  # tomllib decodes before parsing and lets this through
        raise ManifestError(f"{path}: not UTF-8 text: {exc}") from None


def _parse_sweep(path: Path, table: Any, base: dict[str, Any]) -> dict[str, Any]:
    table = _typed(path, "[sweep]", table, dict, "a table")
    _check_keys(path, "[sweep]", table, _SWEEP_KEYS)
    merged = dict(base)
    for key, value in table.items():
        where = f"[sweep].{key}"
        if key in ("name", "lens", "unembed_precision"):
            _typed(path, where, value, str, "a string")
        elif key in ("seed", "top_k", "batch_size", "batch_tokens", "max_seq_len"):
            _typed(path, where, value, int, "an integer")
        elif key in ("copy_threshold", "copy_margin"):
            value = float(_typed(path, where, value, (int, float), "a number"))
        elif key in ("prepend_bos", "keep_layernorm_bias", "keep_residuals", "audit", "replicas"):
            _typed(path, where, value, bool, "true or false")
        elif key == "lenses":
            _typed(path, where, value, list, "a list of lens names")
            value = tuple(_typed(path, where, x, str, "a list of lens names") for x in value)
        elif key == "temperatures":
            _typed(path, where, value, list, "a list of numbers")
            value = tuple(float(_typed(path, where, t, (int, float), "a number")) for t in value)
        merged[key] = value
    return merged


def _check_options(path: Path, o: SweepOptions) -> None:
    t_lo, t_hi = TEMPERATURE_RANGE
    # Comparisons with nan are false, so the range checks below also refuse nan.
    checks = [
        (
            "lens",
            o.lens in LENS_MODES,
            f"must be one of {', '.join(LENS_MODES)} (the primary "
            "lens; trained lenses go in lenses)",
        ),
        (
            "lenses",
            all(x in (*LENS_MODES, *TRAINED_LENSES) for x in o.lenses)
            and len(set(o.lenses)) == len(o.lenses),
            f"must be distinct names out of {', '.join((*LENS_MODES, *TRAINED_LENSES))}",
        ),
        (
            "unembed_precision",
            o.unembed_precision in UNEMBED_PRECISIONS,
            f"must be one of {', '.join(UNEMBED_PRECISIONS)}",
        ),
        ("top_k", 2 <= o.top_k <= 1000, "must be between 2 and 1000"),
        ("batch_size", o.batch_size >= 1, "must be >= 1"),
        ("batch_tokens", o.batch_tokens >= 1, "must be >= 1"),
        ("copy_threshold", 0.0 <= o.copy_threshold <= 1.0, "must be in [0, 1]"),
        ("copy_margin", 0.0 <= o.copy_margin <= 1.0, "must be in [0, 1]"),
        (
            "temperatures",
            all(math.isfinite(t) and t_lo <= t <= t_hi for t in o.temperatures),
            f"every temperature must be finite and in [{t_lo:g}, {t_hi:g}]",
        ),
        ("seed", 0 <= o.seed <= SEED_MAX, f"must be in [0, 2**32 - 1] = [0, {SEED_MAX}]"),
        ("max_seq_len", o.max_seq_len >= 1, "must be >= 1"),
    ]
    for key, ok, message in checks:
        if not ok:
            raise _fail(path, f"[sweep].{key}", f"{message}, got {getattr(o, key)!r}")


def _parse_model(path: Path, i: int, table: Any) -> ModelEntry:
    where = f"models[{i}]"
    table = _typed(path, where, table, dict, "a table ([[models]])")
    _check_keys(path, where, table, _MODEL_KEYS)
    has_id, has_gguf = "id" in table, "gguf" in table
    if has_id == has_gguf:
        raise _fail(path, where, "give exactly one of 'id' (hub id or directory) or 'gguf'")
    common = {
        "revision": table.get("revision"),
        "trust_remote_code": table.get("trust_remote_code", False),
    }
    if common["revision"] is not None:
        _typed(path, f"{where}.revision", common["revision"], str, "a string")
    _typed(path, f"{where}.trust_remote_code", common["trust_remote_code"], bool, "true or false")
    if has_id:
        hf = _typed(path, f"{where}.id", table["id"], str, "a string")
        local = (path.parent / hf) if hf.startswith((".", "/")) else None
        if local is not None:
            if not local.is_dir():
                raise _fail(path, f"{where}.id", f"local model directory not found: {local}")
            hf = str(local.resolve())
        source = ModelSource(hf=hf, **common)
    else:
        gguf = table["gguf"]
        if isinstance(gguf, str):
            file = (path.parent / gguf).resolve()
            if not file.is_file():
                raise _fail(path, f"{where}.gguf", f"GGUF file not found: {file}")
            source = ModelSource(gguf_path=str(file), **common)
        else:
            gguf = _typed(path, f"{where}.gguf", gguf, dict, "a path or {package, file}")
            _check_keys(path, f"{where}.gguf", gguf, _GGUF_KEYS)
            if set(gguf) != set(_GGUF_KEYS):
                raise _fail(path, f"{where}.gguf", "needs both 'package' and 'file'")
            pkg = _typed(path, f"{where}.gguf.package", gguf["package"], str, "a string")
            if not _package_installed(pkg):
                raise _fail(
                    path,
                    f"{where}.gguf.package",
                    f"Python package {pkg!r} is not installed: pip install it, "
                    'or give the GGUF file\'s path instead (gguf = "path/to/model.gguf")',
                )
            fname = _typed(path, f"{where}.gguf.file", gguf["file"], str, "a string")
            source = ModelSource(gguf_package=pkg, gguf_file=fname, **common)
    if "name" in table:
        name = _typed(path, f"{where}.name", table["name"], str, "a string")
        _check_name(path, f"{where}.name", name, "model name")
    else:
        name = source.default_name
        if problem := _name_problem(name):
            raise _fail(
                path,
                f"{where}.name",
                f"the name derived from the source, {_shown(name)}, {problem}: "
                'give the model a name = "..."',
            )
    dtype, device = table.get("dtype"), table.get("device")
    if dtype is not None and dtype not in DTYPES:
        raise _fail(path, f"{where}.dtype", f"must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if device is not None and device not in DEVICES:
        raise _fail(path, f"{where}.device", f"must be one of {', '.join(DEVICES)}, got {device!r}")
    precision = table.get("unembed_precision")
    if precision is not None and precision not in UNEMBED_PRECISIONS:
        raise _fail(
            path,
            f"{where}.unembed_precision",
            f"must be one of {', '.join(UNEMBED_PRECISIONS)}, got {precision!r}",
        )
    return ModelEntry(
        name=name, source=source, dtype=dtype, device=device, unembed_precision=precision
    )


def _parse_prompt(path: Path, i: int, table: Any, root: Path | None) -> tuple[PromptSpec, bool]:
    where = f"prompts[{i}]"
    table = _typed(path, where, table, dict, "a table ([[prompts]])")
    _check_keys(path, where, table, _PROMPT_KEYS)
    if ("text" in table) == ("file" in table):
        raise _fail(path, where, "give exactly one of 'text' or 'file'")
    if "file" in table:
        file = path.parent / _typed(path, f"{where}.file", table["file"], str, "a path")
        try:
            text = read_prompt_file(file, root)
        except ValueError as exc:
            raise _fail(path, f"{where}.file", str(exc)) from None
        table = {**table, "text": text}
    return _prompt_from_fields(table, _Origin(path, where))


def _prompt_from_fields(
    table: dict[str, Any], origin: _Origin, prompt_set: str | None = None
) -> tuple[PromptSpec, bool]:
    """One prompt from a [[prompts]] table's keys or a set row's cells (absent: not given);
    every error names ``origin``. Returns the prompt and whether it is marked primary."""
    path, at = origin.path, origin.at
    pid = _typed(path, at("id"), table.get("id"), str, "a string id")
    _check_name(path, at("id"), pid, "prompt id")
    text = _typed(path, at("text"), table["text"], str, "a string")
    if not text:
        raise _fail(path, at("text"), "the prompt is empty")
    answer = table.get("answer")
    if answer is not None:
        _typed(path, at("answer"), answer, str, "a string")
        if not answer.strip():  # its first token would be a space: an L_semantic about nothing
            none = "leave 'answer' out" if origin.columns is None else "leave the cell empty"
            raise _fail(
                path,
                at("answer"),
                f"expected the answer's text, got only whitespace {answer!r} ({none} for none)",
            )
    positions = table.get("positions", "next")
    if positions not in ("all", "next"):
        raise _fail(path, at("positions"), f"must be 'all' or 'next', got {positions!r}")
    primary = _typed(path, at("primary"), table.get("primary", False), bool, "true or false")
    role = _typed(path, at("role"), table.get("role", "test"), str, "a string")
    if role not in _EXPLICIT_ROLES:
        raise _fail(
            path,
            at("role"),
            f"must be 'test' or 'control', got {role!r} (mark the primary with primary = true, "
            'an ablation with ablation_of = "<prompt id>")',
        )
    refs = {k: table.get(k) for k in ("control_of", "ablation_of")}
    for key, ref in refs.items():
        if ref is not None:
            _typed(path, at(key), ref, str, "a prompt id")
    if refs["ablation_of"] is not None and "role" in table:
        raise _fail(
            path,
            at("ablation_of"),
            f"ablation_of makes the prompt an ablation, so it cannot also have role = {role!r}: "
            "drop one of them",
        )
    if refs["control_of"] is not None and role != "control":
        raise _fail(path, at("control_of"), 'only a control has control_of: add role = "control"')
    if primary and (role == "control" or refs["ablation_of"] is not None):
        what = "a control" if role == "control" else "an ablation"
        raise _fail(
            path,
            at("primary"),
            f"{what} is read against another prompt, so it cannot be the primary: drop primary = true",
        )
    if role == "control" and answer is None:
        raise _fail(
            path,
            at("answer"),
            "a control needs an answer (its own fact, which should beat the reference's): "
            'give answer = "..."',
        )
    suite = table.get("suite")
    if suite is not None:
        _typed(path, at("suite"), suite, str, "a string")
        _check_name(path, at("suite"), suite, "suite name")
    labels = {k: table.get(k) for k in _LABEL_KEYS}
    for key, label in labels.items():
        if label is not None:
            _typed(path, at(key), label, str, "a string")
    spec = PromptSpec(
        id=pid,
        text=text,
        answer=answer,
        positions=positions,
        role="ablation" if refs["ablation_of"] is not None else role,
        reference=refs["ablation_of"] if refs["control_of"] is None else refs["control_of"],
        suite=suite,
        prompt_set=prompt_set,
        **labels,
    )
    return spec, primary


def _parse_prompt_set(
    path: Path, i: int, table: Any, root: Path | None
) -> tuple[list[tuple[PromptSpec, _Origin]], PromptSetInfo]:
    """A [[prompt_sets]] table: its rows as prompts (each with its origin), and its record."""
    where = f"prompt_sets[{i}]"
    table = _typed(path, where, table, dict, "a table ([[prompt_sets]])")
    _check_keys(path, where, table, _SET_KEYS)
    name = _typed(path, f"{where}.name", table.get("name"), str, "a string name")
    _check_name(path, f"{where}.name", name, "prompt set name")
    if ("file" in table) == ("dataset" in table):
        raise _fail(
            path,
            where,
            "give exactly one of 'file' (a .csv, .jsonl or .parquet file) "
            "or 'dataset' (a Hugging Face dataset id)",
        )
    for key in ("split", "revision"):
        if key in table:
            if "file" in table:
                raise _fail(path, f"{where}.{key}", f"{key} is for a hub dataset, not a file")
            _typed(path, f"{where}.{key}", table[key], str, "a string")
    positions = table.get("positions", "next")
    if positions not in ("all", "next"):
        raise _fail(path, f"{where}.positions", f"must be 'all' or 'next', got {positions!r}")
    limit = table.get("limit")
    if limit is not None and _typed(path, f"{where}.limit", limit, int, "an integer") < 1:
        raise _fail(path, f"{where}.limit", f"must be >= 1, got {limit}")
    mapped = _typed(path, f"{where}.columns", table.get("columns", {}), dict, "a table")
    _check_keys(path, f"{where}.columns", mapped, SET_COLUMNS)
    for key, theirs in mapped.items():
        if not _typed(path, f"{where}.columns.{key}", theirs, str, "a column name"):
            raise _fail(path, f"{where}.columns.{key}", "the column name is empty")
    columns = {c: mapped.get(c, c) for c in SET_COLUMNS}
    data: SetData
    if "file" in table:
        file = path.parent / _typed(path, f"{where}.file", table["file"], str, "a path")
        shown: Path | str = file  # absolute: the manifest's path is resolved
        info = PromptSetInfo(name, 0, "", file=str(file))
        try:
            data = read_set_file(file, root, columns, limit)
        except RowError as exc:
            raise _fail(shown, exc.where, exc.message) from None
        except ValueError as exc:
            raise _fail(path, f"{where}.file", str(exc)) from None
    else:
        dataset = _typed(path, f"{where}.dataset", table["dataset"], str, "a hub dataset id")
        split, revision = table.get("split", "train"), table.get("revision")
        shown = hub_name(dataset, split, revision)
        info = PromptSetInfo(name, 0, "", dataset=dataset, split=split, revision=revision)
        try:
            data = read_hub_set(dataset, split, revision, columns, limit)
        except RowError as exc:
            raise _fail(shown, exc.where, exc.message) from None
        except ValueError as exc:
            raise _fail(path, f"{where}.dataset", str(exc)) from None
    if not data.rows:
        raise _fail(path, where, f"prompt set {_shown(name)} has no rows: {shown}")
    prompts = []
    for row in data.rows:
        origin = _Origin(shown, row_where(row.number, row.line), columns)
        for key in ("id", "text"):
            if row.cells[key] is None:
                raise _fail(shown, origin.at(key), f"empty: every row needs its {key}")
        cells = {k: v for k, v in row.cells.items() if v is not None}
        spec, _ = _prompt_from_fields({**cells, "positions": positions}, origin, name)
        prompts.append((spec, origin))
    return prompts, replace(info, rows=len(data.rows), sha256=data.sha256)


def _resolve_roles(
    parsed: list[tuple[PromptSpec, _Origin]], primary_id: str
) -> tuple[PromptSpec, ...]:
    """Final roles; each control's or ablation's reference checked, and a control's foil set."""
    by_id = {s.id: s for s, _ in parsed}
    resolved = []
    for s, origin in parsed:
        path = origin.path
        ref, foil = s.reference, None
        if s.role in ("control", "ablation"):
            # A control without control_of is read against the primary.
            key = origin.at(f"{s.role}_of" if ref is not None else "role")
            ref = primary_id if ref is None else ref
            target = by_id.get(ref)
            if target is None:
                close = difflib.get_close_matches(ref, list(by_id), n=3, cutoff=0.6)
                hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
                raise _fail(
                    path,
                    key,
                    f"no prompt has the id {_shown(ref)}{hint}: "
                    "name a prompt of this manifest or of its includes",
                )
            if target is s:
                raise _fail(path, key, "a prompt cannot be read against itself: name another")
            if target.role != "test":  # roles are not final yet: primary is still "test"
                raise _fail(
                    path,
                    key,
                    f"{_shown(ref)} is itself read against another prompt (its role is "
                    f"{target.role}; no chains): name the prompt that it is read against",
                )
            if s.role == "control":
                shown = (
                    _shown(ref) if s.reference is not None else f"the primary prompt {_shown(ref)}"
                )
                if target.answer is None:
                    raise _fail(
                        path,
                        key,
                        f"the control's reference, {shown}, has no answer to use as its foil: "
                        "give it an answer, or name another prompt with control_of",
                    )
                if s.answer is not None and s.answer.strip() == target.answer.strip():
                    raise _fail(
                        path,
                        origin.at("answer"),
                        f"the control's answer {s.answer!r} is also the answer of {shown}, "
                        "so nothing can lose: a control needs another fact",
                    )
                foil = target.answer
        role = "primary" if s.id == primary_id else s.role
        resolved.append(replace(s, role=role, reference=ref, foil=foil))
    suites: dict[str, list[_Origin]] = {}
    for s, origin in parsed:
        if s.suite is not None:
            suites.setdefault(s.suite, []).append(origin)
    for name, members in suites.items():
        if len(members) < 2:
            (origin,) = members
            raise _fail(
                origin.path,
                origin.at("suite"),
                f"suite {_shown(name)} has only this prompt, so it has no spread: "
                "tag at least one more prompt with it, or drop suite",
            )
    return tuple(resolved)


def _collect(path: Path, seen: tuple[Path, ...]) -> tuple[dict[str, Any], list, list, list[str]]:
    """Read a file and its includes: (sweep table, models, prompt tables, files read).

    A prompt table is (file, "prompts" or "prompt_sets", index, table): each file's [[prompts]]
    come before its [[prompt_sets]], and an include's before the including file's.
    """
    path = path.resolve()
    if path in seen:
        chain = " -> ".join(str(p) for p in (*seen, path))
        raise ManifestError(f"{path}: include cycle: {chain}")
    data = _read_toml(path)
    _check_keys(path, "top level", data, _TOP_KEYS)
    sweep: dict[str, Any] = {}
    models: list[tuple[Path, int, Any]] = []
    prompts: list[tuple[Path, str, int, Any]] = []
    files: list[str] = []
    includes = _typed(path, "include", data.get("include", []), list, "a list of paths")
    for inc in includes:
        _typed(path, "include", inc, str, "a path")
        sub = path.parent / inc
        if not sub.is_file():
            raise _fail(path, "include", f"included manifest not found: {sub}")
        s, m, p, f = _collect(sub, (*seen, path))
        sweep = {**sweep, **s}
        models += m
        prompts += p
        files += f
    sweep = _parse_sweep(path, data.get("sweep", {}), sweep)
    models += [
        (path, i, t)
        for i, t in enumerate(_typed(path, "models", data.get("models", []), list, "[[models]]"))
    ]
    for kind in ("prompts", "prompt_sets"):
        tables = _typed(path, kind, data.get(kind, []), list, f"[[{kind}]]")
        prompts += [(path, kind, i, t) for i, t in enumerate(tables)]
    return sweep, models, prompts, [*files, str(path)]


def _check_unique(
    path: Path, parsed: list[tuple[PromptSpec, bool, _Origin]], sets: list[PromptSetInfo]
) -> None:
    """Prompt ids and set names, each unique ignoring case ("Llama" and "llama" would share
    files on macOS and Windows). A duplicate that is a set's row is named by its file and row."""
    first: dict[str, tuple[str, _Origin]] = {}
    for s, _, origin in parsed:
        seen = first.setdefault(s.id.lower(), (s.id, origin))
        if seen[1] is not origin and (origin.columns is not None or seen[1].columns is not None):
            other, at = seen[1], seen[1].where
            elsewhere = at if other.path == origin.path else f"{other.path}: {at}"
            raise _fail(
                origin.path,
                origin.at("id"),
                f"duplicate prompt id {_shown(s.id)}: {elsewhere} has {_shown(seen[0])} already "
                "(compared ignoring case)",
            )
    spellings: dict[str, list[str]] = {}
    for s, _, _ in parsed:
        spellings.setdefault(s.id.lower(), []).append(s.id)
    dupes = sorted(" = ".join(dict.fromkeys(n)) for n in spellings.values() if len(n) > 1)
    if dupes:
        raise _fail(
            path, "prompts", f"duplicate prompt id(s): {', '.join(dupes)} (compared ignoring case)"
        )
    names: dict[str, str] = {}
    for info in sets:
        if (seen_name := names.get(info.name.lower())) is not None:
            raise _fail(
                path,
                "prompt_sets",
                f"duplicate prompt set name: {seen_name} = {info.name} (compared ignoring case)",
            )
        names[info.name.lower()] = info.name


def load_manifest(path: str | Path, *, prompt_files_anywhere: bool = False) -> Manifest:
    """Parse and validate a manifest; raises ManifestError with one clear line.

    Prompt files and prompt-set files must lie in the folder of ``path`` (after symlinks) unless
    ``prompt_files_anywhere``; files under /proc, /sys or /dev and non-regular files never pass.
    """
    path = Path(path)
    sweep, raw_models, raw_prompts, files = _collect(path, ())
    options = SweepOptions(**sweep)
    _check_options(path, options)
    models = [_parse_model(p, i, t) for p, i, t in raw_models]
    root = None if prompt_files_anywhere else path.resolve().parent
    parsed: list[tuple[PromptSpec, bool, _Origin]] = []
    sets: list[PromptSetInfo] = []
    for p, kind, i, t in raw_prompts:
        if kind == "prompts":
            parsed.append((*_parse_prompt(p, i, t, root), _Origin(p, f"prompts[{i}]")))
        else:
            rows, info = _parse_prompt_set(p, i, t, root)
            parsed += [(spec, False, origin) for spec, origin in rows]
            sets.append(info)
    if not models:
        raise _fail(path, "models", "the manifest lists no [[models]]")
    if not parsed:
        raise _fail(path, "prompts", "the manifest lists no [[prompts]] and no [[prompt_sets]]")
    # Ignoring case: "Llama" and "llama" would share files on macOS and Windows.
    spellings: dict[str, list[str]] = {}
    for m in models:
        spellings.setdefault(m.name.lower(), []).append(m.name)
    dupes = sorted(" = ".join(dict.fromkeys(s)) for s in spellings.values() if len(s) > 1)
    if dupes:
        raise _fail(
            path, "models", f"duplicate model name(s): {', '.join(dupes)} (compared ignoring case)"
        )
    _check_unique(path, parsed, sets)
    primaries = [s.id for s, primary, _ in parsed if primary]
    if len(primaries) > 1:
        raise _fail(path, "prompts", f"more than one prompt marked primary: {', '.join(primaries)}")
    # By default the first prompt that is read on its own (not a control or an ablation), taken
    # from the [[prompts]] tables; from the sets' rows only when there are no [[prompts]].
    tables = [s for s, _, o in parsed if o.columns is None] or [s for s, _, _ in parsed]
    plain = [s.id for s in tables if s.role == "test"]
    if not primaries and not plain:
        raise _fail(
            path,
            "prompts",
            "every prompt is a control or an ablation: add one that is read on its own",
        )
    primary_id = primaries[0] if primaries else plain[0]
    prompts = _resolve_roles([(s, o) for s, _, o in parsed], primary_id)
    return Manifest(
        path=path.resolve(),
        options=options,
        models=tuple(models),
        prompts=prompts,
        sources=tuple(files),
        prompt_sets=tuple(sets),
    )
