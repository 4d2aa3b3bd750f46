"""The fast worst case: APGD-CE, then APGD-T on linearly ranked targets on its survivors, escalating to
AutoAttack's FAB-T and Square only when a sanity check flags the model (or when asked); never called AutoAttack."""
import copy
import json

import pytest
import torch
from torch.utils.data import TensorDataset

from timm_nofrost.attacks import (
    APGD, ESCALATION, FAST_STAGES, FAST_TARGETS, APGDTargeted, AutoAttack, FastWorstCase, ThreatModel,
    autoattack_available, build_attack, parse_attack)
from timm_nofrost.evaluate import evaluate
from timm_nofrost.study.aggregate import verdict

from tiny_models import eval_data, trained_tiny_cnn

needs_official = pytest.mark.skipif(not autoattack_available(), reason='needs pyautoattack')
EPS = 2 / 255


def test_names():
    assert parse_attack('fast').name == parse_attack('fast-worst-case').name == 'fast-worst-case'
    assert parse_attack('fab-t').parts == ('fab-t',) and parse_attack('square').parts == ('square',)
    assert FAST_STAGES == ('apgd-ce', f'apgd-t-100-{FAST_TARGETS}-linear')
    assert parse_attack(FAST_STAGES[1]).ranking == 'linear'
    model = trained_tiny_cnn()
    assert isinstance(build_attack(parse_attack('fast'), model, threat=ThreatModel(EPS)), FastWorstCase)
    if autoattack_available():
        square = build_attack(parse_attack('square'), model, threat=ThreatModel(EPS))
        assert isinstance(square, AutoAttack) and square._official.attacks_to_run == ['square']
        assert square._official.square.n_queries == 5000  # the standard version's budget
    with pytest.raises(ValueError, match='Unknown attack'):
        parse_attack('fast-worst')


def test_equals_the_cascade_it_is_made_of():
    """Stage 2 runs exactly on stage 1's survivors: the same per-image outcome and work as running the two
    attacks by hand."""
    model = trained_tiny_cnn()
    x, y = eval_data(48)
    threat = ThreatModel(4 / 255)
    fast = FastWorstCase(model, threat=threat, seed=3)(x, y)
    first = APGD(model, threat=threat, steps=100, seed=3)(x, y)
    second = APGDTargeted(model, threat=threat, steps=100, n_target_classes=FAST_TARGETS, ranking='linear',
                          seed=3)(x, y, mask=first.correct)
    assert 0 < int(first.correct.sum()) < 48  # both stages have work
    assert torch.equal(fast.correct, second.correct)
    assert fast.backward_passes == first.backward_passes + second.backward_passes
    assert fast.forward_passes == first.forward_passes + second.forward_passes


def test_apgd_ce_column_is_reused_exactly():
    """With an apgd-ce column in the same evaluation, its result is the first stage: identical per-image outcomes
    and counted cost, one APGD-CE run less."""
    model = trained_tiny_cnn()
    x, y = eval_data(48)
    data = TensorDataset(x, y)
    alone = evaluate(model, data, attacks='clean,fast-worst-case', eps='4/255', sanity=False, progress=False)
    shared = evaluate(model, data, attacks='clean,apgd-ce,fast-worst-case', eps='4/255', sanity=False,
                      progress=False)
    assert alone.per_example['4/255']['fast-worst-case'] == shared.per_example['4/255']['fast-worst-case']
    assert alone.cost['4/255']['fast-worst-case']['backward'] == shared.cost['4/255']['fast-worst-case']['backward']
    assert alone.stages == {'4/255': {'fast-worst-case': alone.stages['4/255']['fast-worst-case']}}
    ledger = shared.stages['4/255']['fast-worst-case']
    assert list(ledger) == list(FAST_STAGES)
    assert ledger['apgd-ce']['backward'] == shared.cost['4/255']['apgd-ce']['backward']
    assert ledger['apgd-ce']['attacked'] == round(48 * shared.clean_accuracy)
    robust = shared.accuracy['4/255']['fast-worst-case'] * 48
    assert ledger['apgd-ce']['attacked'] - ledger['apgd-ce']['broken'] - ledger[FAST_STAGES[1]]['broken'] == robust


