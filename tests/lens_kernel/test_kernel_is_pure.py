"""lens_kernel imports torch only: it imports and runs with the other layers made unimportable."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
BLOCKED = ("ray", "polars", "pyarrow", "transformer_lens", "transformers", "actors", "sweep")

SCRIPT = textwrap.dedent(
    """
    import importlib.abc
    import sys

    BLOCKED = {blocked!r}
    attempts = []


    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                attempts.append(name)
                raise ImportError(f"{{name}} is blocked: lens_kernel must import torch only")
            return None


    sys.meta_path.insert(0, Block())
    for name in BLOCKED:
        assert name not in sys.modules, name

    import torch

    import lens_kernel
    from lens_kernel import LensInputs, UnembedSpec, build_norm_plan, lens_pass

    g = torch.Generator().manual_seed(0)
    blocks, batch, seq, d, vocab = 2, 2, 3, 8, 16
    plan = build_norm_plan("final", blocks, lens_kernel.NormSpec("rmsnorm", None, None, 1e-6), [])
    resid_all = torch.randn(blocks + 1, batch, seq, d, generator=g)
    inputs = LensInputs(
        resid_next=resid_all[:, :, -1],
        prompt_ids=torch.zeros(batch, seq, dtype=torch.long),
        answer_ids=torch.tensor([1, -1]),
        resid_all=resid_all,
        positions=torch.ones(batch, seq, dtype=torch.bool),
    )
    out = lens_pass(inputs, plan, UnembedSpec(torch.randn(d, vocab, generator=g)), top_k=3)
    assert out.all_rows.top_ids.shape == ((blocks + 1) * batch * seq, 3)
    assert not attempts, attempts
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    assert not loaded, loaded

    # Not vacuous: under the same finder every blocked name fails to import.
    for name in BLOCKED:
        try:
            __import__(name)
        except ImportError:
            continue
        raise AssertionError(f"{{name}} imported despite the blocker")
    print("PURE-OK")
    """
).format(blocked=BLOCKED)


def test_lens_kernel_imports_and_runs_without_other_layers() -> None:
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "PURE-OK" in result.stdout
