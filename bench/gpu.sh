#!/usr/bin/env bash
# Stable Diffusion 1.x on one GPU in a few minutes: the training step and its knobs, then
# text-to-image latency. Every table is Markdown, ready for bench/README.md.
#
#   bash bench/gpu.sh            # on a GPU machine (bf16; about 5-8 minutes on an H100)
#   bash bench/gpu.sh --smoke    # the same commands with tiny settings (any CPU, ~10 min
#                                # on 2 busy cores): checks that the script runs end to end
#
# 1. bench/train.py: the SD-1.x UNet training step at 512 px (64x64 latent) in bf16 with
#    AdamW and the EMA, batch 8: examples/s and MFU from the analytic FLOP count
#    (ldm_jax/flops.py), then one knob at a time against that row: the bf16 kernels cast
#    once per step (stage2.cast_params_once), flax's GroupNorm + SiLU instead of the fused
#    layers.group_norm (norm=flax), XLA's attention kernel instead of cuDNN's
#    (attention=xla), remat of every block (config.remat), batch 16 and 32.
# 2. bench/sample.py --sd: 50-step DDIM at 512x512, batch 1, guidance 7.5 (CLIP text,
#    UNet at batch 2, VAE decode, one jitted call), with cuDNN attention ('auto') and
#    with XLA's.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [[ "${1:-}" == "--smoke" ]]; then
  train=(--sd_preset tiny --sd_latent 8 --sd_batch 2 --sd_steps 2 --peak_n 256
         --sd_variants default,cast_once,norm=flax,attention=xla,remat,batch=4)
  sample=(--sd_preset tiny --sd_resolution 64 --sd_steps 4 --repeats 2)
else
  train=(--sd_latent 64 --sd_batch 8 --sd_steps 5 --peak_n 8192
         --sd_variants default,cast_once,norm=flax,attention=xla,remat,batch=16,batch=32,cast_once+batch=16)
  sample=(--sd_resolution 512 --sd_steps 50 --repeats 5)
fi

echo "== $(date -u +%F) $(hostname) =="
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
python -c "import jax; print('jax', jax.__version__, jax.devices())"

python bench/train.py --skip_tiny --dtype bfloat16 --data_batches 0 --sd_optimizer "${train[@]}"
python bench/sample.py --sd --dtype bfloat16 --sd_attention auto "${sample[@]}"
python bench/sample.py --sd --dtype bfloat16 --sd_attention xla "${sample[@]}"
