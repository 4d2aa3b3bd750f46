"""ThreatModel: the one parser, validator and label of attack radii, and the step as a fraction of eps."""
import re
from pathlib import Path

import pytest
import torch

import timm_nofrost
from timm_nofrost import AdversarialConfig, ThreatModel
from timm_nofrost.attacks import APGD, FGSM, PGD, AutoAttack, build_attack, nofrost_step_size, parse_attack
from timm_nofrost.attacks import autoattack_available
from timm_nofrost.evaluate import RobustReport
from timm_nofrost.training import AdversarialTrainer

from tiny_models import eval_data, trained_tiny_cnn

ROOT = Path(timm_nofrost.__file__).parent
THREAT_MODULE = ROOT / 'attacks' / 'threat.py'


# -- parsing and validation ----------------------------------------------------------------------------------
@pytest.mark.parametrize('value, norm, eps', [
    ('8/255', 'Linf', 8 / 255), (' 4/255 ', 'Linf', 4 / 255), ('0.5/255', 'Linf', 0.5 / 255), (0.03, 'Linf', 0.03),
    ('0.03', 'Linf', 0.03), (1, 'Linf', 1.0), (0, 'Linf', 0.0), (2, 'L2', 2.0), ('1e-2', 'L2', 0.01),
])
def test_parse(value, norm, eps):
    threat = ThreatModel(value, norm)
    assert threat == ThreatModel(eps, norm) and threat.eps == eps and isinstance(threat.eps, float)
    assert threat.norm == norm


@pytest.mark.parametrize('value, norm, match', [
    (-0.1, 'Linf', r'Invalid eps -0\.1: must be a finite number >= 0'),
    (float('nan'), 'Linf', 'Invalid eps nan: must be a finite number >= 0'),
    (float('inf'), 'L2', 'Invalid eps inf: must be a finite number >= 0'),
    ('abc', 'Linf', "Invalid eps 'abc': expected a number or a fraction like 8/255"),
    (True, 'Linf', 'Invalid eps True: expected a number or a fraction'),
    ('1/0', 'Linf', "Invalid eps '1/0': expected a number or a fraction"),
    ('8//255', 'Linf', "Invalid eps '8//255'"),
    (None, 'Linf', 'Invalid eps None'),
    (1.5, 'Linf', r'Linf eps 1\.5 is above 1, the whole pixel range; give pixels in \[0, 1\] units, e\.g\. 8/255'),
    ('8/255', 'L1', "Unknown norm 'L1'; accepted: Linf, L2"),
])
def test_invalid(value, norm, match):
    with pytest.raises(ValueError, match=match):
        ThreatModel(value, norm)


def test_l2_radii_may_exceed_one_and_step_sizes_name_themselves():
    assert ThreatModel(1.5, 'L2').eps == 1.5
    with pytest.raises(ValueError, match=r"Invalid step_size '-1/255': must be a finite number >= 0"):
        AdversarialConfig(step_size='-1/255')
    with pytest.raises(ValueError, match=r"step_size must be > 0 and finite, got -0\.01"):  # an attack needs a step
        PGD(trained_tiny_cnn(), step_size=-0.01)


def test_frozen():
    threat = ThreatModel('8/255')
    with pytest.raises(AttributeError):
        threat.eps = 0.1


# -- labels: one formatter; the report keys of the default values stay as they were -----------------------
@pytest.mark.parametrize('eps, norm, label', [
    (8 / 255, 'Linf', '8/255'), (4 / 255, 'Linf', '4/255'), ('16/255', 'Linf', '16/255'),
    (0.5 / 255, 'Linf', '0.00196078'),  # not on the 1/255 grid: %g, as reports have always keyed it
    (0.03, 'Linf', '0.03'), (0.1, 'Linf', '0.1'), (0.2, 'Linf', '51/255'), (0, 'Linf', '0'),
    (0.5, 'L2', '0.5'), (128 / 255, 'L2', '0.501961'),
])
def test_label(eps, norm, label):
    threat = ThreatModel(eps, norm)
    assert threat.label == threat.format() == label
    assert str(threat) == f'{norm} eps {label}'


def test_format_lengths():
    threat = ThreatModel('8/255')
    assert threat.format(1 / 255) == '1/255' and threat.format(2.5 * 8 / 255 / 10) == '2/255'
    assert ThreatModel(0.5, 'L2').format(0.125) == '0.125'


