"""``timm-nofrost study``: arms x seeds as train runs, one evaluation protocol, a report built from the runs.

Tiny models on a small ImageFolder written from the demo shapes; every check of a report number compares it with
the run's own files (eval.json, results.json), recomputed here."""
import json
import statistics
from pathlib import Path

import pytest

from timm_nofrost.cli import main
from conftest import image_folders
from timm_nofrost.study import ARMS, Arm, load_arms_file, parse_arm_spec, resolve_arms, verdict
from timm_nofrost.study.aggregate import collect_study


@pytest.fixture(scope='module')
def data_root(tmp_path_factory) -> Path:
    return image_folders(tmp_path_factory.mktemp('study_data'), train=48, val=20)


def study_args(data_root: Path, out: Path, *extra: str, arms='nofrost,bn-at', seeds='0,1', epochs='2') -> list:
    return ['study', '--data', str(data_root), '--img-size', '16', '--model', 'nf_resnet18_cifar_nofrost',
            '--model-kwargs', '{"channels": [8, 8, 16, 16], "stem_chs": 8}', '--arms', arms, '--seeds', seeds,
            '--epochs', epochs, '-b', '16', '--opt', 'adamw', '--adv-steps', '1', '--robust-examples', '12',
            '--eval-attack', 'pgd-2', '--eval-examples', '12', '--eval-attacks', 'clean,pgd-3,apgd-ce-4',
            '--curve-attack', 'pgd-2', '--curve-eps', '0.5,2', '--no-analysis', '--deterministic', '--no-progress',
            '--out', str(out), *extra]


def run_cli(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's one-line usage errors (OneLineErrorParser), exit status 2
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope='module')
def finished_study(data_root, tmp_path_factory):
    """A 2-arm x 2-seed study run to the end, uninterrupted (deterministic)."""
    out = tmp_path_factory.mktemp('study') / 'full'
    assert main(study_args(data_root, out, '--json')) == 0
    return out


def _eval(out: Path, arm: str, seed: int) -> dict:
    return json.loads((out / 'runs' / arm / f'seed-{seed}' / 'eval.json').read_text())


def _numbers(report: dict) -> dict:
    """Every accuracy and analysis number of a report (times excluded: they differ from run to run)."""
    return {arm: {metric: stats['values'] for metric, stats in arm_stats.items()
                  if metric not in ('train_time_s', 'eval_time_s', 'cost_vs_standard')}
            for arm, arm_stats in report['arms'].items()}


