"""loradrop: LoRA-drop for the Hugging Face Trainer, and the Hub tooling for its pruned adapters."""

import re
from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
# Read, not imported: the version is written once, in loradrop_trainer/__init__.py, and building needs no torch.
version = re.search(r'^__version__ = "([^"]+)"', (here / "loradrop_trainer" / "__init__.py").read_text(), re.M)[1]

setup(
    name="loradrop",
    version=version,
    description="LoRA-drop (arXiv 2402.07721) as a Hugging Face Trainer callback, with compact Hub export",
    long_description=(here / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["loradrop_trainer", "loradrop_trainer.*", "hub_export", "hub_export.*"]),
    # Lower bounds are the releases .ci/oldest tests (.ci/oldest-versions.txt); no upper bounds: CI installs what pip
    # picks today, and tests/test_versions.py fails first when an installed release is outside these ranges.
    install_requires=[
        "torch>=2.11",  # CPU tests on 2.13; 2.11 is the GPU machine's (README, "Tested versions")
        "transformers>=5.23",  # the first with PreTrainedModel.activation_checkpointing_enable
        "peft>=0.22",  # modules_to_save matched at module boundaries; older PEFT wraps every name that ends alike
        "accelerate>=1.7",  # older releases break the bit-identical resume of a Trainer run
        "safetensors>=0.8",  # transformers 5.23's own bound
        "huggingface_hub>=1.31",  # transformers 5.23's own bound
        "matplotlib>=3.9",  # the first built for numpy 2
    ],
    extras_require={
        "deepspeed": ["deepspeed>=0.16"],
        "qlora": ["bitsandbytes>=0.50"],
        "recipes": ["datasets>=3.0", "evaluate>=0.4.6"],
        "demo": ["datasets>=3.0", "evaluate>=0.4.6", "gguf>=0.10"],
        "dev": [
            "pytest>=8",
            "ruff>=0.6",
            "datasets>=3.0",
            "evaluate>=0.4.6",
            "deepspeed>=0.16",
            "trl>=0.20",
            "bitsandbytes>=0.50",
            "scipy>=1.10",  # independent references (ranks, Kendall tau) in the tests
        ],
    },
    entry_points={"console_scripts": ["loradrop=hub_export.cli:main"]},
)
