"""Training recipes through ``timm-nofrost train``: --adv-method / --adv-beta / --adv-attack reach the run,
its records and its checkpoints; resume keeps the recipe; the catastrophic-overfitting guard reports."""
import argparse
import json
from pathlib import Path

import pytest
import torch

from timm_nofrost.cli import main
from timm_nofrost.settings import add_settings, build_settings, settings_dict
from timm_nofrost.training.adversarial import AdversarialConfig
from timm_nofrost.training.presets import resolve
from timm_nofrost.data import write_image_folder
from timm_nofrost.training import AdversarialTrainer
from timm_nofrost.training.checkpointing import load_training_checkpoint

from conftest import TINY_ARGS, TINY_MODEL, interrupt_after_epochs

TINY_KWARGS = json.dumps({**TINY_ARGS, 'drop_rate': 0.0, 'drop_path_rate': 0.0})


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp('shapes')
    write_image_folder(root / 'train', 'train', num_samples=40, img_size=16)  # 4 batches of 10 per epoch
    write_image_folder(root / 'val', 'val', num_samples=15, img_size=16)
    return root


def tiny_args(data_dir: Path, out: Path, *extra: str) -> list:
    """A run of seconds: a narrow NF-ResNet at 16 px, 1 attack step, 6 attacked validation images."""
    return ['train', '--data', str(data_dir), '--model', TINY_MODEL, '--model-kwargs', TINY_KWARGS,
            '--img-size', '16', '-b', '10', '--epochs', '1', '--adv-steps', '1', '--robust-examples', '6',
            '--final-attacks', 'clean,pgd-3', '--eval-attack', 'pgd-3', '--out', str(out), '--no-progress', *extra]


def flags_config(*flags: str, presets=('recipe',)):
    """The AdversarialConfig the training commands build from ``flags`` (unset ones from ``presets``)."""
    parser = argparse.ArgumentParser()
    add_settings(parser, AdversarialConfig)
    return build_settings(AdversarialConfig, resolve(settings_dict(parser.parse_args(list(flags)), AdversarialConfig),
                                                     presets))


# -- flags -> AdversarialConfig ---------------------------------------------------------------------------------
def test_flags_reach_the_config_and_unset_ones_keep_its_defaults():
    cfg = flags_config()
    assert (cfg.method, cfg.attack, cfg.beta, cfg.adv_weight, cfg.steps) == ('nofrost', 'pgd', None, 0.5, 10)
    assert flags_config('--adv-weight', '0.75').adv_weight == 0.75  # --adv-weight keeps working
    assert flags_config('--adv-weight', '0', '--adv-steps', '0').adv_weight == 0.0  # standard training
    trades = flags_config('--adv-method', 'trades')
    assert (trades.method, trades.beta, trades.adv_weight) == ('trades', 6.0, None)
    assert flags_config('--adv-method', 'mart', '--adv-beta', '3').beta == 3.0
    assert flags_config('--adv-method', 'madry').adv_weight == 1.0
    # the command's PGD default (3 on the demo data) is for PGD; single-step attacks take their one step
    assert flags_config(presets=('demo',)).steps == 3
    assert flags_config('--adv-attack', 'fgsm-rs', presets=('demo',)).steps == 1
    nfgsm = flags_config('--adv-attack', 'n-fgsm', '--adv-method', 'trades')
    assert (nfgsm.attack, nfgsm.steps, nfgsm.method) == ('n-fgsm', 1, 'trades')


