"""Settings as data: one dataclass field per setting carries its flag, help text, group and default.

``setting(...)`` declares a field; ``add_settings`` turns the fields of one or more dataclasses into argparse
arguments (the subcommands' parsers are generated this way, never written by hand); ``settings_dict`` and
``build_settings`` build a dataclass from the parsed arguments, so no field is copied from one config into
another by hand.
A default the command resolves later (``None``: the recipe's, or a preset's) is described by the presets
registry (``timm_nofrost.training.presets``) in the help text, so the help can never disagree with it.

Shared groups, used by every subcommand that has them: ``DataSettings``, ``ModelSettings``, ``RunSettings``.
"""
import argparse
import json
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence

__all__ = ['Setting', 'setting', 'setting_of', 'flag_of', 'iter_settings', 'add_settings', 'settings_dict',
           'build_settings', 'json_object', 'int_list', 'float_list', 'AMP_CHOICES', 'GROUP_TITLES', 'DataSettings',
           'ModelSettings', 'RunSettings']

_KEY = 'timm_nofrost.setting'
AMP_CHOICES = ('none', 'bf16', 'bfloat16', 'fp16', 'float16')
_LAST_GROUPS = ('run', 'output')
GROUP_TITLES = {
    'augmentation': "augmentation (timm's training transform)",
    'adversarial': 'adversarial training (defaults: the NoFrost recipe)',
    'robust-validation': "robust validation (after each of timm's validations)",
    'protocol': 'evaluation protocol (the same for every model)',
}


@dataclass(frozen=True)
class Setting:
    """How a dataclass field appears on the command line (see ``setting``)."""
    help: str
    group: str
    flag: Optional[str] = None
    short: Optional[str] = None
    type: Optional[Callable[[str], Any]] = None
    choices: Optional[Sequence[Any]] = None
    metavar: Optional[Any] = None
    nargs: Optional[Any] = None
    const: Any = None
    negate: bool = False  # a ``--no-...`` flag that stores False into a field that defaults to True
    append: bool = False  # repeatable: each use appends to a list
    outcome: bool = True  # False: cannot change what a run computes (progress, workers, device)
    default_help: Optional[str] = None  # the default in words, for values resolved after parsing


def setting(default: Any = MISSING, *, help: str, group: str, default_factory: Any = MISSING, **cli: Any) -> Any:
    """A dataclass field with its command-line definition (``cli``: the ``Setting`` fields but ``help``/``group``)."""
    meta = {_KEY: Setting(help=help, group=group, **cli)}
    return field(default=default, default_factory=default_factory, metadata=meta)


def setting_of(f: Any) -> Optional[Setting]:
    return f.metadata.get(_KEY)


def flag_of(f: Any) -> str:
    """The field's long flag: its own, else ``--`` and the name with dashes (``--no-NAME`` for negated ones)."""
    s = setting_of(f)
    return s.flag or '--' + ('no-' if s.negate else '') + f.name.replace('_', '-')


def _default(f: Any) -> Any:
    if f.default is not MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not MISSING else None


def iter_settings(cls: Any, exclude: Iterable[str] = ()) -> Iterator[Any]:
    """The fields of ``cls`` that are settings, nested dataclass settings (``nested=``) flattened in place."""
    skip = set(exclude)
    for f in fields(cls):
        if f.name in skip:
            continue
        nested = f.metadata.get('nested')
        if nested is not None:
            yield from iter_settings(nested, skip | set(f.metadata.get('exclude', ())))
        elif setting_of(f) is not None:
            yield f


def _format(value: Any, sep: str = ',') -> str:
    if isinstance(value, (list, tuple)):
        return sep.join(f'{v:g}' if isinstance(v, float) else str(v) for v in value)
    return str(value)


