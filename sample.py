"""Generate images with a FLUX.1 model and any number of LoRAs, offline.

    python sample.py --pretrained_model_name_or_path MODEL --lora my.safetensors --prompt "a photo of ..."
    accelerate launch sample.py ... --prompt_file prompts.jsonl   # prompts split across processes
"""
import sys

import torch
from accelerate import Accelerator

from fluxlora.config import SampleConfig, parse_config
from fluxlora.sampling import run_sample


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(SampleConfig, argv, description=__doc__)
    out = run_sample(cfg, Accelerator(cpu=not torch.cuda.is_available()))
    print(f"samples: {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
