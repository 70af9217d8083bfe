"""The actor's unembed_precision: float32 unless asked, recorded in the diagnostics, and the
parity gate (float32 whatever the lens rows use) still passing with bfloat16 lens rows."""

from __future__ import annotations

import pytest

from actors import PromptSpec

PROMPTS = [
    PromptSpec("all", "The capital of Germany is called simply", "Berlin", "all", "primary"),
    PromptSpec("next", "Berlin is the capital of", "Germany", "next"),
]


def test_float32_unless_asked(tiny_actor):
    actor = tiny_actor("gemma2")
    assert actor.config.unembed_precision == "float32"
    assert actor.unembed.precision == "float32" and actor.unembed.W_U_bf16_T is None
    dtypes = actor.diagnostics()["dtype"]
    assert (dtypes["unembed"], dtypes["unembed_requested"], dtypes["reference"]) == (
        "float32",
        "float32",
        "float32",
    )


# gemma2: final-logit softcap 30 after the bf16 matmul; gpt2: LayerNorm with bias before it.
@pytest.mark.parametrize("arch", ["gemma2", "gpt2"])
def test_bfloat16_lens_rows_pass_the_float32_parity_gate(tiny_actor, arch):
    exact, fast = tiny_actor(arch), tiny_actor(arch, unembed_precision="bfloat16")
    for batch in ([PROMPTS[0]], [PROMPTS[1]]):
        want = exact.run_batch(batch).records.to_pydict()
        got = fast.run_batch(batch).records.to_pydict()  # raises if the parity gate failed
        top1 = [ids[0] for ids in got["top_ids"]]
        assert top1 == [ids[0] for ids in want["top_ids"]]
        pairs = zip(got["entropy_bits"], want["entropy_bits"], strict=True)
        worst = max(abs(a - b) for a, b in pairs)
        assert worst < 0.01  # bits; tiny random models have small logits, so bf16 errs little
        assert got["entropy_bits"] != want["entropy_bits"]  # bf16 did run
    diag = fast.diagnostics()
    assert diag["dtype"]["unembed"] == "bfloat16" and diag["dtype"]["reference"] == "float32"
    # The gate compares float32 reference logits with the model's own: exact, as in float32.
    assert diag["parity"]["max_abs_lens_minus_model_logits"] <= 1e-4
    assert diag["parity"]["top1_disagreements"] == 0


def test_tf32_on_the_cpu_runs_float32_and_says_so(tiny_actor):
    actor = tiny_actor("llama", unembed_precision="tf32")
    dtypes = actor.diagnostics()["dtype"]
    assert (dtypes["unembed"], dtypes["unembed_requested"]) == ("float32", "tf32")
    want = tiny_actor("llama").run_batch([PROMPTS[0]]).records
    assert actor.run_batch([PROMPTS[0]]).records.equals(want)
