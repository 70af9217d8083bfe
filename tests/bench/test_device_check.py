"""The device check, as CI runs it: ``--device cpu --tiny`` over every shape of all.toml.

On a GPU the same command with ``--device cuda`` (and real shapes) is how a user checks a box;
on CPU the tiny shapes take the whole path: build, load, placement check, parity, reruns,
timings, and a ``sweep.run`` through Ray.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.device_check import SHAPES_DIR, load_host_ram_ok, shape_names
from tests.conftest import REPO_ROOT, TEST_CACHE

TIMEOUT_S = 900


def _env(tokenizer_dir: Path) -> dict[str, str]:
    return {
        **os.environ,
        "LENS_SWEEP_CACHE": str(TEST_CACHE),
        "LENS_SWEEP_TOKENIZER": str(tokenizer_dir),
        "TRANSFORMERS_VERBOSITY": "error",
        "PYTHONUNBUFFERED": "1",
    }


@pytest.fixture(scope="module")
def tokenizer_dir(smollm2_tok, test_cache: Path) -> Path:
    return test_cache / "test-tokenizers" / "smollm2"  # saved there by the smollm2_tok fixture


def test_every_model_of_all_toml_has_a_shape():
    names = shape_names()
    assert len(names) == 10
    for name in names:
        config = json.loads((SHAPES_DIR / f"{name}.json").read_text())
        assert config["architectures"][0].endswith("ForCausalLM")


def test_host_ram_check_allows_overhead_but_not_a_second_copy():
    # Figures from the H200 run: tiny shapes added ~0.1 GiB for 0.01 GiB of weights (runtime
    # overhead, which the first form of this check flagged); Llama-3-8B added 0.11 GiB for 15
    # GiB; a load through host RAM would add about the weights' size again.
    assert load_host_ram_ok(0.11, 0.01)
    assert load_host_ram_ok(0.11, 14.96)
    assert not load_host_ram_ok(15.0, 14.96)
    assert not load_host_ram_ok(8.0, 14.96)


# The anchor's larger models (Mistral-Small-24B, Llama-3-70B, Qwen2.5-72B) are the Mistral, Llama
# and Qwen2 code paths at other sizes; tiny versions replace exactly the sizes, so the tiny check
# covers every architecture and quirk with the seed's seven shapes (CI time), and a real device
# check (make device-check) runs all ten.
TINY_SHAPES = [n for n in shape_names() if n not in {
    "Mistral-Small-24B-Base-2501", "Meta-Llama-3-70B", "Qwen2.5-72B"}]  # fmt: skip


def test_tiny_device_check_on_cpu_passes_every_check(tmp_path, tokenizer_dir):
    out = tmp_path / "check.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.device_check", "--device", "cpu", "--tiny",
         "--split", "cpu", "--work", str(tmp_path / "work"), "--json", str(out),
         *(a for n in TINY_SHAPES for a in ("--shape", n))],
        cwd=REPO_ROOT, env=_env(tokenizer_dir), capture_output=True, text=True, timeout=TIMEOUT_S,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "all checks hold" in proc.stdout
    result = json.loads(out.read_text())
    assert len(TINY_SHAPES) == 7
    assert [s["name"] for s in result["shapes"]] == [f"{n}-tiny" for n in TINY_SHAPES]
    for shape in result["shapes"]:
        assert not shape["error"]
        assert shape["checks"] and all(shape["checks"].values()), shape["checks"]
        assert [(r["batch"], r["positions"]) for r in shape["rows"]] == [
            (1, "all"), (32, "all"), (256, "next"),
        ]  # fmt: skip
        assert all(r["rerun_equal"] and r["lens_s"] > 0 for r in shape["rows"])
        assert shape["parity_max_kl_bits"] <= 1e-5
        # The multi-device path: blocks split over two (CPU) devices agree with the whole model.
        assert shape["checks"]["split top-1 agrees"] and shape["split"].startswith("cpu: top-1 ")
    assert "7/7 ok on ['cpu']" in result["sweep"]
    assert result["failed"] == []
    # The table a user reads, one row per shape and batch.
    assert proc.stdout.count("-tiny |") == 7


def test_an_unknown_shape_is_a_clear_error(tmp_path, tokenizer_dir):
    proc = subprocess.run(
        [sys.executable, "-m", "bench.device_check", "--device", "cpu", "--tiny",
         "--shape", "Llama-9000", "--no-sweep", "--work", str(tmp_path)],
        cwd=REPO_ROOT, env=_env(tokenizer_dir), capture_output=True, text=True, timeout=TIMEOUT_S,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "no shape 'Llama-9000'" in proc.stderr and "Meta-Llama-3-8B" in proc.stderr