def help_text(f: Any, presets: Mapping[str, Mapping[str, Any]] = {}) -> str:
    """The field's help with its default: the dataclass default, the presets' values, or ``default_help``."""
    s, default = setting_of(f), _default(f)
    sep = ' ' if s.nargs else ','
    if s.default_help is not None:
        said = s.default_help
    elif default is None or isinstance(default, bool):
        said = '; '.join(f'{label} {_format(p[f.name], sep)}' for label, p in presets.items()
                         if p.get(f.name) is not None)
    else:
        said = _format(default, sep)
    text = s.help.replace('%', '%%')
    return f'{text} (default: {said})' if said else text


def _argument(f: Any, presets: Mapping[str, Mapping[str, Any]], required: bool) -> Dict[str, Any]:
    """``add_argument`` keyword arguments of one setting."""
    s = setting_of(f)
    default = _default(f)
    kwargs: Dict[str, Any] = dict(dest=f.name, help=help_text(f, presets), default=default)
    if s.negate:
        kwargs['action'] = 'store_false'
    elif s.append:
        kwargs.update(action='append', metavar=s.metavar)
    elif isinstance(default, bool) and s.type is None:
        kwargs['action'] = 'store_true'
    else:
        kwargs.update(type=s.type, choices=s.choices, metavar=s.metavar, nargs=s.nargs, const=s.const)
        if required:
            kwargs.update(required=True, default=None)
    return {k: v for k, v in kwargs.items() if v is not None or k == 'default'}


def add_settings(parser: argparse.ArgumentParser, *classes: Any, exclude: Iterable[str] = (),
                 required: Iterable[str] = (), presets: Mapping[str, Mapping[str, Any]] = {},
                 titles: Mapping[str, str] = GROUP_TITLES) -> None:
    """Add an argument for every setting of ``classes``, in argument groups by ``Setting.group`` (in the order
    they first appear, run and output last).

    ``exclude``: field names the command does not take; ``required``: fields the command needs given;
    ``presets``: the presets whose values the help names for ``None`` defaults; ``titles``: group titles (an
    existing group of the same key is reused).
    """
    groups: Dict[str, Any] = {g._setting_key: g for g in parser._action_groups if hasattr(g, '_setting_key')}
    need = set(required)
    chosen = [f for cls in classes for f in iter_settings(cls, exclude)]
    order = list(dict.fromkeys(setting_of(f).group for f in chosen))
    order.sort(key=lambda g: g in _LAST_GROUPS)
    for f in sorted(chosen, key=lambda f: order.index(setting_of(f).group)):
        s = setting_of(f)
        if s.group not in groups:
            groups[s.group] = parser.add_argument_group(titles.get(s.group, s.group))
            groups[s.group]._setting_key = s.group
        flags = ([s.short] if s.short else []) + [flag_of(f)]
        groups[s.group].add_argument(*flags, **_argument(f, presets, f.name in need))


def settings_dict(args: argparse.Namespace, cls: Any, exclude: Iterable[str] = ()) -> Dict[str, Any]:
    """The parsed values of ``cls``'s settings (nested ones flattened in), by field name."""
    return {f.name: getattr(args, f.name) for f in iter_settings(cls, exclude) if hasattr(args, f.name)}


def build_settings(cls: Any, values: Mapping[str, Any], **fixed: Any) -> Any:
    """``cls`` from a flat mapping of field values (``settings_dict``), nested settings built from the same
    mapping (less the fields the nesting excludes); ``fixed`` sets the fields the caller decides itself."""
    kwargs: Dict[str, Any] = {}
    for f in fields(cls):
        if f.name in fixed:
            kwargs[f.name] = fixed[f.name]
        elif f.metadata.get('nested') is not None:
            exclude = set(f.metadata.get('exclude', ()))
            kwargs[f.name] = build_settings(f.metadata['nested'], {k: v for k, v in values.items() if k not in exclude})
        elif f.name in values:
            kwargs[f.name] = values[f.name]
    return cls(**kwargs)


