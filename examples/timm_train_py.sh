#!/usr/bin/env bash
# Adversarial training inside timm's own train.py (unmodified), with robust validation every epoch.
#
#   bash examples/timm_train_py.sh /path/to/pytorch-image-models/train.py /data/imagenet
#
# train.py ships only in timm's repository: git clone https://github.com/huggingface/pytorch-image-models
# Everything before "--" configures the NoFrost trainer; everything after it goes to train.py unchanged.
set -euo pipefail
SCRIPT=${1:?path to timm's train.py}
DATA=${2:?ImageFolder root with train/ and val/}

timm-nofrost timm-train "$SCRIPT" \
    --adv-eps 8/255 --adv-steps 10 --adv-weight 0.5 \
    --adv-val-attacks pgd-10,apgd-ce --adv-val-examples 1000 \
    -- "$DATA" \
    --model nf_resnet50_nofrost --num-classes 1000 \
    --opt sgd --momentum 0.9 --lr-base 0.1 --weight-decay 5e-5 --sched cosine --epochs 90 \
    --smoothing 0.1 --drop 0.25 --drop-path 0.1 -b 64 \
    --eval-metric robust_top1_pgd-10 --output runs --experiment nofrost50
# summary.csv then holds eval_robust_top1_pgd-10, eval_robust_top1_apgd-ce and eval_robust_top1_worst per epoch;
# model_best.pth is the checkpoint with the best PGD-10 accuracy.
