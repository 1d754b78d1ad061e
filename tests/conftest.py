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


def repo_env(**values: str) -> dict[str, str]:
    """The environment for a script of this repository run as a subprocess: the repository first on
    PYTHONPATH, before any path the caller's packages come from."""
    from pathlib import Path

    repo = str(Path(__file__).resolve().parent.parent)
    return {**os.environ, "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")]),
            "HF_HUB_OFFLINE": "1", **values}


def reset_accelerate() -> None:
    """Accelerate keeps process-wide singletons; a test that builds an Accelerator with other
    settings (the trainer's) needs them cleared first."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory, tiny_flux_dev, demo_dir):
    """The demo dataset cached at 64 px with 32 T5 tokens (fast to train on), plus 2 validation prompts."""
    from accelerate import Accelerator

    from fluxlora import precompute
    from fluxlora.config import PrecomputeConfig

    out = tmp_path_factory.mktemp("demo-cache")
    cfg = PrecomputeConfig(dataset=str(demo_dir / "images"), embeddings_dir=str(out),
                           pretrained_model_name_or_path=str(tiny_flux_dev), resolutions=[64],
                           max_sequence_length=32, validation_prompts_file=str(demo_dir / "validation_prompts.txt"))
    cfg.validate()
    reset_accelerate()  # first used after a test that left a CUDA Accelerator behind, cpu=True would be refused
    precompute.run(cfg, Accelerator(cpu=True))
    reset_accelerate()
    return out


@pytest.fixture
def fresh_accelerate():
    """For tests that build the trainer's Accelerator: clear accelerate's singletons around them."""
    reset_accelerate()
    yield
    reset_accelerate()


def train_config(cache, model, out, **overrides):
    """A validated TrainConfig for the tiny model on the CPU: fp32, no previews, fast steps."""
    from fluxlora.config import TrainConfig

    values = dict(embeddings_dir=str(cache), pretrained_model_name_or_path=str(model), output_dir=str(out),
                  mixed_precision="no", validation_steps=0, learning_rate=1e-3)
    cfg = TrainConfig(**{**values, **overrides})
    cfg.validate()
    return cfg


def tiny_lora_transformer(model, dtype: torch.dtype = torch.float32,
                          dropout: float = 0.0) -> tuple[torch.nn.Module, list[torch.nn.Parameter]]:
    """The tiny transformer in `dtype` with the default LoRA layers at rank 4 (seeded), and the LoRA
    weights (fp32; PEFT freezes the rest)."""
    from diffusers import FluxTransformer2DModel

    from fluxlora.config import DEFAULT_LORA_LAYERS
    from fluxlora.models import add_lora

    transformer = FluxTransformer2DModel.from_pretrained(model, subfolder="transformer", dtype=dtype)
    torch.manual_seed(0)
    return transformer, add_lora(transformer, rank=4, alpha=4, target_modules=DEFAULT_LORA_LAYERS, dropout=dropout)
