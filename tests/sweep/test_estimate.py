"""The memory-fit estimator: shapes from configs and file headers, never from weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from actors import ModelSource
from sweep.estimate import (
    BYTES_PER_PARAM,
    GIB,
    EstimateError,
    ModelShape,
    estimate_peak_bytes,
    estimate_split_bytes,
    model_shape,
    shape_from_config,
)
from tests.checkpoints import SMOLLM2_GGUF, SMOLLM2_PACKAGE

LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
LLAMA3_70B = {
    **LLAMA3_8B,
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_attention_heads": 64,
    "num_hidden_layers": 80,
}
GPT2_SMALL = {
    "architectures": ["GPT2LMHeadModel"],
    "model_type": "gpt2",
    "n_embd": 768,
    "n_layer": 12,
    "n_head": 12,
    "n_inner": None,
    "n_positions": 1024,
    "n_ctx": 1024,
    "vocab_size": 50257,
}


# ---- shapes from config dicts -----------------------------------------------------------------


def test_llama3_8b_config() -> None:
    s = shape_from_config(LLAMA3_8B)
    assert s.n_params == pytest.approx(8.03e9, rel=0.03)
    assert (s.n_layers, s.d_model, s.d_vocab, s.n_heads, s.d_mlp) == (32, 4096, 128256, 32, 14336)
    assert s.exact_params is False


def test_gpt2_small_config() -> None:
    s = shape_from_config(GPT2_SMALL)
    assert s.n_params == pytest.approx(124.44e6, rel=0.03)
    assert (s.n_layers, s.d_model, s.d_vocab, s.d_mlp) == (12, 768, 50257, 3072)


def test_multimodal_config_reads_its_text_config() -> None:
    s = shape_from_config({"model_type": "gemma3", "text_config": LLAMA3_8B})
    assert s == shape_from_config(LLAMA3_8B)


def test_tied_embeddings_count_once() -> None:
    untied = shape_from_config(LLAMA3_8B).n_params
    tied = shape_from_config({**LLAMA3_8B, "tie_word_embeddings": True}).n_params
    assert untied - tied == 128256 * 4096


def test_tied_embeddings_are_read_from_the_config_or_left_unknown() -> None:
    assert shape_from_config(LLAMA3_8B).tied_embeddings is False
    assert shape_from_config({**LLAMA3_8B, "tie_word_embeddings": True}).tied_embeddings is True
    assert shape_from_config(GPT2_SMALL).tied_embeddings is True
    unknown = {k: v for k, v in LLAMA3_8B.items() if k != "tie_word_embeddings"}
    assert shape_from_config(unknown).tied_embeddings is None


def test_config_without_a_hidden_size_is_an_estimate_error() -> None:
    with pytest.raises(EstimateError, match="hidden_size"):
        shape_from_config({"num_hidden_layers": 2, "vocab_size": 10})


# ---- peak bytes -------------------------------------------------------------------------------


def test_peak_bytes_grow_with_batch_and_sequence() -> None:
    s = shape_from_config(LLAMA3_8B)
    by_batch = [estimate_peak_bytes(s, "float16", b, 256) for b in (1, 2, 4, 8, 16, 32)]
    assert by_batch == sorted(by_batch) and len(set(by_batch)) == len(by_batch)
    by_seq = [estimate_peak_bytes(s, "float16", 4, t) for t in (16, 64, 256, 1024)]
    assert by_seq == sorted(by_seq) and len(set(by_seq)) == len(by_seq)


def test_peak_bytes_cover_the_weights_and_halve_them_in_half_precision() -> None:
    s = shape_from_config(LLAMA3_8B)
    f32, f16, bf16 = (
        estimate_peak_bytes(s, dt, 1, 256) for dt in ("float32", "float16", "bfloat16")
    )
    assert f16 == bf16
    assert f32 > s.n_params * 4 and f16 > s.n_params * 2
    # Weights are most of an 8B model's peak at batch 1: float16 needs a little over half.
    assert 0.5 < f16 / f32 < 0.6
    assert f32 - f16 >= s.n_params * (BYTES_PER_PARAM["float32"] - BYTES_PER_PARAM["float16"])


# ---- split over several GPUs -----------------------------------------------------------------


def test_split_over_one_device_is_the_single_device_estimate() -> None:
    for cfg in (LLAMA3_8B, LLAMA3_70B, GPT2_SMALL):
        s = shape_from_config(cfg)
        for dtype in ("float32", "bfloat16"):
            assert estimate_split_bytes(s, dtype, 4, 256, 1) == [
                estimate_peak_bytes(s, dtype, 4, 256)
            ]


def test_split_shares_the_blocks_and_leaves_the_lens_on_device_0() -> None:
    s = shape_from_config(LLAMA3_70B)
    one = estimate_peak_bytes(s, "bfloat16", 4, 256)
    for k in (2, 3, 4, 5, 8, 16, 80):
        per_device = estimate_split_bytes(s, "bfloat16", 4, 256, k)
        assert len(per_device) == k
        lens, *others = per_device
        assert len(set(others)) == 1 and lens > others[0]
        # The lens device keeps the (un)embedding, its float32 copy and every residual.
        assert lens - others[0] > 3 * s.d_model * s.d_vocab * 2 * 1.2
        # Every device pays its own context: the sum exceeds one device's estimate.
        assert sum(per_device) > one + (k - 1) * 512 * 2**20
    lens = [estimate_split_bytes(s, "bfloat16", 4, 256, k)[0] for k in (1, 2, 4, 8, 16, 80)]
    assert lens == sorted(lens, reverse=True)
    # Blocks go in contiguous runs of at most ceil(80 / k): 3 GPUs hold 27 blocks each.
    three, four = (estimate_split_bytes(s, "bfloat16", 1, 1, k)[1] for k in (3, 4))
    assert three / four == pytest.approx(27 / 20, rel=0.02)


def test_unknown_tying_charges_the_upper_bound_on_every_device() -> None:
    tied, untied, unknown = (
        shape_from_config({**LLAMA3_70B, "tie_word_embeddings": t}, n_params=70_000_000_000)
        for t in (True, False, None)
    )
    assert unknown.tied_embeddings is None
    t, u, x = (estimate_split_bytes(sh, "bfloat16", 4, 256, 4) for sh in (tied, untied, unknown))
    assert x[0] > u[0] > t[0]  # device 0: two matrices and the larger blocks
    assert x[1] == t[1] > u[1]  # the others: blocks as large as a tied model's


def test_split_needs_a_block_per_device() -> None:
    s = shape_from_config(GPT2_SMALL)
    for k in (0, 13):
        with pytest.raises(ValueError, match=r"n_devices must be in 1\.\.12"):
            estimate_split_bytes(s, "float16", 1, 16, k)


def test_llama3_70b_in_bf16_is_planned_on_the_fewest_gpus_that_hold_it(tmp_path: Path) -> None:
    """The driver's demands for a 70B model, planned on simulated clusters (no Ray)."""
    from sweep.ledger import Ledger
    from sweep.manifest import load_manifest
    from sweep.placement import NodeInfo, plan
    from sweep.run import _demands, _largest_batch

    (tmp_path / "llama-70b").mkdir()
    (tmp_path / "llama-70b" / "config.json").write_text(json.dumps(LLAMA3_70B))
    body = '[sweep]\nname = "big"\nbatch_size = 4\n'
    for name, device in (("any", None), ("on-cuda", "cuda"), ("on-cpu", "cpu")):
        body += f'\n[[models]]\nname = "{name}"\nid = "./llama-70b"\ndtype = "bfloat16"\n'
        body += f'device = "{device}"\n' if device else ""
    body += '\n[[prompts]]\nid = "p"\ntext = "The capital of Germany is"\nanswer = "Berlin"\n'
    (tmp_path / "m.toml").write_text(body)
    manifest = load_manifest(tmp_path / "m.toml")
    ledger = Ledger(tmp_path / "ledger.json", {"models": {}})
    names = [m.name for m in manifest.models]

    demands = _demands(manifest, names, ledger, max_gpus=8)
    shape = shape_from_config(LLAMA3_70B)
    batch, seq = _largest_batch(manifest)
    assert (batch, seq) == (1, len("The capital of Germany is") + 2)
    assert sorted(demands[0].cuda_split) == list(range(2, 9))
    assert demands[0].cuda_split[3] == tuple(estimate_split_bytes(shape, "bfloat16", 1, seq, 3))
    assert demands[1].cuda_split == demands[0].cuda_split
    assert demands[2].cuda_split == {}  # pinned to the CPU: never split
    assert [len(d.cuda_split) for d in _demands(manifest, names, ledger)] == [0, 0, 0]

    def node(node_id: str, gib: float, n: int) -> NodeInfo:
        return NodeInfo(node_id, "10.0.0.9", 64, 256 * GIB, gpu_free_bytes=(int(gib * GIB),) * n)

    # ~166 GiB on one device: two ~139 GiB H200s hold it; 80 GiB H100s need three.
    (p, *_) = plan(demands[:1], [node("h200", 139, 8)])
    assert (p.device_kind, p.n_gpus, p.dtype) == ("cuda", 2, "bfloat16")
    (p, *_) = plan(demands[:1], [node("h100", 79, 8)])
    assert (p.device_kind, p.n_gpus) == ("cuda", 3)
    # Eight 24 GiB GPUs are too few (~32 GiB on the lens GPU); pinned to CUDA, it is skipped.
    (p, *_) = plan(demands[1:2], [node("small", 24, 8)])
    assert p.status == "skipped_no_fit"
    assert "split over 8 GPUs of one node" in p.reason
    assert "offers 192.0 GiB free on 8 GPUs" in p.reason


