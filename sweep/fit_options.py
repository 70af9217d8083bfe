"""The manifest's [fit] table (how trained lenses are fitted) and the text they are fitted on."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sweep.errors import ManifestError
from sweep.manifest import TRAINED_LENSES
from sweep.prompt_files import checked_file

PYDOC_TOPICS = "pydoc:topics"
FULL_RANK_MAX_D = 2048  # rank "auto": full d x d maps up to this width, low rank above
FIT_PRECISIONS = ("bfloat16", "float32")
TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")
TEXT_MAX_BYTES = 1 << 30


@dataclass(frozen=True)
class FitOptions:
    """[fit]: every field changes the fitted lens, so every field is in its cache key.

    text: "pydoc:topics" (the default: Python's own help topics, shipped with every CPython, so a
    fit needs no network; English technical prose and code), a .txt file (documents separated
    by blank lines), a .jsonl or .parquet file (``text_column`` of each row), or a Hugging Face
    dataset id (``split``, ``revision``; needs the ``datasets`` package and the hub).
    """

    lenses: tuple[str, ...] = ("tuned", "prism")
    text: str = PYDOC_TOPICS
    text_column: str = "text"
    split: str = "train"
    revision: str | None = None
    max_documents: int | None = None
    seq_len: int = 128
    train_tokens: int = 8192
    heldout_tokens: int = 2048
    steps: int = 300
    lr: float = 1e-3
    batch_rows: int = 128
    layers_per_step: int = 4
    weight_decay: float = 0.0
    rank: str | int = "auto"  # "auto", "full" or an int (the tuned lens; prism is d x d)
    checkpoint_every: int = 25
    seed: int | None = None  # None: the [sweep] seed
    # The training decode's matmul: "bfloat16" (default: about 3x faster on this project's
    # CPUs and on tensor cores; held-out quality as float32's, see README) or "float32".
    precision: str = "bfloat16"

    def key_fields(self) -> dict[str, Any]:
        """What the fitted weights depend on (not where checkpoints go or how often)."""
        out = asdict(self)
        for k in ("lenses", "checkpoint_every"):
            out.pop(k)
        return out


_TYPES: dict[str, tuple[type | tuple[type, ...], str]] = {
    "lenses": (list, "a list of lens names"),
    "text": (str, "a string"),
    "text_column": (str, "a string"),
    "split": (str, "a string"),
    "revision": (str, "a string"),
    "max_documents": (int, "an integer"),
    "seq_len": (int, "an integer"),
    "train_tokens": (int, "an integer"),
    "heldout_tokens": (int, "an integer"),
    "steps": (int, "an integer"),
    "lr": ((float, int), "a number"),
    "batch_rows": (int, "an integer"),
    "layers_per_step": (int, "an integer"),
    "weight_decay": ((float, int), "a number"),
    "rank": ((str, int), '"auto", "full" or an integer'),
    "checkpoint_every": (int, "an integer"),
    "seed": (int, "an integer"),
    "precision": (str, '"bfloat16" or "float32"'),
}
_POSITIVE = ("seq_len", "train_tokens", "heldout_tokens", "steps", "batch_rows",
             "layers_per_step", "checkpoint_every", "max_documents")  # fmt: skip


def auto_rank(d_model: int) -> int | None:
    """The tuned lens's rank "auto": full (None) for d <= 2048, else clip(d / 32, 64, 256) (the
    seed's width-scaled rank)."""
    return None if d_model <= FULL_RANK_MAX_D else max(64, min(256, d_model // 32))


def load_fit_options(manifest: Path, sweep_seed: int) -> FitOptions:
    """The [fit] table of ``manifest`` itself, not of its includes (defaults where absent);
    ManifestError names the key."""
    from sweep.manifest import _read_toml

    table = _read_toml(manifest).get("fit", {})
    where = f"{manifest}: [fit]"
    if not isinstance(table, dict):
        raise ManifestError(f"{where}: expected a table")
    unknown = sorted(set(table) - set(_TYPES))
    if unknown:
        raise ManifestError(f"{where}: unknown key(s) {', '.join(unknown)}; known: "
                            f"{', '.join(_TYPES)}")  # fmt: skip
    for key, value in table.items():
        kind, words = _TYPES[key]
        if isinstance(value, bool) or not isinstance(value, kind):
            raise ManifestError(f"{where}: {key} must be {words}, got {value!r}")
        if key in _POSITIVE and value < 1:
            raise ManifestError(f"{where}: {key} must be >= 1, got {value}")
    lenses = tuple(table.get("lenses", FitOptions.lenses))
    bad = [x for x in lenses if x not in TRAINED_LENSES]
    if bad or not lenses or len(set(lenses)) != len(lenses):
        raise ManifestError(f"{where}: lenses must be distinct names out of "
                            f"{', '.join(TRAINED_LENSES)}, got {list(lenses)}")  # fmt: skip
    rank = table.get("rank", "auto")
    if (isinstance(rank, str) and rank not in ("auto", "full")) or (
        isinstance(rank, int) and rank < 1
    ):
        raise ManifestError(f'{where}: rank must be "auto", "full" or >= 1, got {rank!r}')
    if table.get("precision", "bfloat16") not in FIT_PRECISIONS:
        raise ManifestError(f"{where}: precision must be one of {', '.join(FIT_PRECISIONS)}, "
                            f"got {table['precision']!r}")  # fmt: skip
    if "lr" in table and not table["lr"] > 0:
        raise ManifestError(f"{where}: lr must be > 0, got {table['lr']}")
    values = {**table, "lenses": lenses, "seed": table.get("seed", sweep_seed)}
    for key in ("lr", "weight_decay"):
        if key in values:
            values[key] = float(values[key])
    return FitOptions(**values)


def read_documents(options: FitOptions, base: Path) -> tuple[list[str], dict[str, Any]]:
    """The fit's documents, and where they came from (with a sha256 of their text)."""
    spec = options.text
    if spec == PYDOC_TOPICS:
        import pydoc_data.topics as topics
        import sys

        docs = [topics.topics[k] for k in sorted(topics.topics)]
        source: dict[str, Any] = {"text": spec, "python": sys.version.split()[0]}
    elif Path(spec).suffix in TEXT_SUFFIXES and not spec.startswith(("hf:", "hub:")):
        try:
            path = checked_file(base / spec, None, TEXT_MAX_BYTES, "fit text")
        except ValueError as exc:
            raise ManifestError(str(exc)) from None
        docs = _file_documents(path, options.text_column)
        source = {"text": str(path)}
    else:
        docs = _hub_documents(spec, options)
        source = {"text": spec, "split": options.split, "revision": options.revision}
    docs = [d for d in docs if d.strip()]
    if options.max_documents is not None:
        docs = docs[: options.max_documents]
    if not docs:
        raise ManifestError(f"fit text {spec!r}: no documents (every one is empty)")
    digest = hashlib.sha256(json.dumps(docs, ensure_ascii=False).encode()).hexdigest()
    return docs, {**source, "documents": len(docs), "sha256": digest}


def _file_documents(path: Path, column: str) -> list[str]:
    if path.suffix == ".txt":
        text = path.read_text(encoding="utf-8")
        return [d for d in text.replace("\r\n", "\n").split("\n\n")]
    if path.suffix == ".jsonl":
        docs = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ManifestError(f"{path}: line {n}: not JSON ({exc.msg})") from None
                value = row.get(column) if isinstance(row, dict) else None
                if not isinstance(value, str):
                    raise ManifestError(f"{path}: line {n}: no string column {column!r}")
                docs.append(value)
        return docs
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    if column not in table.column_names:
        raise ManifestError(f"{path}: no column {column!r}; columns: "
                            f"{', '.join(table.column_names)}")  # fmt: skip
    values = table.column(column).to_pylist()
    if any(not isinstance(v, str) for v in values if v is not None):
        raise ManifestError(f"{path}: column {column!r} is not text")
    return [v for v in values if v is not None]


def _hub_documents(spec: str, options: FitOptions) -> list[str]:
    name = spec.removeprefix("hf:").removeprefix("hub:")
    try:
        import datasets
    except ImportError:
        raise ManifestError(
            f"fit text {spec!r} is a Hugging Face dataset id: install the datasets package "
            "(pip install datasets), or give a .txt, .jsonl or .parquet file"
        ) from None
    try:
        data = datasets.load_dataset(name, split=options.split, revision=options.revision)
    except Exception as exc:  # offline, unknown id, no such split: all one clear line
        raise ManifestError(
            f"fit text {spec!r}: the dataset could not be loaded ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); with no hub access, give a "
            "local .txt, .jsonl or .parquet file"
        ) from None
    if options.text_column not in data.column_names:
        raise ManifestError(f"fit text {spec!r}: no column {options.text_column!r}")
    limit = options.max_documents or len(data)
    return [str(x) for x in data.select(range(min(limit, len(data))))[options.text_column]]