def test_report_numbers_are_the_runs_own(finished_study):
    out = finished_study
    report = json.loads((out / 'report.json').read_text())
    assert report['missing'] == []
    assert report['arm_order'] == ['nofrost', 'bn-at'] and sorted(report['arms']) == ['bn-at', 'nofrost']
    images = set()
    for arm in ('nofrost', 'bn-at'):
        stats = report['arms'][arm]
        for seed in (0, 1):
            ev = _eval(out, arm, seed)
            protocol = ev['protocol']
            assert protocol['n_examples'] == 12 and protocol['eps'] == [pytest.approx(8 / 255)]
            images.add(ev['data']['images_sha256'])
            acc = protocol['accuracy']['8/255']
            # per-example outcomes recount to the accuracies the report shows
            per = protocol['per_example']['8/255']
            for attack in ('pgd-3', 'apgd-ce-4', 'worst-case'):
                assert stats[attack]['values'][str(seed)] == pytest.approx(100 * acc[attack])
                assert 100 * acc[attack] == pytest.approx(100 * sum(per[attack]) / 12)
            assert stats['clean']['values'][str(seed)] == pytest.approx(100 * protocol['clean_accuracy'])
            # the train run's own final clean accuracy: the same 12 images (robust-examples = eval-examples)
            results = json.loads((out / 'runs' / arm / f'seed-{seed}' / 'results.json').read_text())
            run = next(iter(results['runs'].values()))
            assert stats['clean']['values'][str(seed)] == pytest.approx(run['final']['accuracy']['clean'])
            train_time = sum(e['train_time_s'] for e in run['epochs'])
            assert stats['train_time_s']['values'][str(seed)] == pytest.approx(train_time)
            assert ev['epochs_trained'] == 2 and len(run['epochs']) == 2
        for metric in ('clean', 'pgd-3', 'apgd-ce-4', 'worst-case'):
            values = [stats[metric]['values'][s] for s in ('0', '1')]
            assert stats[metric]['mean'] == pytest.approx(statistics.fmean(values))
            assert stats[metric]['std'] == pytest.approx(statistics.stdev(values))
    assert len(images) == 1, 'every run must be evaluated on the same images'
    # the curve: eps 0 is the clean accuracy, the others the curve attack at 0.5 and 2 eps
    ev = _eval(out, 'nofrost', 1)
    assert report['curves']['nofrost']['0.0']['values']['1'] == pytest.approx(100 * ev['curve']['clean_accuracy'])
    assert report['curves']['nofrost']['2.0']['values']['1'] == pytest.approx(
        100 * ev['curve']['accuracy']['16/255']['pgd-2'])
    # the Markdown table shows the same means
    md = (out / 'report.md').read_text()
    for arm in ('nofrost', 'bn-at'):
        clean = report['arms'][arm]['clean']
        assert f"| {arm} | 2 | {clean['mean']:.1f} ± {clean['std']:.1f} |" in md
    assert (out / 'clean_vs_robust.png').stat().st_size > 1000 and (out / 'robust_vs_eps.png').is_file()


def test_verdict_is_written_from_the_numbers(finished_study):
    report = json.loads((finished_study / 'report.json').read_text())
    arms = report['arms']
    leader = max(arms, key=lambda a: arms[a]['clean']['mean'])
    other = min(arms, key=lambda a: arms[a]['clean']['mean'])
    assert report['verdict'][0].startswith(f'Clean accuracy: {leader} leads')
    assert f"{arms[leader]['clean']['mean'] - arms[other]['clean']['mean']:.1f} points above {other}" \
        in report['verdict'][0]
    md = (finished_study / 'report.md').read_text()
    assert md.splitlines()[2] == f"- {report['verdict'][0]}"
    assert any('AutoAttack was not part of this evaluation' in line for line in report['verdict'])


def _synthetic(values_a, values_b):
    def stats(values):
        return {'mean': statistics.fmean(values), 'std': statistics.stdev(values) if len(values) > 1 else None,
                'min': min(values), 'max': max(values), 'n': len(values)}
    return {'arms': {'nofrost': {'clean': stats(values_a), 'autoattack': stats(values_a)},
                     'bn-at': {'clean': stats(values_b), 'autoattack': stats(values_b)}},
            'attacks': ['autoattack'], 'robust_metric': 'autoattack', 'runs': {}, 'missing': [], 'notes': []}


def test_verdict_tells_separated_from_overlapping_seeds():
    separated = verdict(_synthetic([60.0, 61.0, 62.0], [50.0, 52.0, 59.5]))
    assert separated[0] == ('Clean accuracy: nofrost leads (61.0 %), 7.2 points above bn-at (53.8 %); every seed of '
                            'nofrost is above every seed of bn-at: beyond the seed spread.')
    overlapping = verdict(_synthetic([50.0, 52.0, 60.5], [55.0, 56.0, 57.0]))
    assert overlapping[0].startswith('Clean accuracy: bn-at leads (56.0 %), 1.8 points above nofrost')
    assert overlapping[0].endswith('the seed ranges overlap: within the seed spread.')
    assert "NoFrost against bn-at (the paper's comparison): clean accuracy -1.8 points" in overlapping[2]
    single = verdict(_synthetic([50.0], [40.0]))
    assert single[0].endswith('one seed on a side: no spread to judge it against.')


