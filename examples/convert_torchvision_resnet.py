"""Convert a torchvision ResNet to normalizer-free, check its signal propagation, train it briefly, deploy it.

    python examples/convert_torchvision_resnet.py --steps 30

Runs offline on the CPU with a small synthetic task (dominant colour channel or stripes, 4 classes).
"""
import argparse

import torch
import torch.nn.functional as F
import torchvision

from timm_nofrost import convert_to_normfree, fuse_weight_standardization, signal_propagation


def synthetic_batch(n: int = 64, size: int = 32, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 4
    x = torch.rand(n, 3, size, size, generator=generator) * 0.3
    for i, label in enumerate(y.tolist()):
        if label < 3:
            x[i, label] += 0.5
        else:
            x[i, :, ::4] += 0.5
    return x, y


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--steps', type=int, default=30, help='SGD steps on the synthetic task')
    parser.add_argument('--init', choices=('keep', 'fresh'), default='keep', help='weight initialisation')
    args = parser.parse_args()

    torch.manual_seed(0)
    model = convert_to_normfree(torchvision.models.resnet18(num_classes=4), init=args.init)
    print(model.normfree_report.summary())

    stats = signal_propagation(model, torch.randn(4, 3, 64, 64))
    print('residual stream variance per block:', ' '.join(f'{s.var:.2f}' for s in stats))

    x, y = synthetic_batch()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for step in range(args.steps):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 10 == 0 or step == args.steps - 1:
            print(f'step {step:3d}  loss {loss.item():.4f}')

    model.eval()
    deployed = fuse_weight_standardization(model)
    with torch.no_grad():
        diff = (deployed(x) - model(x)).abs().max().item()
        accuracy = (deployed(x).argmax(1) == y).float().mean().item()
    print(f'fused for deployment: max |diff| {diff:.2e}, train accuracy {accuracy:.2%}')


if __name__ == '__main__':
    main()
