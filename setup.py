"""nemo_tiedlora: Tied-LoRA (arXiv 2311.09578 v2) PEFT for NVIDIA NeMo 1.x / megatron-core.

Install into an environment that already has the stack (NVIDIA's NeMo container, or
`pip install -r requirements/requirements.txt -c requirements/constraints.txt`): the package itself pins nothing
heavy, so installing it never swaps the container's torch, apex or TransformerEngine.
"""

from setuptools import find_packages, setup

setup(
    name="nemo_tiedlora",
    version="0.1.0",
    description="Tied-LoRA: weight-tied low-rank adapters for NVIDIA NeMo and Megatron",
    packages=find_packages(include=["nemo_tiedlora", "nemo_tiedlora.*"]),
    # the study configs and the entry scripts' hydra YAML travel with the package (a wheel runs what a checkout runs)
    package_data={"nemo_tiedlora": ["apps/conf/*.yaml", "apps/entry_scripts/conf/*.yaml"]},
    python_requires=">=3.10",
    install_requires=[],  # torch, nemo_toolkit, megatron-core: see requirements/ (kept out so containers keep theirs)
    extras_require={"export": ["safetensors", "peft", "transformers"]},
    entry_points={"console_scripts": ["nemo-tiedlora=nemo_tiedlora.apps.cli:main"]},
)
