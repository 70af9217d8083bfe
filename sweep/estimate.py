"""Memory-fit estimator: a model's shape from its config or file headers, never its weights.

Shapes come from a hub or local ``config.json`` (plus safetensors headers for an exact parameter
count where a local directory has them) or from a GGUF header (exact tensor sizes).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from actors.gguf_header import read_gguf_header
from actors.sources import DEFAULT_CACHE_DIR, ModelSource, resolve_gguf
from sweep.errors import SweepError

GIB = 2**30
BYTES_PER_PARAM = {"float32": 4, "float16": 2, "bfloat16": 2}
HEADROOM_FACTOR = 1.2  # allocator fragmentation, temporaries we do not model
HEADROOM_FIXED = 512 * 2**20  # runtime context (CUDA context, Python, tokenizer)
LENS_CHUNK_BYTES = 512 * 2**20  # the kernel's row-chunk budget


class EstimateError(SweepError):
    """The model's shape could not be read (no config, unreachable hub, unreadable header)."""


@dataclass(frozen=True)
class ModelShape:
    n_params: int
    n_layers: int
    d_model: int
    d_vocab: int
    n_heads: int
    d_mlp: int
    exact_params: bool  # counted from tensor headers rather than derived from the config
    # Embedding and unembedding share one matrix; None: unknown (GGUF, or a config without the key)
    tied_embeddings: bool | None = None


def _first(cfg: dict[str, Any], *keys: str, default: Any = None) -> Any:
    for key in keys:
        if cfg.get(key) is not None:
            return cfg[key]
    if default is not None:
        return default
    raise EstimateError(f"config has none of {keys}")


