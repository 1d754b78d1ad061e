"""train_flux_lora.py under FSDP2 on CPU processes (gloo), for tests/test_fsdp.py.

    accelerate launch --config_file accelerate_configs/fsdp.yaml --mixed_precision no ... \
        tests/helpers/train_fsdp_cpu.py <train_flux_lora.py flags>

accelerate applies FSDP only to GPU processes: a CPU run's state stays MULTI_CPU although the launcher
passes fsdp.yaml's settings. This marks the trainer's Accelerator FSDP with the plugin those settings
make, after it is built, so that accelerate's own FSDP2 preparation (`fully_shard` per block, here over
a CPU mesh) and the trainer's FSDP path run as they do on GPUs.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository, as for the real scripts

from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin  # noqa: E402

import train_flux_lora  # noqa: E402
from fluxlora import trainer  # noqa: E402

build_accelerator = trainer.build_accelerator


def build_fsdp_accelerator(cfg):
    accelerator = build_accelerator(cfg)
    accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()  # from the launcher's FSDP_* variables
    accelerator.state.distributed_type = DistributedType.FSDP
    return accelerator


register_lora_hooks = trainer.register_lora_hooks


def report_sharding(accelerator, transformer):
    """After accelerate's preparation: the class FSDP2 gives the model, for the test to check."""
    if accelerator.is_main_process:
        print(f"prepared model: {type(transformer).__name__}", flush=True)
    register_lora_hooks(accelerator, transformer)


trainer.build_accelerator = build_fsdp_accelerator
trainer.register_lora_hooks = report_sharding

if __name__ == "__main__":
    sys.exit(train_flux_lora.main())
