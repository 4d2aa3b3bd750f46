"""Convert a torchvision ResNet to normalizer-free and train it adversarially with ``timm-nofrost train``'s loop.

    python examples/convert_and_train.py --epochs 4

Runs offline on the CPU on the embedded demo shapes (32 px). The same ``train(cfg, model=...)`` call takes any
model: a converted timm / torchvision / custom ResNet, or your own normalizer-free network. The BatchNorm
original trained the same way (BN-AT, two forwards with shared BatchNorm) is printed alongside.
"""
import argparse

import torch
import torchvision

from timm_nofrost import convert_to_normfree
from timm_nofrost.training.run import TrainConfig, final_table, train


def resnet18(num_classes: int) -> torch.nn.Module:
    """torchvision's ResNet-18 as it is (its stride-4 stem makes 32 px images cheap on a CPU)."""
    return torchvision.models.resnet18(num_classes=num_classes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--epochs', type=int, default=4, help='epochs per model (default: %(default)s)')
    parser.add_argument('--out', default='runs/convert-and-train', help='output folder (default: %(default)s)')
    args = parser.parse_args()

    torch.manual_seed(0)
    converted = convert_to_normfree(resnet18(5), init='fresh')
    print(converted.normfree_report.summary())
    runs = {}
    for name, model in (('torchvision resnet18, converted (NoFrost)', converted),
                        ('torchvision resnet18 with BatchNorm (BN-AT)', resnet18(5))):
        cfg = TrainConfig(data='demo', model=name, epochs=args.epochs, batch_size=64, opt='adamw', lr=3e-3,
                          out_dir=f'{args.out}/{"nf" if "converted" in name else "bn"}', overwrite=True,
                          progress=False)
        runs[name] = train(cfg, model=model)['runs']['nofrost']
        runs[name]['name'] = name
    print(final_table({'config': {'adv': {'eps': 8 / 255, 'norm': 'Linf'}}, 'runs': runs}))


if __name__ == '__main__':
    main()