@pytest.mark.parametrize('flags, message', [
    (['--adv-method', 'pgd-at'], "Unknown method 'pgd-at'; accepted: nofrost, madry, trades, mart"),
    (['--adv-attack', 'fgsm'], "Unknown training attack 'fgsm'; accepted: pgd, fgsm-rs, n-fgsm"),
    (['--adv-beta', '3'], "does not apply to method='nofrost'"),
    (['--adv-method', 'madry', '--adv-beta', '3'], "does not apply to method='madry'"),
    (['--adv-method', 'trades', '--adv-weight', '0.5'], "does not apply to method='trades'"),
    (['--adv-method', 'mart', '--adv-beta', '-1'], 'beta must be a finite number >= 0'),
    (['--adv-method', 'madry', '--adv-weight', '0.5'], "method='madry' trains on adversarial examples only"),
    (['--adv-attack', 'n-fgsm', '--adv-steps', '3'], "attack='n-fgsm' takes one step"),
    (['--adv-attack', 'fgsm-rs', '--adv-no-random-start'], 'starts from random noise'),
    (['--adv-attack', 'n-fgsm', '--adv-norm', 'L2'], 'Linf norm only'),
])
def test_bad_recipe_flags_exit_2_with_one_line(data_dir, tmp_path, capsys, flags, message):
    out = tmp_path / 'out'
    assert main(tiny_args(data_dir, out, *flags)) == 2  # flags after tiny_args' own --adv-steps 1 win
    err = capsys.readouterr().err
    assert err.startswith('timm-nofrost train: error:') and message in err, err
    assert err.strip().count('\n') == 0 and not (out / 'checkpoint-last.pth').exists()


def test_help_explains_the_recipes(capsys):
    with pytest.raises(SystemExit):
        main(['train', '--help'])
    text = ' '.join(capsys.readouterr().out.split())
    for phrase in ('--adv-method METHOD', 'trades: loss(clean) + beta*KL(p(clean) || p(adv))', 'mart:',
                   'madry: loss(adv) only', '--adv-beta BETA', 'default: 6', '--adv-attack ATTACK',
                   'fgsm-rs: one step of 1.25*eps', 'n-fgsm: one step of eps', '(default: pgd)',
                   '(default: nofrost)'):
        assert phrase in text, phrase


# -- tiny runs ----------------------------------------------------------------------------------------------------
def test_trades_run_records_the_method(data_dir, tmp_path, capsys):
    out = tmp_path / 'run'
    assert main(tiny_args(data_dir, out, '--adv-method', 'trades', '--json')) == 0
    captured = capsys.readouterr()
    results = json.loads(captured.out)
    assert 'method trades, Linf eps 8/255, PGD-1 step' in captured.err and 'beta 6' in captured.err
    assert 'trained with trades on pgd examples' in captured.err  # the final table says how it was trained
    adv = json.loads((out / 'results.json').read_text())['config']['adv']
    assert (adv['method'], adv['beta'], adv['attack'], adv['adv_weight']) == ('trades', 6.0, 'pgd', None)
    assert results['config']['adv'] == adv
    row = json.loads((out / 'summary.jsonl').read_text().splitlines()[0])
    assert row['train_loss'] == pytest.approx(row['train_loss_clean'] + row['train_loss_robust'], rel=1e-4)
    assert row['catastrophic_overfitting'] is False
    state = load_training_checkpoint(out / 'checkpoint-last.pth')
    assert (state['task_state']['method'], state['task_state']['attack']) == ('trades', 'pgd')
    assert json.loads(state['adv_cfg'])['method'] == 'trades'


def test_n_fgsm_run_records_the_attack(data_dir, tmp_path, capsys):
    out = tmp_path / 'run'
    assert main(tiny_args(data_dir, out, '--adv-attack', 'n-fgsm')) == 0
    assert 'method nofrost, Linf eps 8/255, N-FGSM step 8/255, lambda 0.5' in capsys.readouterr().out
    adv = json.loads((out / 'results.json').read_text())['config']['adv']
    assert (adv['method'], adv['attack'], adv['steps']) == ('nofrost', 'n-fgsm', 1)
    state = load_training_checkpoint(out / 'checkpoint-last.pth')
    assert state['task_state']['attack'] == 'n-fgsm'


