#!/usr/bin/env bash
# Train on an ImageFolder, then evaluate the result with stronger attacks.
#
#   bash examples/train_imagefolder.sh [IMAGE_ROOT]
#
# IMAGE_ROOT holds ROOT/train/<class>/<image> and ROOT/val/<class>/<image> (or just ROOT/<class>/<image>:
# a fixed 10 % is then held out). Without an argument, the embedded demo shapes are written as an ImageFolder
# first, so the script runs offline on a CPU in a few minutes.
set -euo pipefail
ROOT=${1:-}
if [[ -z "$ROOT" ]]; then
    ROOT=$(mktemp -d)/shapes
    python -c "from timm_nofrost.data import write_image_folder as w; w('$ROOT/train', 'train'); w('$ROOT/val', 'val')"
fi
OUT=runs/imagefolder-nofrost

timm-nofrost train --data "$ROOT" --model nf_resnet18_cifar_nofrost --img-size 32 --epochs 4 -b 64 \
    --opt adamw --lr 3e-3 --adv-steps 3 \
    --model-kwargs '{"channels": [16, 32, 64, 128], "stem_chs": 16, "drop_rate": 0.0, "drop_path_rate": 0.0}' \
    --out "$OUT" --overwrite

# PGD alone overstates robustness: re-evaluate the best checkpoint with APGD-CE and APGD-T, with sanity checks
timm-nofrost eval --model nf_resnet18_cifar_nofrost --num-classes 5 \
    --model-kwargs '{"channels": [16, 32, 64, 128], "stem_chs": 16}' \
    --checkpoint "$OUT/model_best.pth" --data "$ROOT" --attacks clean,pgd-20,apgd-ce,apgd-t \
    --eps 8/255,16/255 --n-examples 128 --no-progress --markdown "$OUT/eval.md" --out "$OUT/eval.json"
cat "$OUT/eval.md"
