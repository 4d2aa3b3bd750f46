"""timm_nofrost.pixels: explicit normalisation (no silent ImageNet default), pixel conversions, AMP names."""
import ast
import copy
import functools
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

import timm_nofrost
from timm_nofrost import AdversarialConfig, AdversarialTrainer
from timm_nofrost.attacks import APGD, PGD
from timm_nofrost.pixels import (
    AMP_DTYPES, PixelModel, amp_dtype, denormalize, normalize, resolve_mean_std, to_float_pixels, unwrap_model)

from tiny_models import MEAN, STD, TinyCNN, eval_data, faint_colors, trained_tiny_cnn

HINT = 'mean=(0, 0, 0), std=(1, 1, 1)'
IDENTITY = dict(mean=(0, 0, 0), std=(1, 1, 1))


def plain(model: nn.Module) -> nn.Module:
    """A copy without ``pretrained_cfg``: what a torchvision model or a custom module looks like."""
    model = copy.deepcopy(model)
    del model.pretrained_cfg
    return model


@functools.lru_cache(maxsize=None)
def pixel_cnn() -> nn.Module:
    """The torchattacks user's model: a small CNN trained on [0, 1] pixels, with no normalisation anywhere."""
    torch.manual_seed(0)
    model = plain(TinyCNN())
    x, y = faint_colors(n=512, seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(80):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


# -- resolve_mean_std -------------------------------------------------------------------------------------------
def test_explicit_values_win_then_the_pretrained_cfg():
    model = TinyCNN()
    assert resolve_mean_std(model) == (MEAN, STD)
    assert resolve_mean_std(model, (0, 0, 0), (1, 1, 1)) == ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    assert resolve_mean_std(model, mean=(0.1, 0.2, 0.3)) == ((0.1, 0.2, 0.3), STD)  # std from the cfg
    assert resolve_mean_std(plain(model), torch.tensor(MEAN), [0.25] * 3) == (MEAN, STD)
    assert resolve_mean_std(PixelModel(plain(model), MEAN, STD)) == (MEAN, STD)


@pytest.mark.parametrize('wrap', [nn.DataParallel, torch.compile], ids=['DataParallel', 'compile'])
def test_the_pretrained_cfg_is_read_under_wrappers(wrap):
    model = TinyCNN()
    wrapped = wrap(model)
    assert unwrap_model(wrapped) is model
    assert resolve_mean_std(wrapped) == (MEAN, STD)


def test_no_silent_imagenet_default():
    with pytest.raises(ValueError, match=r'TinyCNN .*mean=\(0, 0, 0\), std=\(1, 1, 1\)') as info:
        resolve_mean_std(plain(TinyCNN()))
    assert 'mean and std' in str(info.value)
    with pytest.raises(ValueError, match='no timm pretrained_cfg with std'):
        resolve_mean_std(plain(TinyCNN()), mean=(0, 0, 0))


@pytest.mark.parametrize('mean, std, message', [
    ((0, 0, 0), (1, 1), 'one value per channel'),
    ((0, 0, 0), (1, 0, 1), 'std must be > 0'),
    ((0, 0, 0), (1, -1, 1), 'std must be > 0'),
    ((), (), 'non-empty'),
    ((0, float('nan'), 0), (1, 1, 1), 'finite'),
    ('abc', (1, 1, 1), 'sequence of numbers'),
])
def test_bad_mean_std(mean, std, message):
    with pytest.raises(ValueError, match=message):
        resolve_mean_std(None, mean, std)
    with pytest.raises(ValueError, match=message):
        PixelModel(TinyCNN(), mean, std)


# -- every entry point refuses a model of unknown normalisation -------------------------------------------------
def test_attacks_refuse_a_plain_module():
    for make in (lambda m: PGD(m, steps=2), lambda m: APGD(m, steps=2)):
        with pytest.raises(ValueError, match=HINT.replace('(', r'\(').replace(')', r'\)')):
            make(plain(TinyCNN()))


def test_pixel_model_from_model_refuses_a_plain_module():
    with pytest.raises(ValueError, match=r'mean=\(0, 0, 0\), std=\(1, 1, 1\)'):
        PixelModel.from_model(plain(TinyCNN()))
    wrapped = PixelModel.from_model(plain(TinyCNN()), **IDENTITY)
    assert wrapped.mean.flatten().tolist() == [0, 0, 0] and wrapped.std.flatten().tolist() == [1, 1, 1]


def test_pixel_model_from_model_keeps_a_pixel_model_and_refuses_a_conflicting_mean():
    pixel = PixelModel(plain(TinyCNN()), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert PixelModel.from_model(pixel) is pixel
    assert PixelModel.from_model(pixel, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)) is pixel  # float32 buffers
    with pytest.raises(ValueError, match='already a PixelModel'):
        PixelModel.from_model(pixel, **IDENTITY)
    with pytest.raises(ValueError, match='already a PixelModel'):
        PGD(pixel, **IDENTITY)


def test_trainer_refuses_a_plain_module():
    with pytest.raises(ValueError, match=r'mean=\(0, 0, 0\), std=\(1, 1, 1\)'):
        AdversarialTrainer(plain(TinyCNN()), steps=1, verbose=False)
    task = AdversarialTrainer(plain(TinyCNN()), steps=1, verbose=False, **IDENTITY)
    assert (task.mean, task.std) == ((0, 0, 0), (1, 1, 1))


class _Untouchable(Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int):
        raise AssertionError('evaluate() loaded data before checking the normalisation')


def test_evaluate_refuses_a_plain_module_before_any_work():
    from timm_nofrost.evaluate import evaluate
    with pytest.raises(ValueError, match=r'mean=\(0, 0, 0\), std=\(1, 1, 1\)'):
        evaluate(plain(TinyCNN()), DataLoader(_Untouchable(), batch_size=2), attacks='clean,pgd-2', progress=False)


def test_evaluate_with_explicit_identity_normalisation_matches_the_model():
    from timm_nofrost.evaluate import evaluate
    model = pixel_cnn()
    x, y = eval_data(32)
    loader = DataLoader(list(zip(x, y)), batch_size=16)
    report = evaluate(model, loader, attacks='clean,pgd-5', eps='4/255', sanity=False, progress=False, **IDENTITY)
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).float().mean().item()
    assert report.clean_accuracy == pytest.approx(clean)