def test_resume_keeps_the_recipe_and_refuses_another(data_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / 'run'
    recipe = ('--adv-method', 'mart', '--adv-attack', 'fgsm-rs')
    interrupt_after_epochs(monkeypatch, 1)
    assert main(tiny_args(data_dir, out, '--epochs', '2', *recipe)) == 2
    capsys.readouterr()
    # another method: refused before any training, naming both
    assert main(tiny_args(data_dir, out, '--epochs', '2', '--resume')) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'was trained with other settings: ' in err
    assert '--adv-method mart (this command: nofrost)' in err and '--adv-attack fgsm-rs (this command: pgd)' in err
    # the same method with another attack: refused, naming both attacks
    assert main(tiny_args(data_dir, out, '--epochs', '2', '--adv-method', 'mart', '--resume')) == 2
    err = capsys.readouterr().err
    assert 'other settings: --adv-attack fgsm-rs (this command: pgd)' in err and '--adv-method' not in err
    assert [json.loads(x)['epoch'] for x in (out / 'summary.jsonl').read_text().splitlines()] == [1]
    # the same recipe continues
    assert main(tiny_args(data_dir, out, '--epochs', '2', *recipe, '--resume')) == 0
    assert 'epoch 1 of 2 done' in capsys.readouterr().out
    state = load_training_checkpoint(out / 'checkpoint-last.pth')
    assert state['epoch'] == 1 and state['task_state']['method'] == 'mart'


def test_resume_of_a_checkpoint_from_before_the_recipes_is_nofrost_pgd(data_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / 'run'
    interrupt_after_epochs(monkeypatch, 1)
    assert main(tiny_args(data_dir, out, '--epochs', '2')) == 2
    state = load_training_checkpoint(out / 'checkpoint-last.pth')
    del state['config']  # what an older checkpoint holds
    for key in ('method', 'attack'):
        del state['task_state'][key]
    cfg = json.loads(state['adv_cfg'])
    state['adv_cfg'] = json.dumps({k: v for k, v in cfg.items() if k not in ('method', 'attack', 'beta')})
    torch.save(state, out / 'checkpoint-last.pth')
    capsys.readouterr()
    assert main(tiny_args(data_dir, out, '--epochs', '2', '--adv-method', 'trades', '--resume')) == 2
    assert 'was trained with other settings: --adv-method nofrost (this command: trades)' in capsys.readouterr().err
    assert main(tiny_args(data_dir, out, '--epochs', '2', '--resume')) == 0


# -- the catastrophic-overfitting guard in a run ----------------------------------------------------------------------
def test_guard_flags_the_epoch_line_summary_and_final_table(data_dir, tmp_path, capsys, monkeypatch):
    """A scripted collapse: validation PGD accuracy 30 -> 40 -> 2 % (evaluation mocked) while the training
    attack's accuracy climbs 30 -> 40 -> 90 % (the trainer's ``acc_adv`` overridden per epoch)."""
    from timm_nofrost.training import run
    robust = iter([30.0, 40.0, 2.0])
    monkeypatch.setattr(run._Run, 'evaluate_epoch', lambda self: {
        'val_clean_top1': 80.0, 'val_robust_top1': next(robust), 'val_robust_attack': 'pgd-3',
        'val_robust_examples': 6})
    forward, calls = AdversarialTrainer.forward, []

    def scripted_forward(self, input, target):
        result = forward(self, input, target)
        calls.append(1)
        result['acc_adv'] = torch.tensor([0.3, 0.4, 0.9][(len(calls) - 1) // 4])  # 4 batches per epoch
        return result
    monkeypatch.setattr(AdversarialTrainer, 'forward', scripted_forward)
    out = tmp_path / 'run'
    assert main(tiny_args(data_dir, out, '--epochs', '3', '--adv-attack', 'fgsm-rs', '--json')) == 0
    captured = capsys.readouterr()
    epoch_lines = [line for line in captured.err.splitlines() if '] epoch ' in line]
    assert ['CATASTROPHIC OVERFITTING' in line for line in epoch_lines] == [False, False, True]
    assert '[nofrost] warning: catastrophic overfitting at epoch 3: validation pgd-3 accuracy fell from 40.0 % ' \
           '(epoch 2) to 2.0 %' in captured.err
    rows = [json.loads(x) for x in (out / 'summary.jsonl').read_text().splitlines()]
    assert [r['catastrophic_overfitting'] for r in rows] == [False, False, True]
    assert 'catastrophic_overfitting_message' not in rows[1]
    assert '--adv-attack n-fgsm' in rows[2]['catastrophic_overfitting_message']
    verdict = json.loads(captured.out)['runs']['nofrost']['catastrophic_overfitting']
    assert (verdict['epoch'], verdict['best_epoch'], verdict['attack_acc']) == (3, 2, pytest.approx(90.0))
    assert '| nofrost (catastrophic overfitting) |' in captured.err
    assert 'Warning: nofrost: catastrophic overfitting at epoch 3' in captured.err