def shape_from_config(cfg: dict[str, Any], n_params: int | None = None) -> ModelShape:
    """Shape of a decoder-only transformer from an HF config dict."""
    cfg = cfg.get("text_config", cfg) if "text_config" in cfg and "hidden_size" not in cfg else cfg
    d = int(_first(cfg, "hidden_size", "n_embd", "d_model"))
    n_layers = int(_first(cfg, "num_hidden_layers", "n_layer", "num_layers"))
    vocab = int(_first(cfg, "vocab_size"))
    heads = int(_first(cfg, "num_attention_heads", "n_head"))
    kv_heads = int(_first(cfg, "num_key_value_heads", default=heads))
    head_dim = int(_first(cfg, "head_dim", default=d // heads))
    d_mlp = int(_first(cfg, "intermediate_size", "n_inner", default=4 * d))
    exact = n_params is not None
    # Absent key: GPT-2 ties; otherwise unknown.
    tied_key = cfg.get("tie_word_embeddings", True if cfg.get("model_type") == "gpt2" else None)
    tied = None if tied_key is None else bool(tied_key)
    if n_params is None:
        gated = cfg.get("model_type") != "gpt2"
        attn = d * heads * head_dim * 2 + d * kv_heads * head_dim * 2
        mlp = (3 if gated else 2) * d * d_mlp
        n_pos = int(cfg.get("n_positions", 0)) if cfg.get("model_type") == "gpt2" else 0
        # Unknown tying counts untied, the larger (safer) estimate.
        n_unembed = vocab * d * (1 if tied else 2)
        n_params = n_layers * (attn + mlp + 4 * d) + n_unembed + n_pos * d + d
    return ModelShape(n_params, n_layers, d, vocab, heads, d_mlp, exact, tied)


def _safetensors_params(directory: Path) -> int | None:
    """Exact parameter count from safetensors headers (8-byte length + JSON), if present.

    Only the transformers checkpoint is counted: some repositories also ship the same weights
    in another layout (Mistral's ``consolidated.safetensors``), which would count them twice.
    """
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        shards = set(json.loads(index.read_text())["weight_map"].values())
        files = sorted(directory / name for name in shards)
    elif (directory / "model.safetensors").is_file():
        files = [directory / "model.safetensors"]
    else:
        files = sorted(directory.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for file in files:
        with open(file, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        for name, info in header.items():
            if name != "__metadata__":
                n = 1
                for dim in info["shape"]:
                    n *= dim
                total += n
    return total


def _hub_config(repo: str, revision: str | None) -> dict[str, Any]:
    try:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(repo, "config.json", revision=revision)
    except Exception as exc:  # the hub client raises many types; all mean "cannot read it"
        raise EstimateError(
            f"could not fetch config.json of {repo!r} from the hub ({type(exc).__name__}:"
            f" {exc}); check the id, your network and token, or point 'id' at a local directory"
        ) from None
    return json.loads(Path(path).read_text())


def _gguf_shape(path: Path) -> ModelShape:
    meta_kv, arrays, n_elements = read_gguf_header(path)
    arch = meta_kv.get("general.architecture")
    if not isinstance(arch, str):
        raise EstimateError(f"GGUF {path.name} has no general.architecture")

    def meta(key: str, default: int | None = None) -> int:
        value = meta_kv.get(f"{arch}.{key}")
        if value is None:
            if default is None:
                raise EstimateError(f"GGUF {path.name} has no scalar {arch}.{key}")
            return default
        return int(value)

    vocab = arrays.get("tokenizer.ggml.tokens") or meta("vocab_size")
    d = meta("embedding_length")
    return ModelShape(
        n_params=sum(n_elements),
        n_layers=meta("block_count"),
        d_model=d,
        d_vocab=vocab,
        n_heads=meta("attention.head_count"),
        d_mlp=meta("feed_forward_length", 4 * d),
        exact_params=True,
    )


def model_shape(source: ModelSource, cache_dir: Path = DEFAULT_CACHE_DIR) -> ModelShape:
    """Read a model's shape without loading (or downloading) its weights."""
    try:
        if source.hf is None:
            return _gguf_shape(resolve_gguf(source, cache_dir))
        local = Path(source.hf)
        if local.is_dir():
            cfg_file = local / "config.json"
            if not cfg_file.is_file():
                raise EstimateError(
                    f"{local} has no config.json: not a Hugging Face model directory"
                )
            return shape_from_config(json.loads(cfg_file.read_text()), _safetensors_params(local))
        return shape_from_config(_hub_config(source.hf, source.revision))
    except EstimateError:
        raise
    except Exception as exc:  # a broken file of any kind: say which and why
        raise EstimateError(
            f"could not read the shape of {source.label!r}: {type(exc).__name__}: {exc}"
        ) from exc


def estimate_peak_bytes(shape: ModelShape, dtype: str, batch_size: int, seq_len: int) -> int:
    """Conservative peak memory of one lens actor on one device, in bytes.

    weights in the compute dtype + a float32 copy of the unembedding + hooked residuals
    ([layers + 1, batch, seq, d_model]) + forward activations and attention scores + the model's
    logits + the lens's row-chunk budget; then x1.2 and +512 MiB of headroom.
    """
    return estimate_split_bytes(shape, dtype, batch_size, seq_len, 1)[0]


def translator_bytes(
    shape: ModelShape, kinds: tuple[str, ...], batch_size: int, seq_len: int
) -> int:
    """What decoding trained lenses adds on the lens device: each translator's float32 weights
    (tuned: a d x d map and bias per lens layer, or rank-r factors at rank "auto"'s r; prism: its
    skew matrix and rotation) and one translated float32 copy of the hooked residuals (the
    lenses run one after another, so one copy at a time)."""
    from sweep.fit_options import auto_rank

    if not kinds:
        return 0
    d, n = shape.d_model, shape.n_layers + 1
    rank = auto_rank(d)
    sizes = {
        "tuned": n * (d * d if rank is None else 2 * d * rank) + n * d,
        "prism": 2 * d * d + 4 * d,
    }
    weights = sum(sizes.get(k, 0) for k in kinds) * 4
    return weights + n * batch_size * seq_len * d * 4


def estimate_split_bytes(
    shape: ModelShape, dtype: str, batch_size: int, seq_len: int, n_devices: int
) -> list[int]:
    """Conservative peak memory per device of a model split over ``n_devices`` GPUs, in bytes.

    Block i runs on device ``i * k // n_layers`` (contiguous runs of at most ceil(L / k) blocks,
    as the actor splits them), so every device holds ceil(L / k) blocks' weights, their hooked
    residuals and one block's activations and attention scores. Device 0, the lens device,
    also holds the embeddings, final norm and unembedding, the unembedding's float32 copy, all
    L + 1 hooked residuals, the model's logits and the lens's row-chunk budget. Each device's
    sum takes x1.2 and its own +512 MiB (a CUDA context per device). Where the shape does not
    say whether embeddings are tied, device 0 is charged for two matrices and the blocks for
    all but one: an upper bound on both. ``n_devices == 1`` is exactly ``estimate_peak_bytes``.
    """
    k, n_layers = n_devices, shape.n_layers
    if not 1 <= k <= max(1, n_layers):
        raise ValueError(f"n_devices must be in 1..{n_layers} (one block each at least), got {k}")
    b = BYTES_PER_PARAM[dtype]
    d, vocab = shape.d_model, shape.d_vocab
    unembed_f32 = d * vocab * 4
    per_layer_resid = batch_size * seq_len * d * b
    acts = batch_size * seq_len * (4 * d + 2 * shape.d_mlp) * b
    attn = batch_size * shape.n_heads * seq_len * seq_len * b * 2
    logits = batch_size * seq_len * vocab * b
    lens_extra = unembed_f32 + (n_layers + 1) * per_layer_resid + logits + LENS_CHUNK_BYTES
    if k == 1:
        totals = [shape.n_params * b + lens_extra + acts + attn]
    else:
        n_head = vocab * d * (1 if shape.tied_embeddings else 2) + d  # (un)embedding, final norm
        n_head = min(shape.n_params, n_head)
        n_tied_head = min(shape.n_params, vocab * d + d)
        n_blocks = shape.n_params - (n_tied_head if shape.tied_embeddings is None else n_head)
        blocks_per_device = -(-n_layers // k)
        block_bytes = -(-n_blocks * blocks_per_device // n_layers) * b
        # The lens device's residuals are all L + 1 layers, its own blocks' included.
        lens_device = n_head * b + block_bytes + lens_extra + acts + attn
        other = block_bytes + blocks_per_device * per_layer_resid + acts + attn
        totals = [lens_device] + [other] * (k - 1)
    return [int(t * HEADROOM_FACTOR + HEADROOM_FIXED) for t in totals]
