"""Bad batches are refused the same way by every entry point (``check_inputs``): each attack, the training step,
the evaluation engine and ``evaluate()``. A ValueError / TypeError naming the problem, never a score."""
import copy

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from timm_nofrost import AdversarialTrainer
from timm_nofrost.attacks import PGD, PixelModel, autoattack_available, build_attack, parse_attack
from timm_nofrost.evaluate import RobustCounter, evaluate

from tiny_models import TinyCNN, eval_data, trained_tiny_cnn

ATTACKS = ['fgsm', 'fgsm-rs', 'pgd-2', 'apgd-ce-2', 'apgd-t-2',
           pytest.param('autoattack', marks=pytest.mark.skipif(not autoattack_available(), reason='no pyautoattack'))]


def _attack(name):
    attack = build_attack(parse_attack(name), TinyCNN().eval(), eps=8 / 255)
    return lambda x, y: attack(x, y)


def _trainer(x, y):
    return AdversarialTrainer(TinyCNN(), input_normalized=False, steps=1, verbose=False)(x, y)


def _engine(x, y):
    return RobustCounter(PixelModel.from_model(TinyCNN().eval()), [parse_attack('pgd-2')], [8 / 255]).update(x, y)


def _evaluate(x, y):
    return evaluate(TinyCNN(), DataLoader(TensorDataset(x, y), batch_size=4), attacks='clean,pgd-2', sanity=False,
                    progress=False)


ENTRIES = {**{name: name for name in ('fgsm', 'fgsm-rs', 'pgd-2', 'apgd-ce-2', 'apgd-t-2', 'autoattack')},
           'trainer': _trainer, 'engine': _engine, 'evaluate': _evaluate}


def _nan(x):
    x = x.clone()
    x[1, 2, 3, 4] = float('nan')
    return x


def _inf(x):
    x = x.clone()
    x[0, 0, 0, 0] = float('inf')
    return x


CASES = {  # what is wrong with the batch -> (make the batch, exception, what the message must name)
    'nan pixel': (lambda x, y: (_nan(x), y), ValueError, r'finite.*nan'),
    'inf pixel': (lambda x, y: (_inf(x), y), ValueError, r'finite.*inf'),
    '0-255 floats': (lambda x, y: (x * 255, y), ValueError, r'pixels in \[0, 1\], got values in .*divide 0-255 '),
    'int64 images': (lambda x, y: ((x * 255).long(), y), TypeError, r'torch\.int64: .*x\.float\(\) / 255'),
    'empty batch': (lambda x, y: (x[:0], y[:0]), ValueError, r'(?i)non-empty|empty'),
    'float64 images, float32 model': (lambda x, y: (x.double(), y), TypeError, r'torch\.float64 .*torch\.float32'),
    'float16 images, float32 model': (lambda x, y: (x.half(), y), TypeError, r'torch\.float16 .*torch\.float32'),
    'float labels': (lambda x, y: (x, y.float()), ValueError, r'Labels must be an integer tensor'),
}


@pytest.mark.parametrize('entry', [*ATTACKS, 'trainer', 'engine', 'evaluate'])
@pytest.mark.parametrize('case', list(CASES))
def test_bad_batch_refused(case, entry):
    make, error, message = CASES[case]
    run = _attack(entry) if isinstance(ENTRIES[entry], str) else ENTRIES[entry]
    x, y = make(*eval_data(8))
    with pytest.raises(error, match=message):
        run(x, y)


@pytest.mark.parametrize('name', ATTACKS)
@pytest.mark.parametrize('eps', [-0.1, float('nan'), float('inf')])
def test_bad_per_example_eps_refused(name, eps):
    attack = build_attack(parse_attack(name), TinyCNN().eval(), eps=8 / 255)
    x, y = eval_data(4)
    radii = torch.full((4,), 4 / 255)
    radii[2] = eps
    with pytest.raises(ValueError, match=r'Per-example eps must be finite and >= 0, got values in'):
        attack(x, y, eps=radii)


@pytest.mark.parametrize('name', ['fgsm', 'fgsm-rs', 'pgd-2'])
@pytest.mark.parametrize('step', [-1, 0, '-2/255'])
def test_step_size_not_positive_named(name, step):
    with pytest.raises(ValueError, match=rf'step_size must be > 0 and finite, got {step!r}'):
        build_attack(parse_attack(name), TinyCNN(), eps=8 / 255, step_size=step)


def test_uint8_pixels_are_converted_everywhere_pixels_are_taken():
    """The one uint8 rule: 0-255 pixels, divided by 255 (as ``to_float_pixels``); normalised inputs must be floats."""
    x, y = eval_data(8)
    u = (x * 255).round().to(torch.uint8)
    f = u.float() / 255
    model = trained_tiny_cnn()
    assert torch.equal(PGD(model, steps=2)(u, y).x_adv, PGD(model, steps=2)(f, y).x_adv)
    counters = [RobustCounter(PixelModel.from_model(model), [parse_attack('pgd-2')], [8 / 255]) for _ in '12']
    outcomes = [counter.update(images, y)['8/255']['worst-case'] for counter, images in zip(counters, (u, f))]
    assert torch.equal(*outcomes)
    losses = []
    for inputs in (u, f):
        torch.manual_seed(0)
        losses.append(AdversarialTrainer(copy.deepcopy(model), input_normalized=False, steps=1, verbose=False)(
            inputs, y)['loss'])
    assert torch.equal(*losses)
    with pytest.raises(TypeError, match=r'Normalised inputs must be floats, got torch\.uint8: .*x\.float\(\) / 255'):
        AdversarialTrainer(TinyCNN(), steps=1, verbose=False)(u, y)


def test_normalised_training_inputs_need_no_range_but_must_be_finite():
    """Normalised inputs leave [0, 1] by design (and random erasing leaves any range): only NaN / inf are refused."""
    x, y = eval_data(8)
    task = AdversarialTrainer(TinyCNN(), steps=1, verbose=False)
    assert torch.isfinite(task((x - 0.5) / 0.25, y)['loss'])
    with pytest.raises(ValueError, match=r'finite.*nan'):
        task(_nan(x), y)


def test_float64_model_with_float64_images_works():
    x, y = eval_data(8)
    model = copy.deepcopy(trained_tiny_cnn()).double()
    for name in ('fgsm-rs', 'pgd-2', 'apgd-ce-2', 'apgd-t-2'):
        result = build_attack(parse_attack(name), model, eps=8 / 255)(x.double(), y)
        assert result.x_adv.dtype == torch.float64 and result.correct.shape == (8,)
    counter = RobustCounter(PixelModel.from_model(model), [parse_attack('pgd-2')], [8 / 255])
    assert counter.update(x.double(), y)['clean'].shape == (8,)
    out = AdversarialTrainer(copy.deepcopy(model), input_normalized=False, steps=1, verbose=False)(x.double(), y)
    assert out['loss'].dtype == torch.float64
    if autoattack_available():  # the official code casts the images to float32
        with pytest.raises(TypeError, match=r'float32, got torch\.float64'):
            build_attack(parse_attack('autoattack'), model, eps=8 / 255)(x.double(), y)