def test_the_estimate_sizes_the_batches_the_prompts_really_make(tmp_path: Path) -> None:
    """batch_size = 100000 with one short prompt was skipped_no_fit with an 8.8 TiB estimate."""
    from sweep.ledger import Ledger
    from sweep.manifest import load_manifest
    from sweep.run import _demands

    (tmp_path / "llama-70b").mkdir()
    (tmp_path / "llama-70b" / "config.json").write_text(json.dumps(LLAMA3_70B))
    body = '[sweep]\nbatch_size = 100000\n[[models]]\nname = "m"\nid = "./llama-70b"\n'
    body += '[[prompts]]\nid = "p"\ntext = "Hello"\n[[prompts]]\nid = "q"\ntext = "Straße"\n'
    (tmp_path / "m.toml").write_text(body)
    manifest = load_manifest(tmp_path / "m.toml")
    ledger = Ledger(tmp_path / "ledger.json", {"models": {}})
    (demand,) = _demands(manifest, ["m"], ledger)
    shape = shape_from_config(LLAMA3_70B)
    # Two prompts, at most len("Straße".encode()) = 7 bytes, + BOS and a spare.
    assert demand.est_bytes["cuda"] == estimate_peak_bytes(shape, "float16", 2, 9)
    assert demand.est_bytes["cuda"] < 200 * GIB

    # batch_tokens bounds rows x padded width: 40 prompts of up to 30 bytes (seq 32) in batches
    # of at most 100 tokens need the memory of ceil(100 / 32) = 4 rows of 32, not 40.
    from actors.prompts import PromptSpec, plan_batches
    from sweep.run import _largest_batch

    body = '[sweep]\nbatch_size = 100000\nbatch_tokens = 100\n[[models]]\nname = "m"\n'
    body += 'id = "./llama-70b"\n'
    texts = ["x" * (1 + i % 30) for i in range(40)]
    body += "".join(f'[[prompts]]\nid = "p{i}"\ntext = "{t}"\n' for i, t in enumerate(texts))
    (tmp_path / "m.toml").write_text(body)
    manifest = load_manifest(tmp_path / "m.toml")
    (demand,) = _demands(manifest, ["m"], ledger)
    assert _largest_batch(manifest) == (4, 32)
    assert demand.est_bytes["cuda"] == estimate_peak_bytes(shape, "float16", 4, 32)
    # An upper bound on every batch the prompts make, even at one token per byte (+ BOS).
    specs = [PromptSpec(f"p{i}", t) for i, t in enumerate(texts)]
    for batch in plan_batches(specs, [len(t) + 1 for t in texts], 100000, 100):
        rows, width = len(batch), max(len(p.text) + 1 for p in batch)
        assert rows * width <= 4 * 32 and rows * width**2 <= 4 * 32**2


