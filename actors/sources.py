"""Where a model comes from: a hub id, a local HF directory, or a GGUF file, and how it loads.

GGUF files are dequantised by transformers into float32 and cached as a normal HF directory
(safetensors), keyed by the file's sha256, so only the first load pays for the conversion.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from actors.errors import ModelSourceError
from actors.gguf_header import read_gguf_header

if TYPE_CHECKING:  # torch is imported where a model is loaded, not by planners
    import torch

DEFAULT_CACHE_DIR = Path(os.environ.get("LENS_SWEEP_CACHE", Path.home() / ".cache" / "lens-sweep"))


@dataclass(frozen=True)
class ModelSource:
    """Exactly one of ``hf`` (hub id or local directory) or ``gguf_path`` / ``gguf_package``.

    A GGUF inside an installed Python package is named by ``gguf_package`` + ``gguf_file``.
    """

    hf: str | None = None
    gguf_path: str | None = None
    gguf_package: str | None = None
    gguf_file: str | None = None
    revision: str | None = None
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        given = [self.hf is not None, self.gguf_path is not None, self.gguf_package is not None]
        if sum(given) != 1:
            raise ModelSourceError(
                "a model source needs exactly one of: hub id/directory, GGUF path, GGUF package"
            )
        if (self.gguf_package is None) != (self.gguf_file is None):
            raise ModelSourceError("a packaged GGUF needs both a package and a file name")

    @property
    def label(self) -> str:
        if self.hf is not None:
            return self.hf
        if self.gguf_path is not None:
            return self.gguf_path
        return f"{self.gguf_package}:{self.gguf_file}"

    @property
    def default_name(self) -> str:
        """A file-name-safe model name derived from the source."""
        raw = self.gguf_file or self.gguf_path or self.hf or "model"
        stem = Path(raw.rstrip("/")).name
        for suffix in (".gguf",):
            stem = stem.removesuffix(suffix)
        return "".join(c if c.isalnum() or c in "-_." else "-" for c in stem)


def resolve_gguf(source: ModelSource, cache_dir: Path = DEFAULT_CACHE_DIR) -> Path:
    """The GGUF file on disk.

    A packaged GGUF is found in the package's folder without importing it (some such packages
    import heavy optional dependencies); a package that ships the file in parts and exposes
    ``assemble(path)`` is imported and asked to write it once into the cache.
    """
    if source.gguf_path is not None:
        path = Path(source.gguf_path).expanduser()
        if not path.is_file():
            raise ModelSourceError(f"GGUF file not found: {path}")
        return path
    package, name = str(source.gguf_package), str(source.gguf_file)
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            f"Python package {package!r} is not installed: pip install it (see README) "
            "or give the GGUF file's path instead"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / name
    if path.is_file():
        return path
    assembled = cache_dir / "gguf-files" / package / name
    if assembled.is_file():
        return assembled
    module = importlib.import_module(package)
    assemble = getattr(module, "assemble", None)
    if assemble is None:
        raise ModelSourceError(
            f"package {package!r} has no file {name!r} and no assemble() to build it"
        )
    assembled.parent.mkdir(parents=True, exist_ok=True)
    tmp = assembled.with_name(f".{name}.{os.getpid()}.part")
    assemble(tmp, overwrite=True)
    os.replace(tmp, assembled)
    return assembled


def sha256_of(path: Path, chunk: int = 2**22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def gguf_file_type(path: Path) -> str:
    """The GGUF's quantisation type as named by llama.cpp (e.g. 'MOSTLY_Q4_1'), from its header."""
    from gguf.constants import LlamaFileType

    value = read_gguf_header(path)[0].get("general.file_type")
    if value is None:
        return "unknown"
    try:
        return LlamaFileType(int(value)).name
    except ValueError:
        return f"type {value}"


def convert_gguf(path: Path, cache_dir: Path) -> tuple[Path, dict[str, Any]]:
    """Dequantise a GGUF into a cached HF directory; returns it and provenance facts."""
    digest = sha256_of(path)
    file_type = gguf_file_type(path)
    target = cache_dir / "gguf" / digest[:32]
    provenance = {
        "gguf_file": str(path),
        "gguf_sha256": digest,
        "gguf_file_type": file_type,
        "note": f"pretrained weights dequantised from GGUF {file_type} to float32 (transformers)",
    }
    if (target / "config.json").is_file():
        return target, {**provenance, "gguf_cache": "hit"}
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": path.name}
    import torch

    hf_model = AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch.float32, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, **kwargs)
    # A GGUF-loaded model refuses save_pretrained; a fresh model from the same config (minus
    # the quantisation marker) with the same weights saves normally.
    config = hf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(hf_model).__name__]
    fresh = type(hf_model)(config)
    fresh.load_state_dict(hf_model.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        fresh.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").is_file():  # another worker may have won the race
            raise
    return target, {**provenance, "gguf_cache": "miss"}


def locate(source: ModelSource, cache_dir: Path = DEFAULT_CACHE_DIR) -> tuple[str, dict[str, Any]]:
    """The hub id or directory transformers should load, and provenance facts about it."""
    provenance: dict[str, Any] = {"source": source.label}
    if source.hf is not None:
        return source.hf, provenance
    directory, facts = convert_gguf(resolve_gguf(source, cache_dir), cache_dir)
    return str(directory), {**provenance, **facts}


def load_config(name_or_dir: str, source: ModelSource) -> Any:
    """The model's HF config alone, so that dtype and device map are chosen before the weights."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(
            name_or_dir, revision=source.revision, trust_remote_code=source.trust_remote_code
        )
    except (OSError, ValueError) as exc:
        raise ModelSourceError(
            f"could not read the config of {source.label!r}: {exc}. Check the id or path; hub ids "
            "need network access (or a populated Hugging Face cache) and gated models need a token"
        ) from exc


def architecture_of(config: Any) -> str:
    """The HF model class name of a config (from ``architectures``, else transformers' mapping)."""
    if config.architectures:
        return str(config.architectures[0])
    from transformers import AutoModelForCausalLM

    mapping = AutoModelForCausalLM._model_mapping  # config class -> model class
    return mapping[type(config)].__name__


def load_hf(
    name_or_dir: str,
    source: ModelSource,
    dtype: torch.dtype,
    device_map: dict[str, str] | None = None,
) -> tuple[Any, Any]:
    """Load (hf_model, tokenizer) directly in ``dtype`` and onto ``device_map``'s devices.

    transformers reads the safetensors shards straight into the mapped devices, so a GPU model
    never needs its full size in host RAM. ``device_map`` None loads on the CPU.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    common = {"revision": source.revision, "trust_remote_code": source.trust_remote_code}
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_dir, **common)
        hf_model = AutoModelForCausalLM.from_pretrained(
            name_or_dir, dtype=dtype, attn_implementation="eager", device_map=device_map, **common
        )
    except (OSError, ValueError) as exc:
        raise ModelSourceError(
            f"could not load {source.label!r}: {exc}. Check the id or path; hub ids need network "
            "access (or a populated Hugging Face cache) and gated models need a token"
        ) from exc
    if not hf_model.config.architectures:
        hf_model.config.architectures = [type(hf_model).__name__]
    return hf_model, tokenizer
