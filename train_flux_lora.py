"""Train a FLUX.1 LoRA by flow matching from the cache of precompute_embeddings.py.

    accelerate launch train_flux_lora.py --embeddings_dir cache/ --output_dir runs/my-lora [--flags]

Plain `python train_flux_lora.py ...` runs on one device. See --help for every flag.
Exit codes: 0 done; 1 failed (the message says why; a stop on non-finite losses leaves a checkpoint);
2 bad flags; 75 stopped by SIGTERM/SIGINT/SIGUSR1 after saving a checkpoint: run again with
--resume_from_checkpoint latest.
"""
import sys

from fluxlora.config import TrainConfig, parse_config


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(TrainConfig, argv, description=__doc__)
    # torch and diffusers take seconds to import: only now, so that --help and a flag to fix answer at once
    from fluxlora.cache import CacheError
    from fluxlora.checkpoint import CheckpointError
    from fluxlora.preemption import EXIT_PREEMPTED
    from fluxlora.trainer import NonFiniteLoss, Preempted, train

    try:
        lora = train(cfg)
    except Preempted as stop:
        print(f"train_flux_lora.py: {stop}", file=sys.stderr)
        return EXIT_PREEMPTED
    except (CacheError, CheckpointError, NonFiniteLoss, FileNotFoundError) as err:
        print(f"train_flux_lora.py: error: {err}", file=sys.stderr)
        return 1
    print(f"LoRA: {lora}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