def _list_of(kind: Callable[[str], Any], what: str) -> Callable[[str], List[Any]]:
    """An argparse type: comma-separated ``kind`` values (``--seeds 0,1,2``, ``--curve-eps 0.5,1,2``)."""
    def parse(text: str) -> List[Any]:
        try:
            values = [kind(v) for v in text.split(',') if v.strip()]
        except ValueError:
            values = []
        if not values:  # an empty list is no request for the default
            raise argparse.ArgumentTypeError(f'expected comma-separated {what}, got {text!r}')
        return values
    return parse


int_list, float_list = _list_of(int, 'integers'), _list_of(float, 'numbers')


def json_object(text: str) -> Dict[str, Any]:
    """An argparse type: a JSON object (``--model-kwargs``)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f'not valid JSON ({e.msg}): {text!r}') from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f'must be a JSON object, got {text!r}')
    return value


# -- the shared groups ------------------------------------------------------------------------------------
@dataclass
class DataSettings:
    """Where images come from: the same flags and defaults in ``train``, ``study`` and ``eval``."""
    data: str = setting(
        'demo', group='data', metavar='SOURCE',
        help="'demo' (the embedded shapes, no download), an ImageFolder directory (ROOT/<class>/<image>, or "
             'ROOT/train and ROOT/val), or a timm dataset name such as torch/cifar10 with --data-dir '
             '(torch/cifar10:ROOT works too)')
    data_dir: Optional[str] = setting(None, group='data', metavar='DIR', help='root folder for a timm dataset name')
    val_fraction: Optional[float] = setting(
        None, group='data', type=float, metavar='F',
        help='held-out fraction of a single folder of class folders (no val/ folder): train holds it out and '
             'validates on it, eval evaluates just that part (as trained with the same --split-seed)',
        default_help='train 0.1; eval the whole folder')
    split_seed: Optional[int] = setting(
        None, group='data', type=int, metavar='SEED',
        help='seed of that held-out split', default_help="train: --seed; study and eval: 0")
    num_classes: Optional[int] = setting(None, group='data', type=int, metavar='N',
                                         help='number of classes', default_help="from the data, or the model's")
    img_size: Optional[int] = setting(None, group='data', type=int, metavar='PX', help='input resolution',
                                      default_help="the model's; 32 on the demo data; 16 in the demo study")
    workers: int = setting(0, group='data', type=int, metavar='N', outcome=False,
                           help='data loading processes (0: load in the main process)')


@dataclass
class ModelSettings:
    """Which timm model to build and how: the same flags in every command that builds one."""
    model: Optional[str] = setting(None, group='model', metavar='NAME',
                                   help='timm model name (hf-hub:ORG/NAME and local-dir:DIR work too)')
    model_kwargs: Dict[str, Any] = setting(
        group='model', default_factory=dict, type=json_object, metavar='JSON', default_help='none',
        help='extra create_model arguments as a JSON object, e.g. \'{"channels": [16, 32, 64, 128]}\' '
             '(timm-nofrost train prints the ones its checkpoints need)')
    pretrained: bool = setting(False, group='model', help="start from the model's pretrained weights")
    convert: bool = setting(False, group='model',
                            help='a BatchNorm model made normalizer-free by the converter (convert_to_normfree): '
                                 'train converts it before training, eval and export before loading the checkpoint')


@dataclass
class RunSettings:
    """Where and how the computation runs: the same flags in every command that computes."""
    device: Optional[str] = setting(None, group='run', metavar='DEVICE', help='torch device', outcome=False,
                                    default_help='cuda if available, else cpu')
    amp: Optional[str] = setting(None, group='run', choices=AMP_CHOICES,
                                 help='autocast (mixed precision) dtype', default_help='off')
    progress: bool = setting(True, group='run', negate=True, outcome=False,
                             help='no progress bars: a line on stderr when a long step finishes, at most every 10 s')

    def torch_device(self) -> Any:
        """``device`` as a ``torch.device``; unset: cuda if available, else cpu."""
        import torch
        return torch.device(self.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