def test_study_curve_keys():
    """The study's default curve multiples of 8/255 and of 0.1 (Fashion-MNIST) keep their report keys."""
    assert [ThreatModel('8/255').scaled(m).label for m in (0.25, 0.5, 1.0, 1.5, 2.0)] == \
        ['2/255', '4/255', '8/255', '12/255', '16/255']
    assert [ThreatModel(0.1).scaled(m).label for m in (0.25, 0.5, 1.0, 1.5, 2.0)] == \
        ['0.025', '0.05', '0.1', '0.15', '51/255']


def test_report_labels_come_from_the_threat_model():
    report = RobustReport(model='m', dataset='d', norm='Linf', eps=[2 / 255, 8 / 255, 0.03], attacks=[], n_examples=1,
                          subset={}, clean_accuracy=1.0, accuracy={}, zero_grad_frac={})
    assert report.eps_labels == ['2/255', '8/255', '0.03']


# -- scaling and steps as fractions of eps --------------------------------------------------------------------
def test_scaled():
    threat = ThreatModel('8/255')
    assert threat.scaled(0.5) == ThreatModel('4/255') and threat.scaled(2).label == '16/255'
    assert threat.scaled(0).eps == 0.0 and ThreatModel(0.5, 'L2').scaled(3) == ThreatModel(1.5, 'L2')
    with pytest.raises(ValueError, match='above 1'):
        threat.scaled(40)
    assert threat.fraction(1 / 255) == pytest.approx(0.125) and ThreatModel(0).fraction(0.1) == 0.0


@pytest.mark.parametrize('kwargs, fraction', [
    (dict(), 0.125),  # the authors' 1/255 at 8/255
    (dict(steps=3), 10 / 255 / 3 / (8 / 255)),
    (dict(method='trades'), 0.25),  # 2.5 eps / 10
    (dict(attack='fgsm-rs'), 1.25), (dict(attack='n-fgsm'), 1.0),
    (dict(step_size='2/255'), 0.25), (dict(eps=0.5, norm='L2', step_size=0.1), 0.2),
])
def test_step_fraction_round_trip_equals_the_old_step(kwargs, fraction):
    cfg = AdversarialConfig(**kwargs)
    assert cfg.step_fraction == pytest.approx(fraction, rel=1e-12)
    assert cfg.step_fraction * cfg.eps == pytest.approx(cfg.attack_step_size, rel=1e-15)
    # bit for bit the ratio the attack used to recompute from the absolute step
    assert cfg.step_fraction == cfg.attack_step_size / cfg.eps
    attack = AdversarialTrainer(trained_tiny_cnn(), adv_cfg=cfg, input_normalized=False, verbose=False).attack()
    assert attack.threat == cfg.threat and attack.step_fraction == cfg.step_fraction
    assert attack.step_size == pytest.approx(cfg.attack_step_size, rel=1e-15)


def test_warm_up_scales_the_threat_and_the_step():
    cfg = AdversarialConfig(eps='8/255', steps=10, eps_warmup_steps=4)
    assert [cfg.eps_at(k) for k in (0, 1, 2, 4, 9)] == [0.0, 2 / 255, 4 / 255, 8 / 255, 8 / 255]
    for k in (1, 2, 3):
        old_step = nofrost_step_size(cfg.eps, 10) / cfg.eps * cfg.eps_at(k)  # the old attack's arithmetic
        assert cfg.eps_at(k) * cfg.step_fraction == old_step
    assert AdversarialConfig(eps_warmup_steps=0).eps_at(0) == 8 / 255


def test_n_fgsm_radius_is_a_multiple_of_eps():
    cfg = AdversarialConfig(attack='n-fgsm')
    assert cfg.radius_fraction == pytest.approx(3.0) and cfg.attack_radius == pytest.approx(3 * 8 / 255)
    assert AdversarialConfig(attack='n-fgsm', step_size='4/255').radius_fraction == pytest.approx(2.5)
    assert AdversarialConfig().radius_fraction == 1.0 and AdversarialConfig().attack_radius == 8 / 255


def test_config_keeps_eps_and_norm_fields_and_holds_a_threat():
    cfg = AdversarialConfig(eps='4/255')
    assert cfg.eps == 4 / 255 and cfg.to_dict()['eps'] == 4 / 255 and 'threat' not in cfg.to_dict()
    assert cfg.threat == ThreatModel(4 / 255, 'Linf')
    assert AdversarialConfig(eps=0.5, norm='L2').threat == ThreatModel(0.5, 'L2')
    assert cfg.describe() == 'nofrost, Linf eps 4/255, PGD-10 step 0.00196078, lambda 0.5'


