#!/usr/bin/env bash
# The whole job end to end on the embedded default: a tiny random FLUX.1 model and the demo dataset.
#   bash scripts/demo.sh            (outputs in runs/demo/)
# Builds the tiny model, caches the demo images and captions, trains a LoRA, samples with and
# without it, and prints where everything is. Same scripts and flags as a real run, smaller numbers.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
RUN="${RUN:-runs/demo}"
STEPS="${STEPS:-300}"
MODEL="$RUN/tiny-flux-dev"
rm -rf "$RUN"
mkdir -p "$RUN"

python -m fluxlora.tiny "$MODEL"
python precompute_embeddings.py --pretrained_model_name_or_path "$MODEL" --dataset demo/images \
  --embeddings_dir "$RUN/cache" --resolutions 256 --max_upscale 1 --max_sequence_length 64 \
  --validation_prompts_file demo/validation_prompts.txt
python train_flux_lora.py --pretrained_model_name_or_path "$MODEL" --embeddings_dir "$RUN/cache" \
  --output_dir "$RUN/lora" --max_train_steps "$STEPS" --checkpointing_steps 100 --checkpoints_total_limit 2 \
  --learning_rate 1e-3 --mixed_precision no --logging_steps 10 \
  --validation_steps 150 --validation_width 256 --validation_height 256 --validation_inference_steps 8
python sample.py --pretrained_model_name_or_path "$MODEL" --lora "$RUN/lora/pytorch_lora_weights.safetensors" \
  --prompt_file demo/validation_prompts.txt --output_dir "$RUN/samples" --width 256 --height 256 \
  --num_inference_steps 8 --max_sequence_length 64 --mixed_precision no --compare

cat <<DONE

Demo finished. Open:
  LoRA (diffusers format): $RUN/lora/pytorch_lora_weights.safetensors
  training log (JSONL):    $RUN/lora/logs.jsonl
  loss curve:              $RUN/lora/loss_curve.png
  previews before/after:   $RUN/lora/samples_grid.png
  sample.py, base vs LoRA: $RUN/samples/grid.png
DONE