def test_interrupted_study_resumes_to_the_same_report(finished_study, data_root, tmp_path, capsys, monkeypatch):
    from timm_nofrost.training import run as run_module
    out = tmp_path / 'interrupted'
    original_save, saves = run_module._Run._save, []

    def save_then_stop(self, epoch, metrics):  # the 5th checkpoint: bn-at seed 0 after its first epoch
        original_save(self, epoch, metrics)
        saves.append(self.out_dir)
        if len(saves) == 5:
            raise KeyboardInterrupt

    monkeypatch.setattr(run_module._Run, '_save', save_then_stop)
    code, _, err = run_cli(study_args(data_root, out), capsys)
    assert code == 130 and 'interrupted' in err
    monkeypatch.setattr(run_module._Run, '_save', original_save)

    # the report of the partial study lists what is missing, and why
    code, stdout, _ = run_cli(['study', 'report', str(out), '--json'], capsys)
    assert code == 0
    partial = json.loads(stdout)
    assert [(m['arm'], m['seed'], m['detail']) for m in partial['missing']] == [
        ('bn-at', 0, '1 epoch(s) done: still running, or interrupted (run the study again to resume)'),
        ('bn-at', 1, 'not started')]
    assert list(partial['arms']) == ['nofrost'] and partial['arms']['nofrost']['clean']['n'] == 2
    assert partial['arm_order'] == ['nofrost', 'bn-at']
    assert '## Not finished' in (out / 'report.md').read_text()

    trained = []
    real_train = run_module.train

    def spy(cfg, model=None):
        trained.append((Path(cfg.out_dir).parent.name, Path(cfg.out_dir).name, cfg.resume))
        return real_train(cfg, model=model)

    monkeypatch.setattr(run_module, 'train', spy)
    code, stdout, err = run_cli(study_args(data_root, out), capsys)
    assert code == 0, err
    assert trained == [('bn-at', 'seed-0', 'auto'), ('bn-at', 'seed-1', None)]  # finished runs skipped
    assert 'nofrost seed 0: finished, skipped' in stdout
    resumed = json.loads((out / 'report.json').read_text())
    reference = json.loads((finished_study / 'report.json').read_text())
    assert _numbers(resumed) == _numbers(reference)
    assert resumed['curves'] == reference['curves']


def test_only_runs_one_arm_and_seed(data_root, tmp_path, capsys, monkeypatch):
    out = tmp_path / 'only'
    code, _, err = run_cli(study_args(data_root, out, '--only', 'bn-at:1', epochs='1'), capsys)
    assert code == 0, err
    assert sorted(p.parent.name + '/' + p.name for p in (out / 'runs').glob('*/*')) == ['bn-at/seed-1']
    result = collect_study(out)
    assert list(result['arms']) == ['bn-at']
    assert len(result['missing']) == 3


