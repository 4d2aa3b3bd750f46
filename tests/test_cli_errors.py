"""Every subcommand refuses bad input in one line: exit status 2, one line on stderr naming the bad value, no
traceback. One shared list of bad inputs (files, models, folders, numbers, JSON), applied to every subcommand that
takes such an input."""
import pickle
from pathlib import Path

import pytest
import timm
import torch

from timm_nofrost.cli import main

TINY = ['--model', 'nf_resnet18_cifar_nofrost', '--model-kwargs', '{"channels": [8, 8, 16, 16], "stem_chs": 8}']


class _RunsCode:
    def __reduce__(self):
        return (print, ('this pickle would run code',))


@pytest.fixture(scope='module')
def bad(tmp_path_factory) -> dict:
    """The bad inputs: file paths and values, each one a user could plausibly pass."""
    root = tmp_path_factory.mktemp('bad_inputs')
    text = root / 'notes.txt'
    text.write_text('root:x:0:0:root:/root:/bin/bash\n')
    good = root / 'weights.pth'
    torch.save(timm.create_model('nf_resnet18_cifar_nofrost', channels=(8, 8, 16, 16), stem_chs=8).state_dict(), good)
    truncated = root / 'truncated.pth'
    truncated.write_bytes(good.read_bytes()[:2000])
    code = root / 'code.pth'
    code.write_bytes(pickle.dumps({'state_dict': _RunsCode()}, protocol=2))
    other = root / 'resnet18.pth'
    torch.save(timm.create_model('resnet18', num_classes=10).state_dict(), other)
    a_file = root / 'a_file'
    a_file.write_text('x')
    return {
        '{missing}': str(root / 'missing.pth'), '{text}': str(text), '{truncated}': str(truncated),
        '{code}': str(code), '{other}': str(other), '{good}': str(good),
        '{unwritable}': str(a_file / 'out'),  # under a regular file: no folder can be made there (even as root)
        '{root}': str(root),
    }


