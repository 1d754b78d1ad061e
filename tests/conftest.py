import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_flux_dev(tmp_path_factory):
    """Path of a tiny random FLUX.1-dev pipeline (diffusers layout), built once per session."""
    from fluxlora.tiny import build_tiny_flux

    return build_tiny_flux(tmp_path_factory.mktemp("tiny-flux-dev"), variant="dev", seed=0)


@pytest.fixture(scope="session")
def tiny_flux_schnell(tmp_path_factory):
    """Path of a tiny random FLUX.1-schnell pipeline (diffusers layout), built once per session."""
    from fluxlora.tiny import build_tiny_flux

    return build_tiny_flux(tmp_path_factory.mktemp("tiny-flux-schnell"), variant="schnell", seed=0)


@pytest.fixture(scope="session")
def demo_dir():
    """The repository's demo dataset folder (images/, table.parquet, validation_prompts.txt)."""
    from pathlib import Path

    return Path(__file__).resolve().parent.parent / "demo"