@pytest.mark.parametrize('extra, message', [
    (['--arm', 'trades3'], "--arm 'trades3' is malformed: expected NAME:key=value"),
    (['--arm', 'x:beta'], "malformed at 'beta': expected key=value"),
    (['--arm', 'x:bogus=1'], "unknown arm key 'bogus'; accepted: base, family"),
    (['--arm', 'x:base=trades,beta=lots'], "beta='lots' is not a number"),
    (['--arm', 'x:family=nf,batch_mode=split'], "batch_mode 'split' needs BatchNorm layers"),
    (['--arm', 'x:method=trades,lambda=0.5'], 'adv_weight (lambda) 0.5 does not apply to method='),
    (['--arms', 'nofrost,bogus'], "Unknown arm 'bogus'; built in: standard"),
    (['--seeds', '0,one'], "argument --seeds: expected comma-separated integers, got '0,one'"),
    (['--only', 'trades'], "--only 'trades': arm 'trades' is not in this study"),
    (['--only', 'nofrost:7'], '--only \'nofrost:7\': seed 7 is not among the seeds [0, 1]'),
    (['--eval-attacks', 'clean,pgd-x'], "Unknown attack 'pgd-x'"),
    (['--arm', 'standard:base=trades'], "'standard' is a built-in arm; give the new arm another name"),
    (['--arms', ''], "--arms '' names no arm; built in: standard"),
    (['--arms', ' , '], "--arms ' , ' names no arm"),
    (['--seeds', ''], "argument --seeds: expected comma-separated integers, got ''"),
])
def test_bad_study_input_fails_in_one_line_before_training(data_root, tmp_path, capsys, monkeypatch, extra, message):
    from timm_nofrost.training import run as run_module
    monkeypatch.setattr(run_module, 'train', lambda *a, **k: pytest.fail('training started'))
    code, _, err = run_cli(study_args(data_root, tmp_path / 'bad', *extra), capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith('timm-nofrost study: error: ')
    assert message in err
    assert not (tmp_path / 'bad' / 'runs').exists()


def test_an_arm_whose_model_cannot_be_built(data_root, tmp_path, capsys, monkeypatch):
    from timm_nofrost.training import run as run_module
    monkeypatch.setattr(run_module, 'train', lambda *a, **k: pytest.fail('training started'))
    argv = study_args(data_root, tmp_path / 'bad', arms='nofrost,bn-at')
    i = argv.index('--model')
    argv[i + 1: i + 4] = ['nf_regnet_b0', '--model-kwargs', '{}']  # no BatchNorm twin known
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "Arm 'bn-at' cannot build its bn model from 'nf_regnet_b0'" in err and 'No BatchNorm twin' in err
    assert not (tmp_path / 'bad').exists()


def test_a_folder_holding_another_study_or_something_else(finished_study, data_root, tmp_path, capsys, monkeypatch):
    from timm_nofrost.training import run as run_module
    monkeypatch.setattr(run_module, 'train', lambda *a, **k: pytest.fail('training started'))
    code, _, err = run_cli(study_args(data_root, finished_study, epochs='3'), capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f'{finished_study} holds another study (schedule.epochs was 2, now 3)' in err
    # the same data folder named relative to another working directory is the same study: nothing to do
    monkeypatch.chdir(data_root.parent)
    code, out, err = run_cli(study_args(Path(data_root.name), finished_study), capsys)
    assert code == 0, err
    assert out.count('finished, skipped') == 4
    other = tmp_path / 'train_run'
    other.mkdir()
    (other / 'checkpoint-last.pth').write_bytes(b'x')
    code, _, err = run_cli(study_args(data_root, other), capsys)
    assert code == 2 and f'{other} is not empty and holds no study.json' in err
    code, _, err = run_cli(['study', 'report', str(other)], capsys)
    assert code == 2 and f'{other} is not a study folder: it has no study.json' in err


def test_arm_specs_and_files(tmp_path):
    arm = parse_arm_spec('trades3:base=trades,beta=3')
    assert arm == Arm('trades3', 'nf', {'method': 'trades', 'beta': 3.0})
    assert parse_arm_spec('bnf:family=bn,batch-mode=separate,method=madry,attack=fgsm-rs').attack == 'fgsm-rs'
    assert parse_arm_spec('light:lambda=0.25').adv_weight == 0.25
    yaml_file = tmp_path / 'arms.yaml'
    yaml_file.write_text('half:\n  base: nofrost\n  lambda: 0.3\nbn-mart:\n  family: bn\n  batch_mode: separate\n'
                         '  method: mart\n')
    arms = load_arms_file(yaml_file)
    assert [a.name for a in arms] == ['half', 'bn-mart'] and arms[0].adv_weight == 0.3 and arms[1].beta is None
    json_file = tmp_path / 'arms.json'
    json_file.write_text('{"fast": {"base": "fast-at", "steps": 1}}')
    assert load_arms_file(json_file)[0].attack == 'fgsm-rs'
    assert [a.name for a in resolve_arms(['nofrost', 'bn-at'], arms)] == ['nofrost', 'bn-at', 'half', 'bn-mart']
    with pytest.raises(ValueError, match='is not valid JSON'):
        (tmp_path / 'bad.json').write_text('{nope')
        load_arms_file(tmp_path / 'bad.json')
    # the arms' training configs: what the paper's arms mean
    study = dict(eps=0.1, steps=5, step_size=None, norm='Linf', random_start=True)
    assert ARMS['standard'].adversarial(**study).steps == 0 and ARMS['standard'].adversarial(**study).adv_weight == 0
    assert ARMS['bn-at'].adversarial(**study).batch_mode == 'separate'
    assert ARMS['mbn-at'].adversarial(**study).batch_mode == 'split'
    assert ARMS['nofrost'].adversarial(**study).adv_weight == 0.5
    fast = ARMS['fast-at'].adversarial(**study)
    assert (fast.steps, fast.attack_step_size) == (1, pytest.approx(0.125))
    assert ARMS['trades'].adversarial(**study).beta == 6.0


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_one_run_of_a_study_as_a_torchrun_launch(data_root, tmp_path):
    import os
    import subprocess
    import sys
    out = tmp_path / 'ddp'
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'HF_HUB_OFFLINE': '1'}
    launch = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', '-m',
              'timm_nofrost']
    refused = subprocess.run(launch + study_args(data_root, out, epochs='1'), env=env, capture_output=True,
                             text=True, timeout=380)
    assert refused.returncode != 0 and 'Under torchrun a study runs one arm x seed per launch' in refused.stderr
    done = subprocess.run(launch + study_args(data_root, out, '--only', 'nofrost:1', '--json', epochs='1'), env=env,
                          capture_output=True, text=True, timeout=380)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)  # rank 0 alone evaluates and reports
    assert list(report['arms']) == ['nofrost'] and report['arms']['nofrost']['clean']['n'] == 1
    assert 'batch 16 x 2' in done.stderr
    assert len(report['missing']) == 3
    # the first rank's refusal of the folder reaches every rank: one clear error, no rank left training or waiting
    files = sorted((str(p.relative_to(out)), p.stat().st_size) for p in out.rglob('*') if p.is_file())
    other = subprocess.run(launch + study_args(data_root, out, '--only', 'nofrost:0', epochs='2'), env=env,
                           capture_output=True, text=True, timeout=380)
    assert other.returncode != 0 and 'holds another study (schedule.epochs was 1, now 2)' in other.stderr
    assert sorted((str(p.relative_to(out)), p.stat().st_size) for p in out.rglob('*') if p.is_file()) == files
    assert not (out / 'runs' / 'nofrost' / 'seed-0').exists()


