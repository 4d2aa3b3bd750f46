"""Arms of a study: named training recipes, as data.

An arm says which model family it trains (the study's normalizer-free model, or its BatchNorm twin at the same
depth and width), how clean and adversarial examples go through BatchNorm, and the training method and attack
(``AdversarialConfig`` fields). Everything else (data, schedule, optimizer, eps, PGD steps, evaluation) is the
study's and the same for every arm.

Built in: the NoFrost paper's four arms (``standard``, ``bn-at``, ``mbn-at``, ``nofrost``) and the recipes
users compare them with (Madry, TRADES, MART, FGSM-RS and N-FGSM fast AT, each on either family). Users add
their own with ``--arm NAME:key=value,...`` or a JSON / YAML file mapping names to keys.
"""
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Union

from ..training.adversarial import AdversarialConfig
from ..settings import setting, setting_of
from ..training.presets import PAPER_ARMS

__all__ = ['Arm', 'ArmSelection', 'ARMS', 'PAPER_ARMS', 'FAMILIES', 'ARM_KEYS', 'PER_ARM', 'ARM_OVERRIDES',
           'parse_arm_spec', 'load_arms_file', 'resolve_arms']

FAMILIES = ('nf', 'bn')
# the AdversarialConfig fields an arm may set; the study sets the rest (eps, norm, warm-up, ...) for every arm
PER_ARM = ('batch_mode', 'method', 'attack', 'adv_weight', 'beta')  # each arm's own: no study-wide flag
ARM_OVERRIDES = PER_ARM + ('steps', 'step_size')  # the study's PGD steps and step size, unless the arm sets them
_FIELDS = {f.name: f for f in fields(AdversarialConfig)}
_DEFAULTS = {name: f.default for name, f in _FIELDS.items()}


@dataclass(frozen=True)
class Arm:
    """One training recipe of a study: a name, a model family and overrides of the study's ``AdversarialConfig``.

    Args:
        name: Label used for folders, tables and ``--only`` (letters, digits, ``-``, ``_``, ``.``).
        family: ``'nf'`` trains the study's normalizer-free model (a BatchNorm model is converted with
            ``convert_to_normfree``); ``'bn'`` its BatchNorm twin (a normalizer-free model's timm twin at the same
            depth and width, or the BatchNorm model itself).
        overrides: ``AdversarialConfig`` fields of ``ARM_OVERRIDES`` (e.g. ``{'method': 'trades', 'beta': 3}``);
            unset ones take the study's value (``steps``, ``step_size``) or the config's default. Read them as
            attributes: ``arm.method``, ``arm.batch_mode``.
        description: One line for reports.
    """
    name: str
    family: str = 'nf'
    overrides: Dict[str, Any] = field(default_factory=dict)
    description: str = ''

    def __post_init__(self) -> None:
        if not self.name or not all(c.isalnum() or c in '-_.' for c in self.name):
            raise ValueError(f'Arm name {self.name!r} is not usable: use letters, digits, "-", "_" and ".".')
        if self.family not in FAMILIES:
            raise ValueError(f'Arm {self.name!r}: unknown family {self.family!r}; accepted: {", ".join(FAMILIES)}.')
        # unset and default values are no override: equal arms compare equal however they were written
        object.__setattr__(self, 'overrides', {k: v for k, v in self.overrides.items() if v != _DEFAULTS.get(k, v)
                                               or k not in _DEFAULTS})
        unknown = sorted(set(self.overrides) - set(ARM_OVERRIDES))
        if unknown:
            raise ValueError(f'Arm {self.name!r}: {", ".join(unknown)} cannot differ between arms; an arm sets '
                             f'{", ".join(ARM_OVERRIDES)}.')
        if self.family == 'nf' and self.batch_mode in ('separate', 'split'):
            raise ValueError(f'Arm {self.name!r}: batch_mode {self.batch_mode!r} needs BatchNorm layers; use '
                             f'family=bn, or batch_mode concat / auto for the normalizer-free model.')
        self.adversarial(eps=1.0)  # AdversarialConfig's checks of method, attack and weights, naming the arm

    def __getattr__(self, key: str) -> Any:
        if key in ARM_OVERRIDES:
            return self.overrides.get(key, _DEFAULTS[key])
        raise AttributeError(f'{type(self).__name__!r} object has no attribute {key!r}')

    @property
    def standard(self) -> bool:
        """Standard (clean) training: no adversarial examples."""
        return self.method == 'nofrost' and self.adv_weight == 0

    def adversarial(self, **study: Any) -> AdversarialConfig:
        """The arm's ``AdversarialConfig``: the study's settings (eps, norm, steps, step size, ...), the arm's on
        top; standard training takes no steps, a single-step attack its own one step."""
        settings = {**study, **{k: v for k, v in self.overrides.items() if k in PER_ARM}}
        if self.standard:
            settings.update(steps=0, step_size=None)
        elif self.attack != 'pgd':
            settings.update(steps=None, step_size=None)
        settings.update({k: self.overrides[k] for k in ('steps', 'step_size') if self.overrides.get(k) is not None})
        try:
            return AdversarialConfig(**settings)
        except (TypeError, ValueError) as e:
            raise ValueError(f'Arm {self.name!r}: {e}') from None

    def to_dict(self) -> Dict[str, Any]:
        """Flat, every arm key present (the form ``study.json`` records)."""
        return {'name': self.name, 'family': self.family, **{k: getattr(self, k) for k in ARM_OVERRIDES},
                'description': self.description}


