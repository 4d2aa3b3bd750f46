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
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Union

from ..training.config import AdversarialConfig

__all__ = ['Arm', 'ARMS', 'PAPER_ARMS', 'FAMILIES', 'ARM_KEYS', 'parse_arm_spec', 'load_arms_file', 'resolve_arms']

FAMILIES = ('nf', 'bn')


@dataclass(frozen=True)
class Arm:
    """One training recipe of a study.

    Args:
        name: Label used for folders, tables and ``--only`` (letters, digits, ``-``, ``_``, ``.``).
        family: ``'nf'`` trains the study's normalizer-free model (a BatchNorm model is converted with
            ``convert_to_normfree``); ``'bn'`` its BatchNorm twin (a normalizer-free model's timm twin at the same
            depth and width, or the BatchNorm model itself).
        batch_mode: ``AdversarialConfig.batch_mode``: ``separate`` (shared BN, two forwards: BN-AT), ``split``
            (one BN per half: MBN-AT), ``concat`` / ``auto``.
        method, attack, adv_weight, beta, steps, step_size: ``AdversarialConfig`` fields; unset (None) ones take the
            study's value (``steps``, ``step_size``) or the method's default (``adv_weight``, ``beta``).
        description: One line for reports.
    """
    name: str
    family: str = 'nf'
    batch_mode: str = 'auto'
    method: str = 'nofrost'
    attack: str = 'pgd'
    adv_weight: Optional[float] = None
    beta: Optional[float] = None
    steps: Optional[int] = None
    step_size: Optional[Union[float, str]] = None
    description: str = ''

    def __post_init__(self) -> None:
        if not self.name or not all(c.isalnum() or c in '-_.' for c in self.name):
            raise ValueError(f'Arm name {self.name!r} is not usable: use letters, digits, "-", "_" and ".".')
        if self.family not in FAMILIES:
            raise ValueError(f'Arm {self.name!r}: unknown family {self.family!r}; accepted: {", ".join(FAMILIES)}.')
        if self.family == 'nf' and self.batch_mode in ('separate', 'split'):
            raise ValueError(f'Arm {self.name!r}: batch_mode {self.batch_mode!r} needs BatchNorm layers; use '
                             f'family=bn, or batch_mode concat / auto for the normalizer-free model.')
        self.adversarial(eps=1.0)  # AdversarialConfig's checks of method, attack and weights, naming the arm

    @property
    def standard(self) -> bool:
        """Standard (clean) training: no adversarial examples."""
        return self.method == 'nofrost' and self.adv_weight == 0

    def adversarial(self, **study: Any) -> AdversarialConfig:
        """The arm's ``AdversarialConfig`` on top of the study's settings (eps, norm, steps, step size, ...)."""
        settings = dict(study)
        settings.update(method=self.method, attack=self.attack, batch_mode=self.batch_mode, beta=self.beta,
                        adv_weight=self.adv_weight)
        if self.standard:
            settings.update(steps=0, step_size=None)
        elif self.attack != 'pgd':  # single-step attacks take one step of their own size
            settings.update(steps=None, step_size=None)
        if self.steps is not None:
            settings['steps'] = self.steps
        if self.step_size is not None:
            settings['step_size'] = self.step_size
        try:
            return AdversarialConfig(**settings)
        except (TypeError, ValueError) as e:
            raise ValueError(f'Arm {self.name!r}: {e}') from None

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


ARM_KEYS = tuple(f.name for f in fields(Arm) if f.name != 'name')