def test_the_bn_twin_has_the_same_depth_and_width():
    import timm
    import torch
    from timm_nofrost.training.baseline import create_bn_twin
    for kwargs in (dict(channels=(8, 16, 32, 64), stem_chs=8), dict(channels=(16, 32, 64, 128), stem_chs=16),
                   dict(channels=(8, 16, 32, 64), stem_chs=4)):
        nf = timm.create_model('nf_resnet18_cifar_nofrost', num_classes=10, **kwargs)
        bn, name = create_bn_twin('nf_resnet18_cifar_nofrost', 10, kwargs)
        convs = [m.weight.shape for m in nf.modules() if isinstance(m, torch.nn.Conv2d)]
        bn_convs = [m.weight.shape for m in bn.modules() if isinstance(m, torch.nn.Conv2d)]
        assert name == 'resnet18' and sorted(convs) == sorted(bn_convs)  # the same convolutions, BN added
        assert bn(torch.rand(2, 3, 28, 28)).shape == (2, 10)


def _reports_in(value):
    """Every evaluation report (a dict with per-eps, per-attack accuracies) inside a JSON value."""
    if isinstance(value, dict):
        if isinstance(value.get('accuracy'), dict) and 'attacks' in value and 'eps' in value:
            yield value
        for v in value.values():
            yield from _reports_in(v)
    elif isinstance(value, list):
        for v in value:
            yield from _reports_in(v)


