"""diffax: diffusion models in JAX/Flax NNX, correct to the paper and sharded across devices."""
import setuptools

setuptools.setup(
    name="diffax",
    version="0.1.0",
    description="A JAX/Flax research framework for training and evaluating diffusion models.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=setuptools.find_packages(include=["diffax", "diffax.*"]),
    install_requires=[
        "jax>=0.7",
        "flax>=0.12",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "grain>=0.2.12",
        "tensorflow-datasets>=4.9.9",
        "array-record>=0.8",
        "importlib-resources>=6",  # TFDS builders need it to prepare a dataset
        "ml-collections>=1.0",
        "einops>=0.8",
        "absl-py>=2.1",
        "numpy>=1.26",
        "scipy>=1.11",
        "scikit-learn>=1.4",
        "pillow>=10",
        "tensorboardX>=2.6",
        "matplotlib>=3.8",
        "safetensors>=0.4",
        "tokenizers>=0.15",  # tokenizer.json of pretrained text encoders (CLIP, T5)
        "diffrax>=0.6",
        "tqdm>=4.66",
        "submitit>=1.5",  # diffax sweep launches trials through it (local processes, SLURM)
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3.5", "hypothesis>=6.100"],
        "gpu": ["jax[cuda12]"],
        "tpu": ["jax[tpu]"],
        # Only `diffax convert-inception` and the fixture scripts need PyTorch.
        "torch": ["torch"],
    },
    entry_points={"console_scripts": ["diffax=diffax.cli:main"]},
)
