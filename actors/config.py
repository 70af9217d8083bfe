"""What one lens actor is asked to do; torch-free, so a CPU-only head node can build it."""

from __future__ import annotations

from dataclasses import dataclass

from actors.sources import DEFAULT_CACHE_DIR, ModelSource

DEFAULT_SEED = 316
# Environment a worker process needs before its first CUDA call: cuBLAS reads its workspace
# setting when its handle is created, so setting it later in the process is too late. The sweep
# puts these into every actor's Ray runtime env.
WORKER_ENV = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}


@dataclass(frozen=True)
class ActorConfig:
    """Everything one lens actor needs; built by the driver from the manifest."""

    name: str
    source: ModelSource
    device: str = "cpu"  # where inputs, residuals and the lens live
    # Devices the model's blocks are split over, in order (multi-GPU); empty: all on `device`.
    # The driver sets ("cuda:0", ..., "cuda:k-1") for a model planned on k GPUs.
    devices: tuple[str, ...] = ()
    dtype: str | None = None  # None: the seed's policy for the device and family
    seed: int = DEFAULT_SEED
    lens: str = "final"  # the primary lens (a norm mode): the audit, parity and reports read it
    # Every lens decoded, the primary first (norm modes and trained lenses, "tuned", "prism");
    # empty: the primary alone.
    lenses: tuple[str, ...] = ()
    # Trained lenses' weights by kind (the bytes of their lens.safetensors): the driver owns the
    # files and checks each lens card against the model before it sends them.
    translator_weights: tuple[tuple[str, bytes], ...] = ()
    keep_layernorm_bias: bool = True
    top_k: int = 20
    copy_threshold: float = 0.90
    copy_margin: float = 0.05
    temperatures: tuple[float, ...] = (0.1, 2.0)
    prepend_bos: bool = True
    keep_residuals: bool = False
    # The lens-artefact audit (lens_kernel/audit.py) on next-token rows; off: its columns are null.
    audit: bool = True
    # The lens rows' unembedding matmul: "float32" (exact), "tf32" (CUDA) or "bfloat16" (faster,
    # approximate; lens_kernel/unembed.py). The parity gate and the KL reference stay float32.
    unembed_precision: str = "float32"
    chunk_bytes: int = 512 * 2**20
    # torch's intra-op threads: the driver sets the CPUs Ray reserved for the actor (Ray's
    # OMP_NUM_THREADS would otherwise hold a CPU actor to one core). None: torch's default.
    torch_threads: int | None = None
    cache_dir: str = str(DEFAULT_CACHE_DIR)
    # Runs on the CPU when the placed device is absent, and says so in the diagnostics; for
    # testing placement on machines without the hardware. Off by default.
    simulate_missing_device: bool = False