def test_every_file_in_a_study_folder_agrees_with_its_report(finished_study):
    """No file of a study states a robust accuracy the study report does not: the evaluations in every JSON
    file, and the Markdown tables, per run, attack and eps. (Per-epoch training metrics, ``val_robust_top1`` on
    ``--robust-examples`` images with ``--eval-attack``, are the training's monitoring, labelled as such.)"""
    from timm_nofrost.attacks import ThreatModel
    out = finished_study
    report = json.loads((out / 'report.json').read_text())
    label = lambda m: ThreatModel(m * report['eps'], report['norm']).label  # noqa: E731
    expected = {}
    for arm, seeds in report['runs'].items():
        for seed, values in seeds.items():
            for attack in report['attacks']:
                expected[(arm, seed, attack, label(1))] = values[attack]
    curve_attack = json.loads((out / 'study.json').read_text())['protocol']['curve_attack']
    for arm, points in report['curves'].items():
        for multiple, stats in points.items():
            for seed, value in stats['values'].items():
                if float(multiple):  # one attack: its worst case is its own accuracy
                    for name in (curve_attack, 'worst-case'):
                        expected.setdefault((arm, seed, name, label(float(multiple))), value)
    checked = set()
    for path in sorted(out.rglob('*.json')):
        parts = path.relative_to(out).parts
        for record in _reports_in(json.loads(path.read_text())):
            assert parts[0] == 'runs', f'{path} holds an evaluation outside a run folder'
            arm, seed = parts[1], parts[2].split('-', 1)[1]
            for eps, by_attack in record['accuracy'].items():
                for attack, value in by_attack.items():
                    if value is not None:
                        assert 100 * value == pytest.approx(expected[(arm, seed, attack, eps)]), (path, attack, eps)
                        checked.add((arm, seed, attack, eps))
        if path.name == 'results.json':  # the train run's own final evaluation: clean only, the study evaluates
            for run in json.loads(path.read_text())['runs'].values():
                assert list(run['final']['accuracy']) == ['clean']
    assert checked == set(expected) and not list(out.rglob('robustness.*'))  # each number found, none else
    lines = [line for line in (out / 'report.md').read_text().splitlines() if line.startswith('| ')]
    header = next(line for line in lines if line.startswith('| arm | seed |'))
    columns = [c.strip() for c in header.strip('|').split('|')]
    rows = 0
    for line in lines[lines.index(header) + 1:]:  # the separator row does not start with '| '
        cells = dict(zip(columns, (c.strip() for c in line.strip('|').split('|'))))
        for attack in report['attacks']:
            assert float(cells[attack]) == pytest.approx(expected[(cells['arm'], cells['seed'], attack, label(1))],
                                                         abs=0.05)
        rows += 1
    assert rows == sum(len(seeds) for seeds in report['runs'].values())


def test_a_run_being_evaluated_is_listed_as_in_progress(finished_study, tmp_path):
    import shutil
    from timm_nofrost.study import run_state
    from timm_nofrost.study.aggregate import collect_study
    out = tmp_path / 'copy'
    shutil.copytree(finished_study, out, ignore=shutil.ignore_patterns('.lock'))
    run = out / 'runs' / 'nofrost' / 'seed-1'
    (run / 'eval.json').unlink()
    journal = run / 'eval.progress' / 'protocol'
    journal.mkdir(parents=True)
    (journal / 'identity.json').write_text(json.dumps({'identity': {}, 'n_batches': 3}))
    (journal / 'batch-000000.json').write_text('{}')
    state, detail = run_state(run)
    assert state == 'evaluating' and detail.startswith('evaluation in progress: 1 of 3 batches recorded')
    missing = collect_study(out)['missing']
    assert [(m['arm'], m['seed'], m['state']) for m in missing] == [('nofrost', 1, 'evaluating')]