ARM_KEYS = ('family',) + ARM_OVERRIDES + ('description',)

ARMS: Dict[str, Arm] = {arm.name: arm for arm in (
    Arm('standard', 'nf', dict(adv_weight=0.0),
        'standard training of the normalizer-free model (no adversarial examples)'),
    Arm('bn-standard', 'bn', dict(adv_weight=0.0), 'standard training of the BatchNorm twin'),
    Arm('bn-at', 'bn', dict(batch_mode='separate', adv_weight=0.5),
        'BatchNorm twin, 0.5 clean + 0.5 adversarial loss, one BN shared by both (BN-AT)'),
    Arm('mbn-at', 'bn', dict(batch_mode='split', adv_weight=0.5),
        'BatchNorm twin, 0.5 clean + 0.5 adversarial loss, separate BN for each (MBN-AT); evaluated with the clean '
        'BN, as timm\'s split BN in eval mode'),
    Arm('nofrost', 'nf', dict(adv_weight=0.5), 'normalizer-free model, 0.5 clean + 0.5 adversarial loss (NoFrost)'),
    Arm('madry', 'nf', dict(method='madry'), 'normalizer-free model, adversarial loss only (Madry AT)'),
    Arm('bn-madry', 'bn', dict(batch_mode='separate', method='madry'),
        'BatchNorm twin, adversarial loss only (Madry AT)'),
    Arm('trades', 'nf', dict(method='trades'), 'normalizer-free model, TRADES (beta 6)'),
    Arm('bn-trades', 'bn', dict(batch_mode='separate', method='trades'), 'BatchNorm twin, TRADES (beta 6)'),
    Arm('mart', 'nf', dict(method='mart'), 'normalizer-free model, MART (beta 6)'),
    Arm('fast-at', 'nf', dict(method='madry', attack='fgsm-rs'),
        'normalizer-free model, FGSM-RS fast AT (Wong et al. 2020)'),
    Arm('bn-fast-at', 'bn', dict(batch_mode='separate', method='madry', attack='fgsm-rs'),
        'BatchNorm twin, FGSM-RS fast AT (Wong et al. 2020)'),
    Arm('n-fgsm', 'nf', dict(method='madry', attack='n-fgsm'),
        'normalizer-free model, N-FGSM single-step AT (de Jorge et al. 2022)'),
)}


_ALIASES = {'lambda': 'adv_weight', 'weight': 'adv_weight', 'adv-weight': 'adv_weight', 'batch-mode': 'batch_mode',
            'step-size': 'step_size'}


def _value(key: str, text: str) -> Any:
    """A value of an ``--arm`` spec, typed as its ``AdversarialConfig`` flag is (``none`` is None)."""
    if text.lower() in ('none', 'null', ''):
        return None
    kind = setting_of(_FIELDS[key]).type if key in _FIELDS else None
    try:
        return text if kind is None else kind(text)
    except ValueError:
        raise ValueError(f'{key}={text!r} is not {"an integer" if kind is int else "a number"}.') from None


def _arm_from_mapping(name: str, keys: Dict[str, Any], source: str) -> Arm:
    if name in ARMS:  # it would replace the built-in arm (standard is every comparison's reference)
        raise ValueError(f'{source}: {name!r} is a built-in arm; give the new arm another name (start from the '
                         f'built-in one with base={name}).')
    parent = keys.get('base')
    if parent is not None and parent not in ARMS:  # start from a built-in arm: {"base": "trades", "beta": 3}
        raise ValueError(f'{source}: base {parent!r} is not a built-in arm; accepted: {", ".join(ARMS)}.')
    given = {_ALIASES.get(k, k): v for k, v in keys.items() if k != 'base'}
    unknown = [k for k in given if k not in ARM_KEYS]
    if unknown:
        raise ValueError(f'{source}: unknown arm key {unknown[0]!r}; accepted: base, {", ".join(ARM_KEYS)} '
                         f'(lambda for adv_weight).')
    overrides = {**(ARMS[parent].overrides if parent else {}), **{k: v for k, v in given.items() if k in ARM_OVERRIDES}}
    try:
        return Arm(name, given.get('family', ARMS[parent].family if parent else 'nf'), overrides,
                   given.get('description') or '')
    except ValueError as e:
        raise ValueError(f'{source}: {e}') from None