class _Quantized(torch.nn.Module):
    """Gradient masking: inputs rounded to 1/255 steps first, so every input gradient is exactly zero while the
    predictions stay those of the model (a black-box attack is unaffected)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model, self.pretrained_cfg = copy.deepcopy(model), model.pretrained_cfg

    def forward(self, x):
        mean = torch.tensor(self.pretrained_cfg['mean']).view(1, -1, 1, 1)
        std = torch.tensor(self.pretrained_cfg['std']).view(1, -1, 1, 1)
        pixels = torch.round((x * std + mean) * 255) / 255
        return self.model((pixels - mean) / std)


@needs_official
def test_masked_gradients_flag_and_escalate(tmp_path):
    model = _Quantized(trained_tiny_cnn())
    x, y = eval_data(12)
    report = evaluate(model, TensorDataset(x, y), attacks='clean,fast-worst-case', eps='4/255', progress=False,
                      sanity_examples=12)
    flags = {f['name']: f for f in report.sanity}
    assert not flags['black-box not stronger than white-box']['ok']
    ledger = report.stages['4/255']['fast-worst-case']
    assert ledger['apgd-ce']['broken'] == ledger[FAST_STAGES[1]]['broken'] == 0  # the gradients are all zero
    assert report.escalation['ran'] and 'black-box not stronger than white-box' in report.escalation['reason']
    assert list(ledger) == [*FAST_STAGES, *ESCALATION]
    broken = ledger['fab-t']['broken'] + ledger['square']['broken']
    assert broken > 0 and ledger['square']['forward'] > 0
    assert report.accuracy['4/255']['fast-worst-case'] * 12 == ledger['apgd-ce']['attacked'] - broken
    assert sum(report.per_example['4/255']['worst-case']) == ledger['apgd-ce']['attacked'] - broken
    md = report.to_markdown()
    assert 'This is not AutoAttack' in md and 'ran on what survived: sanity checks flagged the model' in md
    saved = json.loads(report.save_json(tmp_path / 'r.json').read_text())
    assert saved['escalation']['attacks'] == list(ESCALATION) and saved['cost']['4/255']['fast-worst-case']['forward']


@needs_official
def test_no_escalation_unless_flagged():
    model = trained_tiny_cnn()
    x, y = eval_data(12)
    data = TensorDataset(x, y)
    quiet = evaluate(model, data, attacks='clean,fast-worst-case', eps='1/255', progress=False, sanity_examples=6)
    assert all(f['ok'] for f in quiet.sanity)
    assert quiet.escalation == {'ran': False, 'attacks': list(ESCALATION),
                                'reason': 'no sanity check flagged the model'}
    assert list(quiet.stages['1/255']['fast-worst-case']) == list(FAST_STAGES)
    assert quiet.sanity_cost['backward'] > 0 and quiet.sanity_cost['forward'] > quiet.sanity_cost['backward']
    plain = evaluate(model, data, attacks='clean,pgd-5', eps='1/255', progress=False, sanity=False)
    assert plain.escalation == {} and plain.stages == {'1/255': {}}


@pytest.mark.slow
@needs_official
def test_escalation_when_asked():
    x, y = eval_data(4)
    asked = evaluate(trained_tiny_cnn(), TensorDataset(x, y), attacks='clean,fast-worst-case', eps='1/255',
                     progress=False, sanity=False, escalate=True)
    assert asked.escalation['ran'] and asked.escalation['reason'] == 'asked for (--escalate)'
    assert list(asked.stages['1/255']['fast-worst-case']) == [*FAST_STAGES, *ESCALATION]
    assert asked.stages['1/255']['fast-worst-case']['square']['forward'] > 0


def _study(metric: str):
    stats = {'mean': 50.0, 'std': 1.0, 'min': 49.0, 'max': 51.0, 'n': 3}
    return {'arms': {a: {'clean': stats, metric: stats} for a in ('nofrost', 'bn-at')}, 'attacks': [metric],
            'robust_metric': metric, 'runs': {}, 'missing': [], 'notes': []}


def test_study_verdict_names_autoattack_only_when_it_ran():
    fast = ' '.join(verdict(_study('fast-worst-case')))
    assert 'fast worst-case accuracy' in fast and 'AutoAttack did not run' in fast
    assert 'AutoAttack accuracy' not in fast
    assert 'AutoAttack accuracy' in ' '.join(verdict(_study('autoattack')))
