"""Generate images with a FLUX.1 model and any number of LoRAs, offline.

    python sample.py --pretrained_model_name_or_path MODEL --lora my.safetensors --prompt "a photo of ..."
    python sample.py --pretrained_model_name_or_path flux1-dev.safetensors --base_components FOLDER_OR_HUB_ID ...
    accelerate launch sample.py ... --prompt_file prompts.jsonl   # prompts split across processes

Writes one PNG per image (its text chunks record prompt, seed, settings and LoRAs), index.jsonl and
grid.png to --output_dir.
"""
import sys

from fluxlora.config import ConfigError, SampleConfig, parse_config


def main(argv: list[str] | None = None) -> int:
    """Parse the flags and render; return the exit status (2 for a flag to fix, as argparse does)."""
    cfg = parse_config(SampleConfig, argv, description=__doc__)
    # torch and diffusers take seconds to import: only now, so that --help and a flag to fix answer at once
    import torch
    from accelerate import Accelerator

    from fluxlora.sampling import run_sample

    try:
        out = run_sample(cfg, Accelerator(cpu=not torch.cuda.is_available()))
    except ConfigError as err:
        print(f"sample.py: error: {err}", file=sys.stderr)
        return 2
    print(f"samples: {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
