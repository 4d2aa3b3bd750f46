"""The evaluation harness: ImageFolder data, fixed subsets, per-example worst case, reports, flags, CLI."""
import json

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

import timm_nofrost.evaluate.sanity as sanity_module
from timm_nofrost.attacks import PGD, AttackResult
from timm_nofrost.cli import main
from timm_nofrost.evaluate import WORST_CASE, evaluate, margin_and_smoothness
from timm_nofrost.attacks import PixelModel

from tiny_models import eval_data, faint_colors, trained_tiny_cnn


def _write_folder(root, n=48, classes=4, seed=3):
    x, y = faint_colors(n=n, seed=seed)
    for i, (img, label) in enumerate(zip(x, y.tolist())):
        if label >= classes:
            continue
        folder = root / f'class_{label}'
        folder.mkdir(parents=True, exist_ok=True)
        array = (img.permute(1, 2, 0).numpy() * 255).round().astype('uint8')
        Image.fromarray(array).save(folder / f'{i:04d}.png')
    return root


@pytest.fixture(scope='module')
def image_folder(tmp_path_factory):
    return _write_folder(tmp_path_factory.mktemp('images'))


@pytest.fixture(scope='module')
def report(image_folder):
    return evaluate(trained_tiny_cnn(), image_folder, attacks='clean,fgsm,pgd-10,apgd-ce-20',
                    eps='2/255,4/255,8/255', n_examples=40, batch_size=16, progress=False)


def test_report_accuracies(report):
    assert report.n_examples == 40 and report.clean_accuracy == 1.0
    assert report.attacks == ['fgsm', 'pgd-10', 'apgd-ce-20']
    assert list(report.accuracy) == ['2/255', '4/255', '8/255']
    for label, accs in report.accuracy.items():
        assert accs[WORST_CASE] <= min(accs[a] for a in report.attacks)
        assert accs['apgd-ce-20'] <= accs['fgsm']
        # per-example worst case is the AND of the per-example results
        per = report.per_example[label]
        worst = [int(all(per[a][i] for a in report.attacks)) for i in range(40)]
        assert per[WORST_CASE] == worst and sum(worst) / 40 == accs[WORST_CASE]
    assert report.accuracy['8/255'][WORST_CASE] == 0.0  # undefended model at a moderate eps


def test_subset_is_fixed_and_recorded(image_folder, report):
    assert report.subset['kind'] == 'seeded-random' and report.subset['seed'] == 0
    assert len(report.subset['indices']) == 40 and report.subset['indices'] == sorted(report.subset['indices'])
    again = evaluate(trained_tiny_cnn(), image_folder, attacks='clean', eps='2/255', n_examples=40,
                     progress=False, sanity=False)
    assert again.subset['indices'] == report.subset['indices']


def test_subset_id_list(image_folder, tmp_path):
    ids = tmp_path / 'ids.txt'
    ids.write_text('class_1/0001.png\nclass_2/0002.png\n# comment\nclass_0/0004.png\n')
    rep = evaluate(trained_tiny_cnn(), image_folder, attacks='clean', eps='2/255', subset_ids=ids,
                   progress=False, sanity=False)
    assert rep.n_examples == 3 and rep.subset['kind'] == 'id-list' and len(rep.subset['sha256']) == 64
    ids.write_text('class_1/9999.png\n')
    with pytest.raises(ValueError, match='1 subset id'):
        evaluate(trained_tiny_cnn(), image_folder, attacks='clean', subset_ids=ids, progress=False)


def test_sanity_flags_pass_on_a_healthy_model(report):
    names = [f['name'] for f in report.sanity]
    assert names == ['accuracy non-increasing in eps', 'input gradients are non-zero', 'near 0 % at a very large eps',
                     'PGD not weaker than FGSM', 'more steps do not raise accuracy', 'deterministic for a seed']
    assert all(f['ok'] for f in report.sanity), report.sanity


def test_json_markdown_and_plot(report, tmp_path):
    data = json.loads(report.save_json(tmp_path / 'r.json').read_text())
    assert data['accuracy']['4/255']['pgd-10'] == report.accuracy['4/255']['pgd-10']
    md = report.to_markdown()
    assert '| attack | eps 2/255 | eps 4/255 | eps 8/255 |' in md and '**worst-case**' in md
    assert 'Only weak attacks' not in md  # APGD was run
    png = report.plot(tmp_path / 'plot.png')
    assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n' and png.stat().st_size > 5000


