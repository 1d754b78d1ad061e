"""FSDP2 checkpoint state on the CPU, for tests/test_fsdp.py.

accelerate shards only over GPUs, so this applies `fully_shard` itself over the gloo processes of
`accelerate launch` (one unit per FLUX block and the root, as accelerate's `fsdp2_prepare_model`
does with accelerate_configs/fsdp.yaml), then runs the trainer's `save_fsdp_state` or
`load_fsdp_state` around AdamW steps with given gradients:

    accelerate launch ... tests/helpers/fsdp_state.py --model DIR --checkpoint DIR --out FILE --phase save|load

save: step 1, then save the state to --checkpoint. load: load it, then step 2. Either way the main
process writes the gathered LoRA (and the learning rate) to --out.
"""
import argparse
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from fluxlora.checkpoint import adapter_state  # noqa: E402


def build(model_dir: str, world_size: int | None) -> tuple[torch.nn.Module, torch.optim.Optimizer, object]:
    """The tiny transformer with a LoRA (non-zero lora_B), sharded over `world_size` CPU processes
    (None: not sharded), with AdamW and a decaying learning rate."""
    from diffusers import FluxTransformer2DModel
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from fluxlora.config import DEFAULT_LORA_LAYERS
    from fluxlora.models import add_lora

    model = FluxTransformer2DModel.from_pretrained(model_dir, subfolder="transformer")
    torch.manual_seed(0)
    add_lora(model, rank=4, alpha=4, target_modules=DEFAULT_LORA_LAYERS)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_()
    if world_size:
        mesh = init_device_mesh("cpu", (world_size,))
        for block in [*model.transformer_blocks, *model.single_transformer_blocks]:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    return model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (1 + step))


def step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler, number: int) -> None:
    """One AdamW step with gradients drawn from `number` (the same on every process, then sharded)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    for i, param in enumerate(p for p in model.parameters() if p.requires_grad):
        grad = torch.randn(param.shape, generator=torch.Generator().manual_seed(1000 * number + i))
        if isinstance(param, DTensor):
            grad = distribute_tensor(grad, param.device_mesh, param.placements, src_data_rank=None)
        param.grad = grad
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()


def main() -> None:
    from accelerate import Accelerator
    from safetensors.torch import save_file

    from fluxlora.checkpoint import load_fsdp_state, save_fsdp_state

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--phase", choices=["save", "load"], required=True)
    args = parser.parse_args()
    acc = Accelerator(cpu=True)
    if not dist.is_initialized():  # one process: accelerate starts no process group
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    model, optimizer, scheduler = build(args.model, dist.get_world_size())
    folder = Path(args.checkpoint)
    if args.phase == "save":
        step(model, optimizer, scheduler, 1)
        folder.mkdir(parents=True, exist_ok=True)
        save_fsdp_state(acc, model, optimizer, scheduler, folder)
    else:
        load_fsdp_state(acc, model, optimizer, scheduler, folder)
        step(model, optimizer, scheduler, 2)
    lora = adapter_state(model)  # every process: gathers the shards
    if acc.is_main_process:
        save_file(lora, args.out, metadata={"lr": str(scheduler.get_last_lr()[0])})
    # Both processes reach here before either tears down its gloo connections: a process that destroyed
    # its group while the other still wrote its file once died in gloo's teardown (SIGABRT, "terminate
    # called without an active exception"; once in session 22's three runs of the whole suite).
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
