"""train_flux_lora.py, then every process writes its own copy of the LoRA weights.

    accelerate launch ... tests/helpers/train_dump.py --dump_dir DIR <train_flux_lora.py flags>

tests/test_distributed.py compares DIR/rank-<r>.safetensors across processes: the checkpoint and
the exported LoRA come from the main process only, so they cannot show that the others agree.
(Not for FSDP, whose processes hold shards: the run has ended its process group by then.)
"""
import argparse
import json
import sys
from pathlib import Path

from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository, as for the real scripts

from fluxlora.checkpoint import adapter_state  # noqa: E402
from fluxlora.config import TrainConfig, parse_config  # noqa: E402
from fluxlora.trainer import Trainer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dump_dir", required=True)
    ours, rest = parser.parse_known_args()
    trainer = Trainer(parse_config(TrainConfig, rest))
    trainer.run()
    state = adapter_state(trainer.accelerator.unwrap_model(trainer.transformer))  # every process (FSDP gathers)
    dump = Path(ours.dump_dir)
    dump.mkdir(parents=True, exist_ok=True)
    save_file(state, dump / f"rank-{trainer.accelerator.process_index}.safetensors")
    model = trainer.transformer  # DDP's settings, for the test to check
    (dump / f"rank-{trainer.accelerator.process_index}.json").write_text(json.dumps(
        {"wrapper": type(model).__name__, "broadcast_buffers": getattr(model, "broadcast_buffers", None),
         "gradient_as_bucket_view": getattr(model, "gradient_as_bucket_view", None)}))


if __name__ == "__main__":
    main()
