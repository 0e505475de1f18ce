"""SafeWork-JAX: safety-oriented RL post-training of vision-language models (SafeLadder) in JAX."""

from setuptools import find_packages, setup

RUNTIME = [
    "jax>=0.10.2",
    "flax>=0.12.8",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12.8",
    "transformers>=5.24,<6",   # tokenizers and configs only; no torch at run time
    "tokenizers>=0.23",
    "safetensors>=0.8",
    "tensorflow-datasets>=4.9.10",   # array_record + tfds.data_source; TensorFlow is not needed
    "array-record>=0.8.6",
    "grain>=0.2.18",
    "importlib_resources>=7.1",   # tfds needs it for builders that live in a package
    "ml-collections>=1.1",
    "absl-py>=2.5",
    "numpy>=2.0",
    "pillow>=11",
    "tqdm>=4.66",
    "tensorboardX>=2.6",   # TensorBoard event files without TensorFlow
    "matplotlib>=3.9",     # the human report's plots
    "bm25s>=0.3",          # the search tool's index (deliberative-search RL)
]

setup(
    name="safework",
    version="0.1.0",
    description=__doc__,
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else __doc__,
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["safework", "safework.*"]),
    install_requires=RUNTIME,
    extras_require={
        # The reference implementation the tests compare against, pinned: PyTorch CPU build + transformers.
        "test": ["pytest==9.2.0", "pytest-xdist==3.8.0", "torch==2.13.0", "transformers==5.24.0"],
        "tpu": ["jax[tpu]>=0.10.2"],
        # Compiling for TPU slices on any machine (python -m safework.plan): libtpu, pinned to what jax[tpu] pins.
        "plan": ["libtpu==0.0.42.*"],
        "gpu": ["jax[cuda13]>=0.10.2"],
        "notebooks": ["nbclient>=0.11", "nbformat>=5.11", "ipykernel>=7.4", "matplotlib>=3.9"],
    },
)