# (subcommand argv with placeholders, text the one-line error must contain: the bad value or what is wrong)
CASES = [
    # missing files
    (['eval', *TINY, '--checkpoint', '{missing}', '--data', 'demo'], '{missing}'),
    (['shift', *TINY, '--checkpoint', '{missing}', '--benchmark', 'imagenet-r', '--root', '{root}'], '{missing}'),
    (['convert', '--model', 'resnet18', '--checkpoint', '{missing}', '--out', '{root}/c1'], '{missing}'),
    (['export', '{missing}', '--out', '{root}/e1'], '{missing}'),
    (['push', '{missing}', '--repo-id', 'org/name'], '{missing}'),
    (['timm-train', '{missing}'], '{missing}'),
    (['train', *TINY, '--resume', '{missing}', '--out', '{root}/t1'], '{missing}'),
    (['study', '--arms-file', '{missing}', '--out', '{root}/s1'], '{missing}'),
    # a text file where a checkpoint (or arms file) belongs
    (['eval', *TINY, '--checkpoint', '{text}', '--data', 'demo'], "'{text}' is not a PyTorch or safetensors"),
    (['shift', *TINY, '--checkpoint', '{text}', '--benchmark', 'imagenet-r', '--root', '{root}'], '{text}'),
    (['convert', '--model', 'resnet18', '--checkpoint', '{text}', '--out', '{root}/c2'], '{text}'),
    (['export', '{text}', '--out', '{root}/e2'], "'{text}' is not a PyTorch or safetensors"),
    (['train', *TINY, '--resume', '{text}', '--out', '{root}/t2'], '{text}'),
    (['study', '--arms-file', '{text}', '--out', '{root}/s2'], 'Arms file {text} is not valid JSON'),
    # a truncated checkpoint
    (['eval', *TINY, '--checkpoint', '{truncated}', '--data', 'demo'], '{truncated}'),
    (['export', '{truncated}', '--out', '{root}/e3'], '{truncated}'),
    (['train', *TINY, '--resume', '{truncated}', '--out', '{root}/t3'], '{truncated}'),
    # a pickle that would run code: refused, never executed
    (['eval', *TINY, '--checkpoint', '{code}', '--data', 'demo'], "refusing to load checkpoint '{code}'"),
    (['convert', '--model', 'resnet18', '--checkpoint', '{code}', '--out', '{root}/c3'], 'refusing to load'),
    (['export', '{code}', '--out', '{root}/e4'], 'refusing to load'),
    (['train', *TINY, '--resume', '{code}', '--out', '{root}/t4'], 'refusing to load'),
    # a checkpoint of another architecture
    (['eval', *TINY, '--checkpoint', '{other}', '--data', 'demo'], "checkpoint '{other}' does not fit"),
    (['shift', *TINY, '--checkpoint', '{other}', '--benchmark', 'imagenet-r', '--root', '{root}'], 'does not fit'),
    (['export', '{other}', '--model', 'nf_resnet18_cifar_nofrost', '--out', '{root}/e5'], "'{other}': state_dict does not fit"),
    (['train', *TINY, '--resume', '{other}', '--out', '{root}/t5'], '{other} is not a timm-nofrost training'),
    # unknown models
    (['eval', '--model', 'nope_net', '--data', 'demo'], "Unknown model 'nope_net'"),
    (['shift', '--model', 'nope_net', '--benchmark', 'imagenet-r', '--root', '{root}'], "Unknown model 'nope_net'"),
    (['convert', '--model', 'nope_net', '--out', '{root}/c4'], "'nope_net'"),
    (['export', '{good}', '--model', 'nope_net', '--out', '{root}/e6'], "'nope_net'"),
    (['train', '--model', 'nope_net', '--out', '{root}/t6'], "Unknown model 'nope_net'"),
    (['study', '--model', 'nope_net', '--out', '{root}/s3'], "'nope_net'"),
    # unwritable output folders
    (['train', *TINY, '--out', '{unwritable}'], '{unwritable}'),
    (['study', *TINY, '--out', '{unwritable}'], '{unwritable}'),
    (['convert', '--model', 'resnet18', '--out', '{unwritable}'], '{unwritable}'),
    (['export', '{good}', '--model', 'nf_resnet18_cifar_nofrost', '--out', '{unwritable}'], '{unwritable}'),
    # malformed numbers
    (['train', '--epochs', 'ten'], "invalid int value: 'ten'"),
    (['train', '--adv-eps', '8/o'], "'8/o'"),
    (['study', '--seeds', '0,x'], "'0,x'"),
    (['study', '--curve-eps', '1,y'], "'1,y'"),
    (['eval', *TINY, '--data', 'demo', '--eps', 'big'], "'big'"),
    (['eval', *TINY, '--data', 'demo', '--batch-size', '-3'], '-3'),
    (['shift', *TINY, '--benchmark', 'imagenet-r', '--root', '{root}', '--severities', '1,nine'], 'nine'),
    (['convert', '--model', 'resnet18', '--out', '{root}/c5', '--alpha', 'much'], "'much'"),
    (['export', '{good}', '--out', '{root}/e7', '--num-classes', 'ten'], "'ten'"),
    (['timm-train', '{text}', '--adv-val-examples', 'many'], "'many'"),
    # malformed JSON
    (['eval', '--model', 'nf_resnet18_cifar_nofrost', '--model-kwargs', '{"channels": [8,', '--data', 'demo'],
     'argument --model-kwargs: not valid JSON'),
    (['train', '--model-kwargs', '[1, 2]'], 'argument --model-kwargs: must be a JSON object'),
    (['study', '--model-kwargs', '{oops}'], 'argument --model-kwargs: not valid JSON'),
    # an unknown flag
    (['models', '--colour'], 'unrecognized arguments: --colour'),
]


@pytest.mark.parametrize('argv, expected', CASES, ids=[f'{c[0][0]}-{i}' for i, c in enumerate(CASES)])
def test_bad_input_is_one_line_naming_it(bad, capsys, argv, expected):
    argv = [_fill(a, bad) for a in argv]
    try:
        code = main(argv)
    except SystemExit as e:  # argparse exits itself
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith('timm-nofrost'), err  # the subcommand's prefix, or the top level's (unknown flags)
    assert _fill(expected, bad) in lines[0], err
    assert 'Traceback' not in err
    assert 'this pickle would run code' not in capsys.readouterr().out


def _fill(text: str, bad: dict) -> str:
    for key, value in bad.items():
        text = text.replace(key, value)
    return text


def test_a_programming_error_is_not_hidden_as_a_user_error(monkeypatch):
    """A TypeError from a bug surfaces with its traceback, not as a one-line 'user error'."""
    import timm_nofrost.cli.models as models_cli

    def broken(args):
        raise TypeError('a bug')

    monkeypatch.setattr(models_cli, 'run', broken)  # build_parser() binds the subcommand's run at each main()
    with pytest.raises(TypeError, match='a bug'):
        main(['models'])