# -- attacks take a threat model; the old keywords build the same one --------------------------------------
def test_attacks_take_a_threat_model():
    model = trained_tiny_cnn()
    x, y = eval_data(8)
    threat = ThreatModel('4/255')
    for make in (lambda **kw: PGD(model, steps=3, **kw), lambda **kw: FGSM(model, random_start=True, **kw),
                 lambda **kw: APGD(model, steps=4, **kw)):
        new, old = make(threat=threat), make(eps='4/255', norm='Linf')
        assert new.threat == old.threat == threat and (new.eps, new.norm) == (4 / 255, 'Linf')
        assert torch.equal(new(x, y).x_adv, old(x, y).x_adv)
    assert PGD(model).threat == ThreatModel(8 / 255, 'Linf')  # the default
    assert PGD(model, threat=threat, step_size='2/255').step_fraction == pytest.approx(0.5)
    assert build_attack(parse_attack('pgd-5'), model, threat=ThreatModel(0.5, 'L2')).threat.norm == 'L2'
    assert build_attack(parse_attack('fgsm'), model, 2 / 255).threat == ThreatModel('2/255')
    with pytest.raises(ValueError, match='Give threat a ThreatModel, or eps / norm, not both'):
        PGD(model, eps=0.1, threat=threat)
    with pytest.raises(ValueError, match="got threat='8/255'"):
        PGD(model, threat='8/255')
    with pytest.raises(ValueError, match='step_size .* or step_fraction .*, not both'):
        PGD(model, step_size=0.01, step_fraction=0.25)


@pytest.mark.skipif(not autoattack_available(), reason='needs pyautoattack')
def test_autoattack_takes_a_threat_model():
    attack = AutoAttack(trained_tiny_cnn(), threat=ThreatModel(0.5, 'L2'))
    assert (attack._official.apgd.eps, attack._official.apgd.norm) == (0.5, 'L2')


def test_scaled_threat_gives_the_scaled_step():
    """Per-example radii (a scaled threat model) scale the step: the same result as an attack built at that eps."""
    model = trained_tiny_cnn()
    x, y = eval_data(8)
    full = PGD(model, threat=ThreatModel('8/255'), steps=3, step_size='2/255', seed=1)
    half = PGD(model, threat=ThreatModel('8/255').scaled(0.5), steps=3, step_size='1/255', seed=1)
    assert full.step_fraction == half.step_fraction
    assert torch.equal(full(x, y, eps=torch.full((8,), 4 / 255)).x_adv, half(x, y).x_adv)


# -- nothing else parses or range-checks eps ------------------------------------------------------------------
_FORBIDDEN = [
    (re.compile(r'\bFraction\('), 'parses fractions'),
    (re.compile(r'\bparse_eps\('), 'parses eps'),
    (re.compile(r'\bin NORMS\b'), 'checks norms'),
    (re.compile(r'isfinite\([^)]*eps'), 'range-checks eps'),
    (re.compile(r"\}/255['\"]"), 'formats eps'),
]
_FORBIDDEN.append((re.compile(r'\b(?!\w*steps\b)\w*eps\w*(?:\[[^\]]*\])?\s*(?:>=?\s*1|<=?\s*0)(?![\w.])'),
                   'range-checks eps'))  # eps > 1, eps < 0, eps_values[-1] > 1; not eps_warmup_steps < 0


def _offences(line: str):
    return [why for pattern, why in _FORBIDDEN if pattern.search(line)]


def test_only_the_threat_model_parses_or_checks_eps():
    problems = []
    for path in ROOT.rglob('*.py'):
        if path == THREAT_MODULE:
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if not line.lstrip().startswith(('from ', 'import ')):
                problems += [f'{path.relative_to(ROOT)}:{i}: {line.strip()} ({why})' for why in _offences(line)]
    assert not problems, 'eps parsed or checked outside attacks/threat.py:\n' + '\n'.join(problems)


def test_the_source_check_can_fail():
    """The patterns catch the checks this refactor removed, and pass the code that stays."""
    removed = ["    if norm == 'Linf' and self.eps > 1:", '    if not math.isfinite(eps) or eps < 0:',
               "    if norm == 'Linf' and eps_values[-1] > 1:", '            eps = float(Fraction(text))',
               '    if norm not in NORMS:', "        return f'{round(eps * 255)}/255'", '    eps = parse_eps(eps)',
               "    return f'{value * 255:.3g}/255' if norm == 'Linf' else f'{value:.3g}'"]
    assert all(_offences(line) for line in removed)
    kept = ['        or self.eps_warmup_steps < 0:', '        if self.step_fraction <= 0 and self.eps > 0:',
            "    return np.clip(np.round(images * 255), 0, 255)", "    big = PGD(model, threat=large, steps=20)"]
    assert not any(_offences(line) for line in kept)
