#!/usr/bin/env bash
# NoFrost adversarial training on several GPUs (one process per GPU, DDP over NCCL).
#
#   bash examples/torchrun_multi_gpu.sh 8 /data/imagenet [/path/to/pytorch-image-models/train.py]
#
# -b is per process: 8 GPUs x 64 = a global batch of 512 (lr 0.2 with 0.1 per 256 images).
# Attack steps run on each process's own model copy outside DDP, so they trigger no gradient all-reduce;
# only the training backward synchronises. On CPUs, the same commands run over gloo (add --device cpu to train.py).
set -euo pipefail
GPUS=${1:?number of GPUs}
DATA=${2:?ImageFolder root with train/ and val/}
SCRIPT=${3:-}

# 1. the project's own training command
torchrun --nproc_per_node "$GPUS" -m timm_nofrost train \
    --data "$DATA" --model nf_resnet50_nofrost -b 64 --epochs 90 --workers 8 \
    --adv-attack-dtype bfloat16 --channels-last --out runs/nofrost50

# 2. or timm's train.py with the NoFrost trainer swapped in
if [[ -n "$SCRIPT" ]]; then
    torchrun --nproc_per_node "$GPUS" -m timm_nofrost timm-train "$SCRIPT" --adv-steps 10 -- "$DATA" \
        --model nf_resnet50_nofrost -b 64 --lr-base 0.1 --sched cosine --epochs 90 --smoothing 0.1 \
        --amp --channels-last --eval-metric robust_top1_pgd-10 --output runs --experiment nofrost50-timm
fi
