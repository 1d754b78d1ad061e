"""Train a FLUX.1 LoRA by flow matching from the cache of precompute_embeddings.py.

    accelerate launch train_flux_lora.py --embeddings_dir cache/ --output_dir runs/my-lora [--flags]

Plain `python train_flux_lora.py ...` runs on one device. See --help for every flag.
"""
import sys

from fluxlora.config import TrainConfig, parse_config
from fluxlora.trainer import train


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(TrainConfig, argv, description=__doc__)
    lora = train(cfg)
    print(f"LoRA: {lora}", file=sys.stderr)


if __name__ == "__main__":
    main()