# ---- shapes from local directories and files --------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llama_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, int]]:
    """Tiny random Llamas saved with save_pretrained: {variant: (directory, sum of numel)}."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    made = {}
    for variant, tied, shard in (
        ("untied", False, None),
        ("tied", True, None),
        ("sharded", False, "100KB"),
    ):
        torch.manual_seed(316)
        config = LlamaConfig(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=500,
            tie_word_embeddings=tied,
        )
        model = LlamaForCausalLM(config)
        target = tmp_path_factory.mktemp(variant)
        kwargs = {"max_shard_size": shard} if shard else {}
        model.save_pretrained(target, safe_serialization=True, **kwargs)
        made[variant] = (target, sum(p.numel() for p in model.parameters()))
    return made


@pytest.mark.parametrize("variant", ["untied", "tied", "sharded"])
def test_local_directory_counts_safetensors_params_exactly(
    tiny_llama_dirs: dict[str, tuple[Path, int]], variant: str
) -> None:
    directory, n_params = tiny_llama_dirs[variant]
    if variant == "sharded":
        assert len(list(directory.glob("*.safetensors"))) > 1
    s = model_shape(ModelSource(hf=str(directory)))
    assert s.exact_params and s.n_params == n_params
    assert (s.n_layers, s.d_model, s.d_vocab, s.n_heads, s.d_mlp) == (2, 64, 500, 4, 96)
    # The config-only derivation agrees to within the norm weights it over-counts.
    derived = shape_from_config(json.loads((directory / "config.json").read_text()))
    assert derived.n_params == pytest.approx(n_params, rel=0.01)


def test_a_second_copy_of_the_weights_is_not_counted(
    tiny_llama_dirs: dict[str, tuple[Path, int]], tmp_path: Path
) -> None:
    # Regression: Mistral repositories ship consolidated.safetensors beside the HF checkpoint;
    # counting every *.safetensors doubled the estimate.
    for variant in ("untied", "sharded"):
        source, n_params = tiny_llama_dirs[variant]
        directory = tmp_path / variant
        shutil.copytree(source, directory)
        shutil.copy(next(directory.glob("*.safetensors")), directory / "consolidated.safetensors")
        assert model_shape(ModelSource(hf=str(directory))).n_params == n_params


def test_packaged_smollm2_gguf(tmp_path: Path) -> None:
    source = ModelSource(gguf_package=SMOLLM2_PACKAGE, gguf_file=SMOLLM2_GGUF)
    s = model_shape(source, cache_dir=tmp_path)
    assert (s.n_layers, s.d_model, s.d_vocab, s.n_heads, s.d_mlp) == (30, 576, 49152, 9, 1536)
    assert s.n_params == pytest.approx(134.5e6, rel=0.005)
    assert s.n_params == 134_515_008  # gguf's GGUFReader counts the same
    assert s.exact_params


def test_gguf_header_written_by_gguf_writer(tmp_path: Path) -> None:
    import gguf

    path = tmp_path / "tiny.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(3)
    w.add_embedding_length(8)
    w.add_head_count(2)
    w.add_feed_forward_length(24)
    w.add_context_length(128)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"tok{i}" for i in range(40)])
    w.add_token_scores([0.5] * 40)
    w.add_token_merges(["t o", "o k"])
    w.add_array("test.nested", [[1, 2], [3]])
    shapes = {
        "token_embd.weight": (40, 8),
        "blk.0.attn_q.weight": (8, 8),
        "output_norm.weight": (8,),
    }
    for name, shape in shapes.items():
        w.add_tensor(name, np.zeros(shape, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    s = model_shape(ModelSource(gguf_path=str(path)))
    assert s == ModelShape(40 * 8 + 64 + 8, 3, 8, 40, 2, 24, exact_params=True)


# ---- errors -----------------------------------------------------------------------------------


def test_directory_without_config_json(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(EstimateError, match=r"has no config\.json"):
        model_shape(ModelSource(hf=str(tmp_path)))


def test_hub_id_while_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable once, at import; it may be imported already.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(EstimateError, match="from the hub") as info:
        model_shape(ModelSource(hf="lens-sweep-tests/no-such-model"))
    assert "lens-sweep-tests/no-such-model" in str(info.value)


def test_packaged_gguf_whose_package_is_missing(tmp_path: Path) -> None:
    source = ModelSource(gguf_package="lens_sweep_no_such_package", gguf_file="x.gguf")
    with pytest.raises(EstimateError, match="not installed"):
        model_shape(source, cache_dir=tmp_path)


def test_file_that_is_not_a_gguf(tmp_path: Path) -> None:
    path = tmp_path / "fake.gguf"
    path.write_bytes(b"PK\x03\x04 not a gguf at all")
    with pytest.raises(EstimateError, match=r"fake\.gguf.*GGUF"):
        model_shape(ModelSource(gguf_path=str(path)))


def test_truncated_gguf(tmp_path: Path) -> None:
    from tests.checkpoints import smollm2_gguf_path

    path = tmp_path / "cut.gguf"
    with open(smollm2_gguf_path(), "rb") as f:
        path.write_bytes(f.read(4096))  # ends inside the token list
    with pytest.raises(EstimateError, match="could not read the shape"):
        model_shape(ModelSource(gguf_path=str(path)))


# ---- the anchor's larger models: published configs against published sizes ---------------------

REPO = Path(__file__).resolve().parents[2]
MISTRAL_SMALL_24B = {
    "architectures": ["MistralForCausalLM"],
    "model_type": "mistral",
    "hidden_size": 5120,
    "intermediate_size": 32768,
    "num_attention_heads": 32,
    "num_hidden_layers": 40,
    "num_key_value_heads": 8,
    "head_dim": 128,  # not hidden_size / heads (160): the attention is narrower than the stream
    "vocab_size": 131072,
    "tie_word_embeddings": False,
}
QWEN25_72B = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 8192,
    "intermediate_size": 29568,
    "num_attention_heads": 64,
    "num_hidden_layers": 80,
    "num_key_value_heads": 8,
    "vocab_size": 152064,
    "tie_word_embeddings": False,
}
# all.toml name -> (the config.json fields that size it, its parameter count: what transformers
# builds from that config, which the model cards round to 24B, 70.6B and 72.7B)
ANCHOR_MODELS = {
    "Mistral-Small-24B-Base-2501": (MISTRAL_SMALL_24B, 23_572_403_200),
    "Meta-Llama-3-70B": (LLAMA3_70B, 70_553_706_496),
    "Qwen2.5-72B": (QWEN25_72B, 72_706_203_648),
}
SIZING_KEYS = (
    "architectures", "hidden_size", "intermediate_size", "num_attention_heads",
    "num_hidden_layers", "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings",
)  # fmt: skip
H200_BYTES = 141 * 10**9  # as sold; the device reports about 139 GiB of it free


@pytest.mark.parametrize("name", list(ANCHOR_MODELS))
def test_anchor_models_derive_their_published_parameter_counts(name: str) -> None:
    config, published = ANCHOR_MODELS[name]
    s = shape_from_config(config)
    assert s.n_params == pytest.approx(published, rel=0.01)
    # Never below: the derivation counts 4 d of norm weights a block where there are 2 d.
    assert published <= s.n_params < published * 1.0001
    assert s.tied_embeddings is False and not s.exact_params


def test_qwen2_qkv_biases_fit_in_the_norm_allowance() -> None:
    """The derivation counts no biases; Qwen2's q/k/v projections have them (10,240 a block)."""
    c = QWEN25_72B
    head_dim = c["hidden_size"] // c["num_attention_heads"]
    per_block = head_dim * (c["num_attention_heads"] + 2 * c["num_key_value_heads"])
    biases = c["num_hidden_layers"] * per_block
    assert biases == 819_200  # 0.001% of 72.7B: no weight on any plan
    norm_allowance = c["num_hidden_layers"] * 2 * c["hidden_size"]  # counted, not present
    assert norm_allowance > biases
    assert shape_from_config(c).n_params - ANCHOR_MODELS["Qwen2.5-72B"][1] == (
        norm_allowance - biases
    )


