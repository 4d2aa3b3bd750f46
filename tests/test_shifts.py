"""Natural-shift evaluation (ImageNet-C/-R/-A/-Sketch) on tiny fake datasets with a scripted model."""
import json
from pathlib import Path
from typing import Dict, Sequence

import pytest
import torch
import torch.nn as nn
from PIL import Image
from torchvision import transforms

from timm_nofrost.evaluate.shifts import (
    ALEXNET_CORRUPTION_ERRORS, IMAGENET_A_WNIDS, IMAGENET_C_CORRUPTIONS, IMAGENET_R_WNIDS, SHIFT_BENCHMARKS,
    ShiftResult, corruption_errors, evaluate_shift, imagenet_wnids)

WNIDS = imagenet_wnids()
IDX = {w: i for i, w in enumerate(WNIDS)}
STEP = 8  # grey levels are multiples of STEP: robust to JPEG rounding
TF = transforms.Compose([transforms.ToTensor(), transforms.Resize((16, 16), antialias=True)])


class CodeModel(nn.Module):
    """Returns the logits scripted for the grey level ("code") of each input image."""

    def __init__(self, table: Dict[int, Dict[int, float]]) -> None:
        super().__init__()
        logits = torch.zeros(256 // STEP, 1000)
        for code, entries in table.items():
            for index, value in entries.items():
                logits[code, index] = value
        self.register_buffer('table', logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        code = (x.mean(dim=(1, 2, 3)) * 255 / STEP).round().long()
        return self.table[code]


def save_image(path: Path, code: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    level = code * STEP
    Image.new('RGB', (32, 32), (level, level, level)).save(path, quality=100)


def make_folder(root: Path, spec: Dict[str, Sequence[int]], ext: str = '.JPEG') -> Path:
    """``root/<wnid>/img_<k><ext>`` with the given codes, in sorted file order."""
    for wnid, codes in spec.items():
        for k, code in enumerate(codes):
            save_image(root / wnid / f'img_{k:03d}{ext}', code)
    return root


def test_embedded_class_lists() -> None:
    assert len(WNIDS) == 1000 and list(WNIDS) == sorted(WNIDS)
    for subset in (IMAGENET_R_WNIDS, IMAGENET_A_WNIDS):
        assert len(subset) == len(set(subset)) == 200
        assert list(subset) == sorted(subset) and set(subset) <= set(WNIDS)
    # published facts: ImageNet-A starts at 1k index 6 (stingray); ImageNet-R at 1 (goldfish)
    assert IDX[IMAGENET_A_WNIDS[0]] == 6 and IDX[IMAGENET_R_WNIDS[0]] == 1
    assert len(set(IMAGENET_A_WNIDS) & set(IMAGENET_R_WNIDS)) == 86
    assert SHIFT_BENCHMARKS == ('imagenet-c', 'imagenet-r', 'imagenet-a', 'imagenet-sketch')


def test_imagenet_r_masks_logits_to_its_200_classes(tmp_path: Path) -> None:
    r0, r1, r2 = IMAGENET_R_WNIDS[0], IMAGENET_R_WNIDS[50], IMAGENET_R_WNIDS[199]
    outside = 0  # tench: not an ImageNet-R class
    assert WNIDS[outside] not in IMAGENET_R_WNIDS
    model = CodeModel({
        1: {outside: 9.0, IDX[r0]: 5.0},   # top-1 outside the subset, runner-up right -> correct
        2: {outside: 9.0, IDX[r2]: 5.0},   # runner-up is another R class -> wrong for an r1 image
        3: {IDX[r1]: 3.0},                 # plainly right for r1
        4: {IDX[r2]: 1.0, IDX[r0]: 0.5},   # plainly right for r2
    })
    root = make_folder(tmp_path / 'imagenet-r', {r0: [1, 1], r1: [2, 3], r2: [4]}, ext='.jpg')
    res = evaluate_shift(model, 'imagenet-r', root, transform=TF, batch_size=2, progress=False)
    assert isinstance(res, ShiftResult) and res.benchmark == 'imagenet-r'
    assert res.n_examples == 5
    assert res.top1 == pytest.approx(100.0 * 4 / 5)
    assert res.details['n_correct'] == 4 and res.details['logits_masked'] is True
    assert res.details['n_classes'] == 3 and res.details['class_subset_size'] == 200
    # without the mask (plain top-1, as for ImageNet-Sketch) the two "outside" wins count as errors
    plain = evaluate_shift(model, 'imagenet-sketch', root, transform=TF, progress=False)
    assert plain.top1 == pytest.approx(100.0 * 2 / 5) and plain.details['logits_masked'] is False


def test_imagenet_a_uses_its_own_subset(tmp_path: Path) -> None:
    a_only = next(w for w in IMAGENET_A_WNIDS if w not in IMAGENET_R_WNIDS)
    r_only = next(w for w in IMAGENET_R_WNIDS if w not in IMAGENET_A_WNIDS)
    # the highest logit goes to an R-only class, which the ImageNet-A mask removes
    model = CodeModel({1: {IDX[r_only]: 9.0, IDX[a_only]: 2.0}})
    root = make_folder(tmp_path / 'imagenet-a', {a_only: [1, 1, 1]}, ext='.jpg')
    (root / 'README.txt').write_text('the published tarball ships a README at the root')
    res = evaluate_shift(model, 'imagenet_a', root, transform=TF, progress=False)
    assert res.benchmark == 'imagenet-a' and res.top1 == pytest.approx(100.0) and res.n_examples == 3
    # the same folder scored as ImageNet-R: a_only is not an R class -> clear error naming it
    with pytest.raises(ValueError, match=a_only):
        evaluate_shift(model, 'imagenet-r', root, transform=TF, progress=False)
    # under the ImageNet-R mask the same model's R-only prediction is kept (right for an r_only image)
    r_root = make_folder(tmp_path / 'r', {r_only: [1]}, ext='.jpg')
    assert evaluate_shift(model, 'imagenet-r', r_root, transform=TF, progress=False).top1 == 100.0


def test_imagenet_sketch_labels_follow_imagenet_order_and_subsampling(tmp_path: Path) -> None:
    # three far-apart classes: sorted-folder indices would be 0, 1, 2 -- the labels must be 1k indices
    w_a, w_b, w_c = WNIDS[17], WNIDS[512], WNIDS[999]
    model = CodeModel({1: {IDX[w_a]: 1.0}, 2: {IDX[w_b]: 1.0}, 3: {IDX[w_c]: 1.0}, 4: {0: 1.0}, 5: {1: 1.0}})
    # per class: first two sorted files right, later ones wrong
    root = make_folder(tmp_path / 'sketch', {w_a: [1, 1, 4, 4], w_b: [2, 2, 5], w_c: [3, 3, 4, 5, 4]}, ext='.png')
    (root / w_b / 'notes.txt').write_text('not an image')
    (root / '.cache').mkdir()
    full = evaluate_shift(model, 'imagenet-sketch', root, transform=TF, batch_size=3, progress=False)
    assert full.n_examples == 12 and full.top1 == pytest.approx(100.0 * 6 / 12)
    assert full.details['n_classes'] == 3 and full.details['class_subset_size'] == 1000
    sub = evaluate_shift(model, 'imagenet-sketch', root, transform=TF, max_per_class=2, progress=False)
    assert sub.n_examples == 6 and sub.top1 == pytest.approx(100.0)
    sub3 = evaluate_shift(model, 'imagenet-sketch', root, transform=TF, max_per_class=3, progress=True)
    assert sub3.n_examples == 9 and sub3.top1 == pytest.approx(100.0 * 6 / 9)


def make_imagenet_c(root: Path, outcomes: Dict[str, Sequence[Sequence[bool]]]) -> Path:
    """Two classes per corruption/severity; ``outcomes[c][s-1]`` says which images the model gets right."""
    classes = (WNIDS[10], WNIDS[600])
    for c, per_sev in outcomes.items():
        for s, rights in enumerate(per_sev, start=1):
            for wnid, right in zip(classes, rights):
                code = (1 if wnid == classes[0] else 2) if right else 3
                save_image(root / c / str(s) / wnid / f'ILSVRC2012_val_{s:08d}.JPEG', code)
    return root


def c_model() -> CodeModel:
    return CodeModel({1: {10: 1.0}, 2: {600: 1.0}, 3: {42: 1.0}})


def test_imagenet_c_accuracy_ce_and_mce(tmp_path: Path) -> None:
    T, F = True, False
    # per-severity errors: gaussian_noise 0, .5, .5, 1, 1 (mean .6); fog .5, 0, 0, 0, .5 (mean .2)
    outcomes = {
        'gaussian_noise': [(T, T), (T, F), (F, T), (F, F), (F, F)],
        'fog': [(T, F), (T, T), (T, T), (T, T), (F, T)],
    }
    root = make_imagenet_c(tmp_path / 'imagenet-c', outcomes)
    res = evaluate_shift(c_model(), 'imagenet-c', root, transform=TF, corruptions=['gaussian_noise', 'fog'],
                         batch_size=4, progress=False)
    d = res.details
    assert res.benchmark == 'imagenet-c' and res.n_examples == 20
    assert d['accuracy']['gaussian_noise'] == {1: 100.0, 2: 50.0, 3: 50.0, 4: 0.0, 5: 0.0}
    assert d['accuracy']['fog'] == {1: 50.0, 2: 100.0, 3: 100.0, 4: 100.0, 5: 50.0}
    assert d['mean_accuracy'] == {'gaussian_noise': pytest.approx(40.0), 'fog': pytest.approx(80.0)}
    # hand computation with the published AlexNet errors: 60 / 0.886428 and 20 / 0.819324
    assert d['corruption_error']['gaussian_noise'] == pytest.approx(67.687393, abs=1e-5)
    assert d['corruption_error']['fog'] == pytest.approx(24.410368, abs=1e-5)
    assert d['mce'] == pytest.approx((67.687393 + 24.410368) / 2, abs=1e-5)
    assert res.top1 == pytest.approx(60.0) and d['mean_error_unnormalized'] == pytest.approx(40.0)
    assert d['mce_standard'] is False and d['severities'] == [1, 2, 3, 4, 5]
    assert d['n_examples_per_severity']['fog'][3] == 2
    json.dumps(res.to_dict())  # serialisable

    # a severity subset: averages over the severities evaluated
    sub = evaluate_shift(c_model(), 'imagenet-c', root, transform=TF, corruptions=['fog'], severities=(2, 5),
                         progress=False)
    assert sub.n_examples == 4 and sub.top1 == pytest.approx(75.0)
    assert sub.details['mce'] == pytest.approx(100 * 0.25 / 0.819324)


def test_corruption_errors_formula() -> None:
    # a model exactly as bad as AlexNet everywhere has CE 100 and mCE 100
    ces, mce = corruption_errors({c: [ALEXNET_CORRUPTION_ERRORS[c]] * 5 for c in IMAGENET_C_CORRUPTIONS})
    assert set(ces) == set(IMAGENET_C_CORRUPTIONS) and mce == pytest.approx(100.0)
    assert all(v == pytest.approx(100.0) for v in ces.values())
    # sum_s E_s / sum_s E^AlexNet_s, written out for brightness: errors .1 .2 .3 .4 .5 -> 1.5 / (5 * .564592)
    ces, mce = corruption_errors({'brightness': [0.1, 0.2, 0.3, 0.4, 0.5], 'contrast': 0.853204 / 2})
    assert ces['brightness'] == pytest.approx(100 * 1.5 / 2.82296)
    assert ces['contrast'] == pytest.approx(50.0)
    assert mce == pytest.approx((100 * 1.5 / 2.82296 + 50.0) / 2)
    assert len(ALEXNET_CORRUPTION_ERRORS) == 15
    with pytest.raises(ValueError, match='speckle_noise'):
        corruption_errors({'speckle_noise': 0.5})
    with pytest.raises(ValueError, match=r'\[0, 1\]'):
        corruption_errors({'fog': 45.0})


def test_imagenet_c_missing_folders(tmp_path: Path) -> None:
    T = True
    root = make_imagenet_c(tmp_path / 'imagenet-c', {'gaussian_noise': [(T, T)] * 5})
    with pytest.raises(FileNotFoundError, match='shot_noise') as err:
        evaluate_shift(c_model(), 'imagenet-c', root, transform=TF, progress=False)
    assert '<corruption>/<severity 1..5>/<wnid>' in str(err.value)
    make_imagenet_c(tmp_path / 'partial', {'fog': [(T, T)] * 3})
    with pytest.raises(FileNotFoundError, match=r'fog.4'):
        evaluate_shift(c_model(), 'imagenet-c', tmp_path / 'partial', transform=TF, corruptions=['fog'],
                       progress=False)
    with pytest.raises(ValueError, match='not_a_corruption'):
        evaluate_shift(c_model(), 'imagenet-c', root, transform=TF, corruptions=['not_a_corruption'])
    with pytest.raises(ValueError, match='severities'):
        evaluate_shift(c_model(), 'imagenet-c', root, transform=TF, severities=(0, 6))


def test_bad_roots_and_names(tmp_path: Path) -> None:
    model = c_model()
    with pytest.raises(ValueError, match='imagenet-sketch') as err:
        evaluate_shift(model, 'imagenet-v2', tmp_path, transform=TF)
    assert all(name in str(err.value) for name in SHIFT_BENCHMARKS)
    missing = tmp_path / 'nowhere'
    with pytest.raises(FileNotFoundError, match='nowhere') as err:
        evaluate_shift(model, 'imagenet-r', missing, transform=TF)
    assert 'ROOT/<wnid>/<image>' in str(err.value)
    empty = tmp_path / 'empty'
    empty.mkdir()
    with pytest.raises(ValueError, match='empty'):
        evaluate_shift(model, 'imagenet-sketch', empty, transform=TF)
    with pytest.raises(FileNotFoundError, match='empty'):
        evaluate_shift(model, 'imagenet-c', empty, transform=TF, corruptions=['fog'])
    bad = make_folder(tmp_path / 'bad', {WNIDS[3]: [1], 'cats': [1]}, ext='.png')
    with pytest.raises(ValueError, match="'cats' is not an ImageNet-1k wnid"):
        evaluate_shift(model, 'imagenet-sketch', bad, transform=TF)
    no_images = tmp_path / 'no_images' / WNIDS[3]
    no_images.mkdir(parents=True)
    (no_images / 'readme.txt').write_text('x')
    with pytest.raises(ValueError, match='no images'):
        evaluate_shift(model, 'imagenet-sketch', no_images.parent, transform=TF)


def test_model_output_checked_and_mode_restored(tmp_path: Path) -> None:
    root = make_folder(tmp_path / 's', {WNIDS[5]: [1]}, ext='.png')
    with pytest.raises(ValueError, match='1000'):
        evaluate_shift(nn.Sequential(nn.Flatten(), nn.LazyLinear(10)), 'imagenet-sketch', root, transform=TF)
    model = CodeModel({1: {5: 1.0}}).train()
    assert evaluate_shift(model, 'imagenet-sketch', root, transform=TF, progress=False).top1 == 100.0
    assert model.training


def test_default_transform_from_model_config(tmp_path: Path) -> None:
    # timm's eval transform is resolved from the model's pretrained_cfg (identity normalisation here)
    model = CodeModel({1: {IDX[WNIDS[7]]: 1.0}})
    model.pretrained_cfg = dict(input_size=(3, 24, 24), crop_pct=1.0, interpolation='bilinear',
                                mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    seen = []
    model.register_forward_pre_hook(lambda mod, args: seen.append(tuple(args[0].shape[1:])))
    root = make_folder(tmp_path / 's', {WNIDS[7]: [1, 1]}, ext='.png')
    res = evaluate_shift(model, 'imagenet-sketch', root, progress=False)
    assert res.top1 == 100.0 and seen == [(3, 24, 24)]
