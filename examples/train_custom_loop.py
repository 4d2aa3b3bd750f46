"""Adversarial training with ``AdversarialTrainer`` in your own loop, then an honest robustness check.

    python examples/train_custom_loop.py --steps 60

Runs offline on the CPU: a narrow NoFrost ResNet-18 (CIFAR stem) learns a small synthetic task (a dominant
colour channel or stripes, 4 classes) with the NoFrost recipe (PGD at L-inf 8/255, lambda 0.5, label
smoothing 0.1), then reports clean, PGD-20 and APGD-CE accuracy of the trained model.
"""
import argparse

import timm
import torch

import timm_nofrost  # noqa: F401  registers the NoFrost models
from timm_nofrost import AdversarialTrainer, normalize
from timm_nofrost.attacks import APGD, PGD


def synthetic_batch(n: int, size: int = 32, seed: int = 0):
    """Pixels in [0, 1] and labels: 3 colour classes and one stripes class."""
    generator = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 4
    x = 0.3 + torch.rand(n, 3, size, size, generator=generator) * 0.4
    for i, label in enumerate(y.tolist()):
        if label < 3:
            x[i, label] += 0.12
        else:
            x[i, :, ::4] += 0.12
    return x.clamp(0, 1), y


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--steps', type=int, default=60, help='optimizer steps (default: %(default)s)')
    parser.add_argument('--batch-size', type=int, default=32, help='images per step (default: %(default)s)')
    parser.add_argument('--attack-steps', type=int, default=3, help='PGD steps per batch (default: %(default)s)')
    args = parser.parse_args()

    torch.manual_seed(0)
    model = timm.create_model('nf_resnet18_cifar_nofrost', num_classes=4, channels=(16, 32, 64, 128), stem_chs=16)
    # the loop below feeds normalised images, as timm's loaders do; the attack works in pixel space inside
    task = AdversarialTrainer(model, steps=args.attack_steps, eps='8/255')
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-5)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.steps)

    for step in range(args.steps):
        pixels, labels = synthetic_batch(args.batch_size, seed=step)
        model.train()
        result = task(normalize(pixels, task.mean, task.std), labels)
        optimizer.zero_grad()
        result['loss'].backward()
        optimizer.step()
        scheduler.step()
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:3d}  loss {result['loss'].item():.3f}  clean loss {result['loss_clean'].item():.3f}"
                  f"  adv loss {result['loss_adv'].item():.3f}  batch adv acc {result['acc_adv'].item():.0%}")

    model.eval()
    pixels, labels = synthetic_batch(128, seed=10_000)  # held-out images
    with torch.no_grad():
        clean = (model(normalize(pixels, task.mean, task.std)).argmax(1) == labels).float().mean().item()
    pgd = PGD(model, eps='8/255', steps=20)(pixels, labels).accuracy
    apgd = APGD(model, eps='8/255', steps=20)(pixels, labels).accuracy
    print(f'held-out accuracy: clean {clean:.1%}, PGD-20 {pgd:.1%}, APGD-CE-20 {apgd:.1%} (L-inf 8/255)')


if __name__ == '__main__':
    main()