def test_anchor_configs_are_the_device_checks_shapes_and_build_their_published_counts() -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    for name, (config, published) in ANCHOR_MODELS.items():
        shape_file = json.loads((REPO / "bench" / "shapes" / f"{name}.json").read_text())
        assert {k: shape_file.get(k) for k in SIZING_KEYS} == {
            k: config.get(k) for k in SIZING_KEYS
        }
        with torch.device("meta"):  # shapes only, no memory
            model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**shape_file))
        assert sum(p.numel() for p in model.parameters()) == published, name


def test_anchor_models_in_bf16_are_planned_on_one_h200_or_two(tmp_path: Path) -> None:
    """The driver's demands for the three, with all.toml's prompts and dtypes (no Ray)."""
    from sweep.ledger import Ledger
    from sweep.manifest import load_manifest
    from sweep.placement import NodeInfo, plan
    from sweep.run import _demands, _largest_batch

    dtypes = {m.name: m.dtype for m in load_manifest(REPO / "manifests" / "all.toml").models}
    prompts = REPO / "manifests" / "prompts" / "capital-de.toml"
    body = f'include = [{json.dumps(str(prompts))}]\n[sweep]\nname = "anchor"\nbatch_size = 16\n'
    for name, (config, _) in ANCHOR_MODELS.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(config))
        body += f'\n[[models]]\nname = "{name}"\nid = "./{name}"\ndtype = "{dtypes[name]}"\n'
    (tmp_path / "m.toml").write_text(body)
    manifest = load_manifest(tmp_path / "m.toml")
    ledger = Ledger(tmp_path / "ledger.json", {"models": {}})
    names = list(ANCHOR_MODELS)
    demands = dict(zip(names, _demands(manifest, names, ledger, max_gpus=8), strict=True))
    batch, seq = _largest_batch(manifest)
    assert (batch, seq) == (16, 78)  # all.toml's batches: 16 prompts, <= 76 bytes + BOS + 1

    h200s = NodeInfo("h200", "10.0.0.9", 64, 512 * GIB, gpu_free_bytes=(139 * GIB,) * 8)
    cpu_only = NodeInfo("cpu", "10.0.0.8", 64, 256 * GIB)
    want_gpus = {"Mistral-Small-24B-Base-2501": 1, "Meta-Llama-3-70B": 2, "Qwen2.5-72B": 2}
    for name, d in demands.items():
        assert d.dtype == {"cuda": "bfloat16", "mps": "bfloat16", "cpu": "bfloat16"}, name
        weights = ledger.models[name]["weights_bytes"]["cuda"]
        # Llama-3-70B's bf16 weights alone (141.1 GB) overflow an H200; Qwen2.5-72B's too.
        assert (weights > H200_BYTES) == (want_gpus[name] == 2), name
        assert (d.est_bytes["cuda"] > 139 * GIB) == (want_gpus[name] == 2), name
        (p,) = plan([d], [h200s])
        assert (p.status, p.device_kind, p.n_gpus, p.dtype) == (
            "planned", "cuda", want_gpus[name], "bfloat16",
        ), name  # fmt: skip
        if want_gpus[name] == 2:
            assert max(p.est_bytes_per_gpu) < 100 * GIB  # two hold it with room to spare
        # A 256 GiB CPU node holds each in bf16; float32 (the CPU default) would not hold the
        # 70B and 72B at twice the bytes.
        (p,) = plan([d], [cpu_only])
        assert (p.status, p.device_kind) == ("planned", "cpu"), name
        f32 = estimate_peak_bytes(shape_from_config(ANCHOR_MODELS[name][0]), "float32", 16, 78)
        assert (f32 > 256 * GIB) == (want_gpus[name] == 2), name


def test_trained_lenses_add_their_weights_and_one_translated_residual_copy() -> None:
    from sweep.estimate import translator_bytes

    small = ModelShape(135_000_000, 30, 576, 49152, 9, 1536, exact_params=True)
    wide = ModelShape(8_000_000_000, 32, 4096, 128256, 32, 14336, exact_params=True)
    assert translator_bytes(small, (), 4, 16) == 0
    resid = 31 * 4 * 16 * 576 * 4  # one float32 copy of the 31 hooked layers
    tuned = translator_bytes(small, ("tuned",), 4, 16)
    assert tuned == 31 * (576 * 576 + 576) * 4 + resid  # full d x d maps up to d = 2048
    both = translator_bytes(small, ("tuned", "prism"), 4, 16)
    assert both == tuned + (2 * 576 * 576 + 4 * 576) * 4  # the copy is counted once
    # Above d = 2048 the tuned lens is rank clip(d / 32, 64, 256) = 128: two d x r factors.
    wide_tuned = translator_bytes(wide, ("tuned",), 1, 1) - 33 * 4096 * 4
    assert wide_tuned == 33 * (2 * 4096 * 128 + 4096) * 4