def parse_arm_spec(spec: str) -> Arm:
    """``NAME:key=value,...`` (``--arm``), e.g. ``trades3:base=trades,beta=3`` or
    ``bn-fgsm:family=bn,batch_mode=separate,method=madry,attack=fgsm-rs``."""
    source = f'--arm {spec!r}'
    name, sep, rest = spec.partition(':')
    if not sep or not name.strip():
        raise ValueError(f'{source} is malformed: expected NAME:key=value,... (keys: base, {", ".join(ARM_KEYS)}).')
    keys: Dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in rest.split(','))):
        key, eq, value = item.partition('=')
        if not eq or not key.strip():
            raise ValueError(f'{source} is malformed at {item!r}: expected key=value.')
        key = key.strip()
        try:
            keys[key] = _value(_ALIASES.get(key, key), value.strip())
        except ValueError as e:
            raise ValueError(f'{source}: {e}') from None
    if not keys:
        raise ValueError(f'{source} sets no keys: expected NAME:key=value,... (keys: base, {", ".join(ARM_KEYS)}).')
    return _arm_from_mapping(name.strip(), keys, source)


def load_arms_file(path: Union[str, Path]) -> List[Arm]:
    """Arms from a JSON or YAML file: ``{"NAME": {"key": value, ...}, ...}``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'Arms file {path} does not exist.')
    is_yaml = path.suffix.lower() in ('.yaml', '.yml')
    try:
        if is_yaml:
            import yaml
        data = yaml.safe_load(path.read_text()) if is_yaml else json.loads(path.read_text())
    except Exception as e:  # json.JSONDecodeError, yaml.YAMLError
        raise ValueError(f'Arms file {path} is not valid {"YAML" if is_yaml else "JSON"}: '
                         f'{str(e).splitlines()[0]}') from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ValueError(f'Arms file {path} must map arm names to objects of keys, e.g. '
                         f'{{"trades3": {{"base": "trades", "beta": 3}}}}.')
    return [_arm_from_mapping(str(name), keys, f'arms file {path}, arm {name!r}') for name, keys in data.items()]


def resolve_arms(names: Iterable[str], custom: Iterable[Arm] = ()) -> List[Arm]:
    """The arms named in ``names`` (built-in or custom), in order; custom arms not named are appended."""
    custom = list(custom)
    table = {**ARMS, **{arm.name: arm for arm in custom}}
    chosen: List[Arm] = []
    for name in names:
        if name not in table:
            raise ValueError(f'Unknown arm {name!r}; built in: {", ".join(ARMS)}; add your own with --arm '
                             f'NAME:key=value,... or --arms-file.')
        if table[name] not in chosen:
            chosen.append(table[name])
    chosen += [arm for arm in custom if arm not in chosen]
    if not chosen:
        raise ValueError('The study has no arms.')
    return chosen


@dataclass
class ArmSelection:
    """Which arms (and runs) a study command runs: built-in names, arms defined on the command line or in a file."""
    arms: Optional[str] = setting(None, group='study', metavar='LIST',
                                  help='arms to run, comma-separated (see the list below)',
                                  default_help=f"{','.join(PAPER_ARMS)}, the paper's four; with --arm or --arms-file "
                                               f'and no --arms, the defined arms alone')
    arm: List[str] = setting(group='study', default_factory=list, append=True, metavar='NAME:KEY=VALUE,...',
                             help='define an arm (repeatable): keys base (a built-in arm to start from), family (nf | '
                                  'bn), batch_mode, method, attack, lambda (adv_weight), beta, steps, step_size, '
                                  'description; e.g. trades3:base=trades,beta=3. Defined arms run in addition to '
                                  '--arms', default_help='none')
    arms_file: Optional[str] = setting(None, group='study', metavar='FILE',
                                       help='arms from a JSON or YAML file: {"NAME": {"key": value, ...}, ...}')
    only: Optional[str] = setting(None, group='study', metavar='ARM[:SEED]',
                                  help='run (train and evaluate) only this arm, or this arm and seed, then update the '
                                       'report', default_help='every run')

    def resolve(self) -> Optional[List[Arm]]:
        """The arms: named ones (built-in or defined) in order, then defined ones not named; None: the preset's."""
        custom = (load_arms_file(self.arms_file) if self.arms_file else []) + [parse_arm_spec(s) for s in self.arm]
        names = [n.strip() for n in (self.arms or '').split(',') if n.strip()]
        if self.arms is not None and not names:
            raise ValueError(f'--arms {self.arms!r} names no arm; built in: {", ".join(ARMS)}.')
        if self.arms is None and not custom:
            return None
        return resolve_arms(names, custom)