def test_shift_default_transform_refuses_a_plain_module(tmp_path: Path):
    from timm_nofrost.evaluate import evaluate_shift
    with pytest.raises(ValueError, match=r'mean=\(0, 0, 0\), std=\(1, 1, 1\)'):
        evaluate_shift(plain(TinyCNN()), 'imagenet-sketch', tmp_path / 'missing', progress=False)
    with pytest.raises(ValueError, match='a transform given normalises itself'):
        evaluate_shift(TinyCNN(), 'imagenet-sketch', tmp_path, transform=lambda img: img, progress=False,
                       **IDENTITY)


# -- the torchattacks user's scenario ---------------------------------------------------------------------------
def test_attack_on_a_pixel_model_agrees_with_the_model():
    model = pixel_cnn()
    x, y = eval_data(128)
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).float().mean().item()
    assert clean > 0.9
    for attack in (PGD(model, eps=4 / 255, steps=10, **IDENTITY),
                   PGD(PixelModel(model, (0, 0, 0), (1, 1, 1)), eps=4 / 255, steps=10)):
        result = attack(x, y)
        with torch.no_grad():
            assert torch.equal(result.correct, model(result.x_adv).argmax(1) == y)
        assert result.accuracy < clean - 0.2  # the attack works on the model the user has


# -- results unchanged for configured models --------------------------------------------------------------------
class _HandNormalised(nn.Module):
    """``model((x - mean) / std)`` written out by hand, taking [0, 1] pixels."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
        return self.model((x - mean) / std)


@pytest.mark.parametrize('attack', [
    functools.partial(PGD, eps=4 / 255, steps=5), functools.partial(APGD, eps=4 / 255, steps=10)], ids=['pgd', 'apgd'])
def test_every_way_of_giving_the_normalisation_gives_the_same_examples(attack):
    model = trained_tiny_cnn()  # mean/std in its pretrained_cfg
    x, y = eval_data(64)
    reference = attack(model)(x, y)
    for other in (PixelModel(plain(model), MEAN, STD), PixelModel.from_model(model), nn.DataParallel(model)):
        result = attack(other)(x, y)
        assert torch.equal(result.x_adv, reference.x_adv) and torch.equal(result.correct, reference.correct)
    for other in (attack(plain(model), mean=MEAN, std=STD), attack(_HandNormalised(plain(model)), **IDENTITY)):
        result = other(x, y)
        assert torch.equal(result.x_adv, reference.x_adv) and torch.equal(result.correct, reference.correct)


def test_trainer_examples_equal_a_hand_normalised_attack():
    model = trained_tiny_cnn()
    x, y = eval_data(16)
    inputs = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    from_cfg = AdversarialTrainer(copy.deepcopy(model), steps=3, random_start=False, verbose=False)
    explicit = AdversarialTrainer(plain(model), steps=3, random_start=False, mean=MEAN, std=STD, verbose=False)
    a, b = from_cfg.make_adversarial(inputs, y)['input_adv'], explicit.make_adversarial(inputs, y)['input_adv']
    assert torch.equal(a, b)
    # the same training attack on pixels, through a model that normalises by hand
    by_hand = AdversarialTrainer(_HandNormalised(plain(model)), steps=3, random_start=False, input_normalized=False,
                                 verbose=False)
    assert by_hand.mean == (0.0,)  # the model takes pixels
    pixels = denormalize(inputs, MEAN, STD).clamp(0, 1)
    assert torch.allclose(denormalize(a, MEAN, STD), by_hand.make_adversarial(pixels, y)['input_adv'], atol=1e-6)


# -- conversions ------------------------------------------------------------------------------------------------
def test_normalize_denormalize_round_trip():
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    z = normalize(x, MEAN, STD)
    assert torch.equal(z, (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1))
    assert torch.allclose(denormalize(z, MEAN, STD), x, atol=1e-6)
    assert torch.allclose(normalize(denormalize(z, MEAN, STD), MEAN, STD), z, atol=1e-5)
    assert torch.equal(normalize(x[0], MEAN, STD), z[0])  # CHW images too
    assert torch.equal(normalize(x, torch.tensor(MEAN), torch.tensor(STD)), z)
    assert torch.equal(normalize(x, (0, 0, 0), (1, 1, 1)), x)
    assert denormalize(z.half(), MEAN, STD).dtype == torch.float16


def test_uint8_to_float_pixels():
    u = torch.tensor([0, 1, 128, 255], dtype=torch.uint8).view(1, 1, 2, 2)
    f = to_float_pixels(u)
    assert f.dtype == torch.float32 and torch.equal(f, u.float() / 255)
    assert f.min().item() == 0 and f.max().item() == 1
    x = torch.rand(2, 3, 4, 4)
    assert to_float_pixels(x) is x and to_float_pixels(x.double()).dtype == torch.float64
    assert torch.equal(normalize(u.expand(1, 3, 2, 2), MEAN, STD), normalize(f.expand(1, 3, 2, 2), MEAN, STD))
    with pytest.raises(ValueError, match='uint8'):
        to_float_pixels(torch.zeros(1, 3, 2, 2, dtype=torch.int64))


# -- AMP names --------------------------------------------------------------------------------------------------
def test_amp_names():
    assert AMP_DTYPES == {'bf16': torch.bfloat16, 'bfloat16': torch.bfloat16, 'fp16': torch.float16,
                          'float16': torch.float16}
    for name, dtype in AMP_DTYPES.items():
        assert amp_dtype(name) is dtype and amp_dtype(name.upper()) is dtype
    assert amp_dtype(None) is None and amp_dtype('none') is None
    assert amp_dtype(torch.bfloat16) is torch.bfloat16
    with pytest.raises(ValueError, match=r"Unknown AMP dtype 'int8'; accepted: none, bf16, bfloat16, fp16, float16"):
        amp_dtype('int8')
    with pytest.raises(ValueError, match='float32'):
        amp_dtype(torch.float32)


def test_config_amp_names():
    assert AdversarialConfig(attack_dtype='bf16').attack_dtype == 'bfloat16'
    assert AdversarialConfig(attack_dtype='none').attack_dtype is None
    with pytest.raises(ValueError, match="Unknown attack_dtype 'int8'"):
        AdversarialConfig(attack_dtype='int8')


# -- packaging --------------------------------------------------------------------------------------------------
def test_public_names_and_reexports():
    from timm_nofrost import attacks
    from timm_nofrost.attacks import base
    assert attacks.PixelModel is base.PixelModel is timm_nofrost.PixelModel is PixelModel
    assert base.unwrap_model is unwrap_model
    for name in ('AMP_DTYPES', 'PixelModel', 'amp_dtype', 'denormalize', 'normalize', 'resolve_mean_std',
                 'to_float_pixels'):
        assert name in timm_nofrost.__all__ and hasattr(timm_nofrost, name)


def test_pixels_sits_below_everything():
    """pixels.py imports torch (and the standard library) only: attacks, training and evaluation import it."""
    tree = ast.parse(Path(timm_nofrost.pixels.__file__).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0 and not node.module.startswith('timm_nofrost'), ast.dump(node)
        elif isinstance(node, ast.Import):
            assert all(not a.name.startswith('timm_nofrost') for a in node.names)


def test_train_a_ready_model_without_pretrained_cfg(tmp_path: Path, monkeypatch):
    """``train(cfg, model=...)`` (e.g. a torchvision ResNet): training and its evaluation use the data config's
    mean/std, so the model needs no pretrained_cfg.

    For a model without one the data config holds timm's defaults (ImageNet's). Every ``PixelModel`` the run
    builds (the training attack, the clean accuracy, the evaluation) normalises with them, and the run is, to the
    last bit, the run of the same model carrying them in a ``pretrained_cfg``; other mean/std change the run."""
    import traceback
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    from timm_nofrost.data import write_image_folder
    from timm_nofrost.training.run import TrainConfig, train
    write_image_folder(tmp_path / 'data' / 'train', 'train', num_samples=20, img_size=16)
    write_image_folder(tmp_path / 'data' / 'val', 'val', num_samples=10, img_size=16)
    torch.manual_seed(0)
    init = plain(TinyCNN(num_classes=5))

    def float32(values) -> tuple:  # what a PixelModel keeps (attacks re-wrap one from its float32 buffers)
        return tuple(torch.tensor(values, dtype=torch.float32).tolist())

    built = []  # (mean, std, the functions it was built under) of every PixelModel
    pixel_model_init = PixelModel.__init__

    def spy(self, model, mean, std):
        pixel_model_init(self, model, mean, std)
        callers = {frame.name for frame in traceback.extract_stack()}
        built.append((float32(mean), float32(std), callers))

    monkeypatch.setattr(PixelModel, '__init__', spy)

    def run(name: str, pretrained_cfg=None):
        model = copy.deepcopy(init)
        if pretrained_cfg is not None:
            model.pretrained_cfg = pretrained_cfg
        built.clear()
        cfg = TrainConfig(data=str(tmp_path / 'data'), img_size=16, batch_size=10, epochs=1, robust_examples=4,
                          eval_attack='pgd-2', final_attacks='clean,pgd-2', adv=AdversarialConfig(steps=1),
                          out_dir=str(tmp_path / name), progress=False)
        result = train(cfg, model=model)['runs']['nofrost']
        epochs = [{k: v for k, v in epoch.items() if k != 'train_time_s'} for epoch in result['epochs']]
        return model.state_dict(), epochs, result['final'], list(built)

    weights, epochs, final, stats = run('plain')
    assert {(mean, std) for mean, std, _ in stats} == {(float32(IMAGENET_DEFAULT_MEAN), float32(IMAGENET_DEFAULT_STD))}
    for phase in ('train_epoch', 'clean_accuracy', 'evaluate'):  # the training attack, clean accuracy, evaluation
        assert any(phase in callers for _, _, callers in stats), f'no PixelModel was built under {phase}()'
    # the same model, its normalisation given explicitly: the same run, weights and numbers alike
    same = run('configured', {'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD})
    assert same[1:3] == (epochs, final)
    assert all(torch.equal(weights[k], same[0][k]) for k in weights)
    # other mean/std (read from the pretrained_cfg into the data config) reach every PixelModel and change the run
    other = run('other', {'mean': MEAN, 'std': STD})
    assert {(mean, std) for mean, std, _ in other[3]} == {(float32(MEAN), float32(STD))}
    assert other[1][0]['train_loss'] != epochs[0]['train_loss']
    assert not all(torch.equal(weights[k], other[0][k]) for k in weights)
