"""The Ray driver: manifests -> plan -> actors -> merge -> artefacts; the CLI lives here."""

import os
import sys

# Polars' jemalloc keeps freed pages for 0.5-1 s (dirty, then muzzy decay) before it hands them
# back, and the driver assembles, merges and reports in quick succession: each step's garbage sat
# on top of the last one's in its RSS. With both decays 0 freed pages go back at once and the
# driver's memory follows what it holds (bench/sweep_scale.py: driver RSS at 10x the prompts).
# Read when polars loads: set before any sweep module imports it; a value the
# user set wins.
if "polars" not in sys.modules:
    os.environ.setdefault("_RJEM_MALLOC_CONF", "dirty_decay_ms:0,muzzy_decay_ms:0")