class _Quantised(torch.nn.Module):
    """Gradient masking: rounding makes every input gradient zero."""

    def __init__(self):
        super().__init__()
        self.inner = trained_tiny_cnn()
        self.pretrained_cfg = self.inner.pretrained_cfg

    def forward(self, x):
        return self.inner(torch.round(x * 4) / 4)


class _Noisy(torch.nn.Module):
    """A randomised 'defence': fresh noise at every forward makes results irreproducible."""

    def __init__(self):
        super().__init__()
        self.inner = trained_tiny_cnn()
        self.pretrained_cfg = self.inner.pretrained_cfg

    def forward(self, x):
        return self.inner(x + 0.5 * torch.randn_like(x))


def _flags(model, **kwargs):
    x, y = eval_data(32)
    rep = evaluate(model, DataLoader(TensorDataset(x, y), batch_size=32), attacks='fgsm,pgd-5',
                   eps=kwargs.pop('eps', '4/255'), progress=False, **kwargs)
    return {f['name']: f['ok'] for f in rep.sanity}


def test_flags_gradient_masking():
    flags = _flags(_Quantised())
    assert not flags['input gradients are non-zero'] and not flags['near 0 % at a very large eps']


def test_flags_randomness():
    assert not _flags(_Noisy())['deterministic for a seed']


def test_flags_weak_iterative_attack(monkeypatch):
    """A PGD that does nothing is caught by the FGSM comparison."""
    class _LazyPGD(PGD):
        def perturb(self, x, y, target, active):
            return x.clone(), 0.0
    monkeypatch.setattr(sanity_module, 'PGD', _LazyPGD)
    flags = _flags(trained_tiny_cnn())
    assert not flags['PGD not weaker than FGSM'] and not flags['near 0 % at a very large eps']


def test_flags_more_steps_and_monotonicity(monkeypatch):
    calls = []

    class _Erratic(PGD):
        """Worse with more steps, and (in the main run) better at larger eps."""

        def _call(self, x, y, target, mask=None):
            calls.append(self.steps)
            correct = torch.ones_like(y, dtype=torch.bool) if self.steps > 5 or self.eps > 3 / 255 else \
                torch.zeros_like(y, dtype=torch.bool)
            return AttackResult(x_adv=x, logits=torch.zeros(len(y), 4), correct=correct)
    monkeypatch.setattr(sanity_module, 'PGD', _Erratic)
    import timm_nofrost.attacks.spec as spec
    monkeypatch.setattr(spec, 'PGD', _Erratic)
    flags = _flags(trained_tiny_cnn(), eps='2/255,4/255')
    assert not flags['more steps do not raise accuracy'] and not flags['accuracy non-increasing in eps']


def test_margin_and_smoothness():
    x, y = eval_data(32)
    stats = margin_and_smoothness(PixelModel.from_model(trained_tiny_cnn()), x, y, 4 / 255)
    assert 0 < stats['decision_margin_mean'] < 16 / 255 and stats['robust_beyond_search_max'] == 0
    assert stats['loss_increase_mean'] > 0 and stats['input_grad_dual_norm_mean'] > 0


@pytest.mark.parametrize('kwargs,error,match', [
    (dict(attacks='clean,pgd-ten'), ValueError, "Unknown attack 'pgd-ten'"),
    (dict(eps='8/2x5'), ValueError, 'Invalid eps'),
    (dict(eps='2'), ValueError, 'above 1'),
    (dict(n_examples=0), ValueError, 'n_examples must be a positive integer'),
    (dict(norm='L1'), ValueError, "Unknown norm 'L1'"),
])
def test_bad_arguments(image_folder, kwargs, error, match):
    with pytest.raises(error, match=match):
        evaluate(trained_tiny_cnn(), image_folder, progress=False, **kwargs)


def test_bad_data(tmp_path):
    model = trained_tiny_cnn()
    with pytest.raises(FileNotFoundError, match='Dataset folder not found'):
        evaluate(model, tmp_path / 'missing', progress=False)
    (tmp_path / 'empty').mkdir()
    with pytest.raises((ValueError, RuntimeError), match='(?i)empty|no images|found 0'):
        evaluate(model, tmp_path / 'empty', progress=False)
    too_many = _write_folder(tmp_path / 'five', n=10, classes=4)
    (too_many / 'class_9').mkdir()
    Image.new('RGB', (16, 16)).save(too_many / 'class_9' / 'x.png')
    (too_many / 'class_8').mkdir()
    Image.new('RGB', (16, 16)).save(too_many / 'class_8' / 'x.png')
    with pytest.raises(ValueError, match=r'Labels must lie in \[0, 3\]'):
        evaluate(model, too_many, attacks='clean', progress=False)
    x, y = eval_data(8)
    normalised = DataLoader(TensorDataset((x - 0.5) / 0.25, y), batch_size=8)
    with pytest.raises(ValueError, match=r'pixels in \[0, 1\]'):
        evaluate(model, normalised, progress=False)


