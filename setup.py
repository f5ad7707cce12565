"""atdiff_jax: adversarial training of diffusion and consistency models in JAX/Flax."""
from setuptools import find_packages, setup

# Minimum versions are the ones the test suite was run with.
INSTALL_REQUIRES = [
    "numpy>=2.0",
    "jax>=0.10.2",
    "flax>=0.12.8",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12.8",
    "etils[epath]>=1.15.0",  # workdirs and run files as local paths or gs:// URLs
    "ml-collections>=1.1.0",
    "clu>=0.0.12",
    "absl-py>=2.1",
    "pillow>=10.0",
    "matplotlib>=3.8",  # evaluation plots (metric vs NFE, robustness curves)
    # Data: TFDS datasets read without TensorFlow through tfds.data_source + grain (ArrayRecord).
    "tensorflow-datasets>=4.9.10",
    "grain>=0.2.18",
    "array_record>=0.8.6",
    "importlib_resources>=7.1.0",  # used by TFDS 4.9.10 but not declared by it
    # clu's metric writers write TensorBoard event files through TensorFlow.
    "tensorflow-cpu>=2.21.0",
    "tensorboard>=2.21.0",
]

EXTRAS = {
    # nbclient/nbformat/ipykernel: tests/test_notebooks.py executes notebooks/*.ipynb.
    "test": ["pytest>=9.0", "pytest-xdist>=3.8", "nbclient>=0.11.0", "nbformat>=5.11.1",
             "ipykernel>=7.4.0"],
    # Reading PyTorch checkpoints (.pt) of guided-diffusion / AT_Diff.
    "convert": ["torch>=2.13.0"],
}

setup(
    name="atdiff_jax",
    version="0.1.0",
    description=("Adversarial training of the noisy input for diffusion and consistency "
                 "models (Wang et al., ICLR 2025) in JAX/Flax"),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["atdiff_jax", "atdiff_jax.*"]),
    # The MNIST evaluation classifier's weights (atdiff_jax.eval.mnist_fd) ship with the package.
    package_data={"atdiff_jax": ["assets/*.msgpack", "assets/*.json"]},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["atdiff=atdiff_jax.cli:run"]},
)
