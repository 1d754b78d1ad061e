"""Convert a FLUX.1 LoRA file between diffusers format and kohya sd-scripts format.

    python convert_lora.py IN.safetensors OUT.safetensors --to kohya|diffusers

kohya format is what sd-scripts writes and what ComfyUI and Forge load natively; diffusers format
is what this toolkit, diffusers and ai-toolkit write. The conversion changes no output of the model.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fluxlora.config import LORA_FORMATS


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments, convert, print the written path; return the exit status."""
    parser = argparse.ArgumentParser(
        prog="convert_lora.py",
        description="Convert a FLUX.1 LoRA .safetensors file between diffusers and kohya formats.",
    )
    parser.add_argument("src", type=Path, help="LoRA file to read (either format)")
    parser.add_argument("dst", type=Path, help="file to write (replaced atomically if it exists)")
    parser.add_argument("--to", choices=LORA_FORMATS, required=True, help="format to write")
    args = parser.parse_args(argv)
    # torch and diffusers take seconds to import: only now, so that --help and a flag to fix answer at once
    from fluxlora.lora_io import convert_lora_file

    try:
        written = convert_lora_file(args.src, args.dst, args.to)
    except (OSError, ValueError) as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 1
    print(written)
    return 0


if __name__ == "__main__":
    sys.exit(main())
