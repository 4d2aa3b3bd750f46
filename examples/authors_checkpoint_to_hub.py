"""Turn the authors' NoFrost checkpoint into a Hub-ready folder and load it back the ways timm users do.

    python examples/authors_checkpoint_to_hub.py --checkpoint best_RA.pth --out exports/nofrost

Without ``--checkpoint`` a stand-in with random weights is written in the authors' format (a DDP
``module.``-prefixed state_dict saved with ``torch.save``), so the example runs offline anywhere.
"""
import argparse
from pathlib import Path

import timm
import torch

import timm_nofrost


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--checkpoint', type=Path, default=None, help="the authors' best_RA.pth / latest.pth")
    parser.add_argument('--model', default='nf_resnet50_nofrost.at_in1k', help='timm model name[.tag]')
    parser.add_argument('--out', type=Path, default=Path('exports/nofrost'), help='folder to write')
    args = parser.parse_args()

    arch = args.model.split('.')[0]
    checkpoint = args.checkpoint
    if checkpoint is None:
        checkpoint = args.out.parent / 'stand_in_best_RA.pth'
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        stand_in = timm.create_model(arch)
        torch.save({f'module.{k}': v for k, v in stand_in.state_dict().items()}, checkpoint)
        print(f'wrote a random stand-in checkpoint in the authors\' format: {checkpoint}')

    # 1. the authors' file, directly
    direct = timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=dict(file=str(checkpoint))).eval()

    # 2. export: model.safetensors + config.json + model card, verified on the way out
    result = timm_nofrost.export_checkpoint(checkpoint, args.out, model_name=args.model, overwrite=True)
    print(f'exported to {result.out_dir}: {", ".join(result.files)} (sha256 {result.sha256[:12]}...)')

    # 3. the exported folder, as timm reads it after `timm-nofrost push` (hf-hub:) or locally (local-dir:)
    exported = timm.create_model(f'local-dir:{args.out}', pretrained=True).eval()
    size = exported.pretrained_cfg['input_size']
    x = torch.rand(2, *size)
    with torch.no_grad():
        same = torch.equal(direct(x), exported(x))
    print(f'identical logits from the .pth and the exported folder: {same}')
    print(f'publish it with: timm-nofrost push {args.out} --repo-id {result.repo_id}')


if __name__ == '__main__':
    main()
