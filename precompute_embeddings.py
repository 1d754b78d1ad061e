"""Encode a dataset's images (FLUX VAE) and captions (T5 + CLIP) once, into a disk cache for training.

    python precompute_embeddings.py --dataset demo/images --embeddings_dir runs/demo-cache
    accelerate launch precompute_embeddings.py ...   # several GPUs share the shards

Rerunning resumes: finished shards are kept. See fluxlora/precompute.py and fluxlora/cache.py.
"""
from __future__ import annotations

import sys

from fluxlora.config import ConfigError, PrecomputeConfig, parse_config


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(PrecomputeConfig, argv, description=__doc__.splitlines()[0])
    # torch and diffusers take seconds to import: only now, so that --help and a flag to fix answer at once
    import torch
    from accelerate import Accelerator

    from fluxlora.precompute import PrecomputeError, run

    # Without a GPU, processes started by `accelerate launch --multi_gpu` / torchrun only join one
    # (gloo) process group when the Accelerator is told to run on the CPU; otherwise each would
    # build the whole cache alone.
    accelerator = Accelerator(cpu=not (torch.cuda.is_available() or torch.backends.mps.is_available()))
    try:
        run(cfg, accelerator)
    except ConfigError as err:
        print(f"precompute_embeddings.py: error: {err}", file=sys.stderr)
        return 2
    except PrecomputeError as err:
        print(f"precompute_embeddings.py: error: {err}", file=sys.stderr)
        return 1
    finally:
        accelerator.end_training()  # tears the process group down cleanly on every exit path
    return 0


if __name__ == "__main__":
    sys.exit(main())