ARMS: Dict[str, Arm] = {arm.name: arm for arm in (
    Arm('standard', 'nf', method='nofrost', adv_weight=0.0,
        description='standard training of the normalizer-free model (no adversarial examples)'),
    Arm('bn-standard', 'bn', method='nofrost', adv_weight=0.0,
        description='standard training of the BatchNorm twin'),
    Arm('bn-at', 'bn', batch_mode='separate', method='nofrost', adv_weight=0.5,
        description='BatchNorm twin, 0.5 clean + 0.5 adversarial loss, one BN shared by both (BN-AT)'),
    Arm('mbn-at', 'bn', batch_mode='split', method='nofrost', adv_weight=0.5,
        description='BatchNorm twin, 0.5 clean + 0.5 adversarial loss, separate BN for each (MBN-AT); '
                    'evaluated with the clean BN, as timm\'s split BN in eval mode'),
    Arm('nofrost', 'nf', method='nofrost', adv_weight=0.5,
        description='normalizer-free model, 0.5 clean + 0.5 adversarial loss (NoFrost)'),
    Arm('madry', 'nf', method='madry', description='normalizer-free model, adversarial loss only (Madry AT)'),
    Arm('bn-madry', 'bn', batch_mode='separate', method='madry',
        description='BatchNorm twin, adversarial loss only (Madry AT)'),
    Arm('trades', 'nf', method='trades', description='normalizer-free model, TRADES (beta 6)'),
    Arm('bn-trades', 'bn', batch_mode='separate', method='trades', description='BatchNorm twin, TRADES (beta 6)'),
    Arm('mart', 'nf', method='mart', description='normalizer-free model, MART (beta 6)'),
    Arm('fast-at', 'nf', method='madry', attack='fgsm-rs',
        description='normalizer-free model, FGSM-RS fast AT (Wong et al. 2020)'),
    Arm('bn-fast-at', 'bn', batch_mode='separate', method='madry', attack='fgsm-rs',
        description='BatchNorm twin, FGSM-RS fast AT (Wong et al. 2020)'),
    Arm('n-fgsm', 'nf', method='madry', attack='n-fgsm',
        description='normalizer-free model, N-FGSM single-step AT (de Jorge et al. 2022)'),
)}
PAPER_ARMS = ('standard', 'bn-at', 'mbn-at', 'nofrost')


def _value(key: str, text: str) -> Any:
    """A value of an ``--arm`` spec: numbers as numbers, ``none`` as None, anything else as text."""
    if text.lower() in ('none', 'null', ''):
        return None
    if key in ('steps',):
        try:
            return int(text)
        except ValueError:
            raise ValueError(f'{key}={text!r} is not an integer.') from None
    if key in ('adv_weight', 'beta'):
        try:
            return float(text)
        except ValueError:
            raise ValueError(f'{key}={text!r} is not a number.') from None
    return text


def _arm_from_mapping(name: str, keys: Dict[str, Any], source: str) -> Arm:
    aliases = {'lambda': 'adv_weight', 'weight': 'adv_weight', 'batch-mode': 'batch_mode', 'step-size': 'step_size',
               'adv-weight': 'adv_weight'}
    base: Dict[str, Any] = {}
    if 'base' in keys:  # start from a built-in arm: {"base": "trades", "beta": 3}
        parent = keys['base']
        if parent not in ARMS:
            raise ValueError(f'{source}: base {parent!r} is not a built-in arm; accepted: {", ".join(ARMS)}.')
        base = {k: v for k, v in ARMS[parent].to_dict().items() if k not in ('name', 'description')}
    settings = dict(base)
    for key, value in keys.items():
        if key == 'base':
            continue
        key = aliases.get(key, key)
        if key not in ARM_KEYS:
            raise ValueError(f'{source}: unknown arm key {key!r}; accepted: base, {", ".join(ARM_KEYS)} '
                             f'(lambda for adv_weight).')
        settings[key] = value
    try:
        return Arm(name, **settings)
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
            keys[key] = _value(key.replace('-', '_') if key != 'lambda' else 'adv_weight', value.strip())
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
    text = path.read_text()
    try:
        if path.suffix.lower() in ('.yaml', '.yml'):
            import yaml
            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:  # json.JSONDecodeError, yaml.YAMLError
        raise ValueError(f'Arms file {path} is not valid {"YAML" if path.suffix in (".yaml", ".yml") else "JSON"}: '
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