def test_eval_cli(tmp_path, capsys):
    import timm
    folder = _write_folder(tmp_path / 'data', n=16, classes=4)
    model = timm.create_model('nf_resnet18_cifar_nofrost', num_classes=4, channels=(8, 16, 32, 64), stem_chs=8)
    from timm_nofrost import export_checkpoint
    ckpt = tmp_path / 'w.pth'
    torch.save(model.state_dict(), ckpt)
    export_checkpoint(ckpt, tmp_path / 'exp', model_name='nf_resnet18_cifar_nofrost',
                      model_kwargs=dict(channels=(8, 16, 32, 64), stem_chs=8))
    out = tmp_path / 'report.json'
    code = main(['eval', '--model', f'local-dir:{tmp_path / "exp"}', '--pretrained', '--data', str(folder),
                 '--attacks', 'clean,fgsm,pgd-3', '--eps', '2/255,4/255', '--batch-size', '8', '--no-progress',
                 '--out', str(out), '--plot', str(tmp_path / 'p.png'), '--markdown', str(tmp_path / 'r.md')])
    assert code == 0
    text = capsys.readouterr().out
    assert '| attack | eps 2/255 | eps 4/255 |' in text and '### Sanity checks' in text
    assert 'Only weak attacks were run' in text  # no APGD / AutoAttack requested
    saved = json.loads(out.read_text())
    assert saved['n_examples'] == 16 and saved['attacks'] == ['fgsm', 'pgd-3']
    assert (tmp_path / 'p.png').exists() and (tmp_path / 'r.md').read_text().startswith('## Robust accuracy')
    assert main(['eval', '--model', 'nf_resnet18_cifar_nofrost', '--data', str(folder), '--attacks', 'cw']) == 2
    assert "Unknown attack 'cw'" in capsys.readouterr().err


def test_shift_cli(tmp_path, capsys):
    import timm
    from timm_nofrost import export_checkpoint
    small = dict(channels=(8, 16, 32, 64), stem_chs=8)
    model = timm.create_model('nf_resnet18_nofrost', **small)
    with torch.no_grad():  # a known answer: the logits are the bias, every image is called ImageNet class 10
        model.get_classifier().weight.zero_()
        model.get_classifier().bias.copy_(torch.nn.functional.one_hot(torch.tensor(10), 1000).float())
    ckpt = tmp_path / 'w.pth'
    torch.save(model.state_dict(), ckpt)
    export_checkpoint(ckpt, tmp_path / 'exp', model_name='nf_resnet18_nofrost', model_kwargs=small)
    root = tmp_path / 'sketch'
    # class 0 (1 image) and class 10 (3 images): the second folder in sorted order, ImageNet-1k index 10
    for wnid, n in (('n01440764', 1), ('n01530575', 3)):
        (root / wnid).mkdir(parents=True)
        for i in range(n):
            Image.new('RGB', (40, 40), color=(60 * i, 90, 120)).save(root / wnid / f'{i}.JPEG')
    assert main(['shift', '--model', f'local-dir:{tmp_path / "exp"}', '--pretrained', '--benchmark',
                 'imagenet-sketch', '--root', str(root), '--json']) == 0
    result = json.loads(capsys.readouterr().out)
    # the exported weights were loaded and the folders scored by their ImageNet-1k index: 3 of the 4 images
    assert result['benchmark'] == 'imagenet-sketch' and result['n_examples'] == 4 and result['top1'] == 75.0
    assert main(['shift', '--model', 'nf_resnet18_nofrost', '--benchmark', 'imagenet-r',
                 '--root', str(tmp_path / 'nope')]) == 2
    assert 'nope' in capsys.readouterr().err


def test_a_ready_eval_set_refuses_a_selection_it_would_ignore():
    """``evaluate(model, eval_set, n_examples=8)`` must not evaluate all of eval_set while saying nothing."""
    import torch
    from torch.utils.data import TensorDataset
    from timm_nofrost.evaluate import build_eval_set
    eval_set = build_eval_set(TensorDataset(torch.rand(4, 3, 8, 8), torch.zeros(4, dtype=torch.long)), source='x')
    assert build_eval_set(eval_set) is eval_set
    with pytest.raises(ValueError, match=r"\['mean', 'n_examples'\] choose the images"):
        build_eval_set(eval_set, n_examples=2, mean=(0, 0, 0))
