"""A CPU-only head node plans, merges and reports without torch or TransformerLens installed."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    """
    import sys

    # As if not installed: `import torch` fails and importlib.util.find_spec("torch") is None.
    for name in ("torch", "transformer_lens", "transformers"):
        sys.modules[name] = None
    import sweep.run, sweep.merge, sweep.report, sweep.fit  # noqa: F401  the driver's whole import graph
    from sweep.manifest import load_manifest
    from sweep.placement import ModelDemand, NodeInfo, plan
    from sweep.run import _actor_config

    m = load_manifest("manifests/all.toml")
    cfg = _actor_config(m, m.models[0].name)
    node = NodeInfo("ab" * 28, "127.0.0.1", 4, 64 * 2**30)
    placed = plan([ModelDemand("x", {"cuda": 1, "mps": 1, "cpu": 2**30}, {"cuda": "float16", "mps": "float16", "cpu": "float32"})], [node])
    assert placed[0].device_kind == "cpu", placed
    assert all(sys.modules[n] is None for n in ("torch", "transformer_lens", "transformers"))
    print("ok", cfg.name)
    """
)


def test_driver_side_imports_and_plans_without_torch() -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok Meta-Llama-3-8B"
