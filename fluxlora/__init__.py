"""fluxlora: FLUX.1 LoRA fine-tuning on Hugging Face Accelerate.

One module per concern: config, tiny (test pipelines), data and buckets, cache, precompute,
flow (flow-matching math), models, lora_io, trainer, checkpoint, metrics, sampling, oxen.
"""
