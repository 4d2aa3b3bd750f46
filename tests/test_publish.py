"""Results where users look: the export command a training run prints, export of any trained model (model
kwargs, converted BatchNorm models), evaluation reports in the model card's model-index (read back with
huggingface_hub's own parsers, also from the loopback Hub after a push), and RobustBench's model_info layout."""
import json
import shlex
from pathlib import Path

import pytest
import timm
import torch
from huggingface_hub import ModelCard, hf_hub_download
from huggingface_hub.repocard import metadata_load
from huggingface_hub.repocard_data import model_index_to_eval_results

from timm_nofrost import export_checkpoint, push_folder
from timm_nofrost.cli import main
from timm_nofrost.evaluate import WORST_CASE, RobustReport, evaluate, robustbench_model_info
from timm_nofrost.model_card import ModelCardInfo, dataset_id, model_index, render_model_card, with_metadata
from timm_nofrost.training.checkpointing import load_training_checkpoint

from conftest import TINY_ARGS, TINY_MODEL, image_folders, randomize_gains, tiny_model
from hub_server import HubServer, configure_hub_env
from tiny_models import eval_data, trained_tiny_cnn

TINY_KWARGS = json.dumps({**TINY_ARGS, 'drop_rate': 0.0, 'drop_path_rate': 0.0})
# a small timm BatchNorm ResNet, trained with --convert
BN_MODEL = ('--model', 'resnet10t', '--model-kwargs', json.dumps({'channels': [8, 16, 32, 64], 'stem_width': 8}))
ROBUSTBENCH_KEYS = ['link', 'name', 'authors', 'additional_data', 'number_forward_passes', 'dataset', 'venue',
                    'architecture', 'eps', 'clean_acc', 'reported', 'autoattack_acc']


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory) -> Path:
    return image_folders(tmp_path_factory.mktemp('shapes'), train=30, val=12)


TINY = ('--model', TINY_MODEL, '--model-kwargs', TINY_KWARGS)


def _train(data_dir: Path, out: Path, capsys, *extra: str, model=TINY):
    """A one-epoch run; returns its results (printed with --json, and in results.json) and its closing log."""
    assert main(['train', '--data', str(data_dir), *model, '--img-size', '16', '-b', '50', '--epochs', '1',
                 '--adv-steps', '1', '--robust-examples', '4', '--final-attacks', 'clean', '--eval-attack', 'pgd-1',
                 '--out', str(out), '--no-progress', '--json', *extra]) == 0
    captured = capsys.readouterr()
    results = json.loads(captured.out)
    assert results == json.loads((out / 'results.json').read_text())
    return results, captured.err


def _logits(model, x):
    with torch.no_grad():
        return model.eval()(x)


# -- the export command train prints -----------------------------------------------------------------------
def test_the_printed_export_command_exports_the_best_checkpoint(data_dir, tmp_path, capsys):
    out = tmp_path / 'run'
    results, log = _train(data_dir, out, capsys)
    command = results['export_command']
    assert command in log and results['eval_command'] in log  # printed next to each other
    assert command == (f"timm-nofrost export {out / 'model_best.pth'} --model {TINY_MODEL} --num-classes 5 "
                       f"--model-kwargs {shlex.quote(TINY_KWARGS)} --out {out / 'hub'}")
    # the stronger evaluation the run prints, then the export with its report in the card
    assert main(shlex.split(results['eval_command'])[1:] + ['--attacks', 'clean,pgd-2', '--no-sanity',
                                                            '--out', str(tmp_path / 'report.json')]) == 0
    capsys.readouterr()
    assert main(shlex.split(command)[1:] + ['--eval-report', str(tmp_path / 'report.json')]) == 0
    printed = capsys.readouterr().out
    assert 'identical logits' in printed and 'model-index' in printed
    # the folder is the trained model: same logits as the checkpoint in the model train built
    trained = timm.create_model(TINY_MODEL, num_classes=5, **json.loads(TINY_KWARGS))
    trained.load_state_dict(load_training_checkpoint(out / 'model_best.pth')['state_dict'])
    reloaded = timm.create_model(f'local-dir:{out / "hub"}', pretrained=True)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(_logits(reloaded, x), _logits(trained, x))
    report = json.loads((tmp_path / 'report.json').read_text())
    # a report of other weights (one weight changed) is refused: no card shows another model's results
    weights = load_training_checkpoint(out / 'model_best.pth')['state_dict']
    first = next(k for k, v in weights.items() if v.is_floating_point())
    weights[first] = weights[first] + 1e-3
    torch.save(weights, tmp_path / 'other.pth')
    capsys.readouterr()
    assert main(shlex.split(results['eval_command'].replace(str(out / 'model_best.pth'), str(tmp_path / 'other.pth')))
                [1:] + ['--attacks', 'clean,pgd-2', '--no-sanity', '--out', str(tmp_path / 'last.json')]) == 0
    assert report['identity']['model weights'] != json.loads((tmp_path / 'last.json').read_text())['identity'][
        'model weights']
    capsys.readouterr()
    assert main(shlex.split(command)[1:] + ['--eval-report', str(tmp_path / 'last.json'), '--out',
                                            str(tmp_path / 'other')]) == 2
    assert 'evaluation report is of other weights' in capsys.readouterr().err and not (tmp_path / 'other').exists()
    _, results_on_card = model_index_to_eval_results(metadata_load(out / 'hub' / 'README.md')['model-index'])
    assert {r.metric_config: r.metric_value for r in results_on_card} == {
        'clean': 100 * report['clean_accuracy'], 'pgd-2@8/255': 100 * report['accuracy']['8/255']['pgd-2'],
        'worst-case@8/255': 100 * report['accuracy']['8/255'][WORST_CASE]}


def test_the_export_command_of_a_converted_run_writes_a_loadable_converted_model(data_dir, tmp_path, capsys):
    out = tmp_path / 'run'
    results, _ = _train(data_dir, out, capsys, '--convert', model=BN_MODEL)
    command = results['export_command']
    assert ' --convert ' in command and '--model resnet10t' in command
    assert main(shlex.split(command)[1:] + ['--json']) == 0
    exported = json.loads(capsys.readouterr().out)
    assert exported['model_name'] == 'normfree_converted' and exported['max_abs_diff'] == 0.0
    config = json.loads((out / 'hub' / 'config.json').read_text())
    assert config['architecture'] == 'normfree_converted'
    assert config['model_args']['base_model'] == 'resnet10t' and config['model_args']['channels'] == [8, 16, 32, 64]
    # what eval builds from the same flags (BatchNorm model, converted, then the weights) is what the folder loads
    from timm_nofrost.convert import convert_to_normfree
    built = convert_to_normfree(timm.create_model('resnet10t', num_classes=5, channels=[8, 16, 32, 64], stem_width=8),
                                init='fresh')
    built.load_state_dict(load_training_checkpoint(out / 'model_best.pth')['state_dict'])
    reloaded = timm.create_model(f'local-dir:{out / "hub"}', pretrained=True)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in reloaded.modules())
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(_logits(reloaded, x), _logits(built, x))
    # without --convert the converted weights do not fit the BatchNorm model: one line, nothing written
    assert main(shlex.split(command.replace(' --convert', ''))[1:] + ['--out', str(tmp_path / 'bn')]) == 2
    err = capsys.readouterr().err
    assert 'missing keys' in err and len(err.strip().splitlines()) == 1 and not (tmp_path / 'bn').exists()


def test_the_export_command_leaves_a_pretrained_tag_out(tmp_path):
    """A run's weights are not the tag's published ones: the command exports the architecture, whose card makes
    no claim of being the paper's checkpoint."""
    from timm_nofrost.training.results import export_command
    from timm_nofrost.training.train_config import TrainConfig
    run = tmp_path / 'my run'
    cfg = TrainConfig(model='nf_resnet50_nofrost.at_in1k', pretrained=True)
    assert export_command(cfg, run, 10) == (f"timm-nofrost export '{run}/model_best.pth' --model nf_resnet50_nofrost "
                                            f"--num-classes 10 --out '{run}/hub'")
    cfg = TrainConfig(model='local-dir:/models/tiny', model_kwargs={'channels': (8, 16)}, convert=True)
    assert export_command(cfg, run, 3).split(' --model ', 1)[1] == (
        f"local-dir:/models/tiny --num-classes 3 --model-kwargs '{{\"channels\": [8, 16]}}' --convert --out '{run}/hub'")


def test_export_refuses_what_it_cannot_write(tmp_path, capsys):
    model = randomize_gains(tiny_model()).eval()
    path = tmp_path / 'nf.pth'
    torch.save(model.state_dict(), path)
    # --convert of a normalizer-free model: nothing to convert
    assert main(['export', str(path), '--model', TINY_MODEL, '--model-kwargs', json.dumps(TINY_ARGS), '--convert',
                 '--out', str(tmp_path / 'a')]) == 2
    err = capsys.readouterr().err
    assert 'nothing to convert' in err and 'without --convert' in err and not (tmp_path / 'a').exists()
    # the class count and input channels are the checkpoint's: given as model arguments too, they must agree
    for kwargs, extra, error in (({'num_classes': 7}, [], 'num_classes=7 disagrees with checkpoint'),
                                 ({'in_chans': 1}, [], 'in_chans=1 disagrees with checkpoint'),
                                 ({'num_classes': 7}, ['--num-classes', '10'],
                                  'num_classes=10 and model_kwargs num_classes=7 disagree')):
        assert main(['export', str(path), '--model', TINY_MODEL, '--model-kwargs', json.dumps({**TINY_ARGS, **kwargs}),
                     *extra, '--out', str(tmp_path / 'b')]) == 2
        assert error in capsys.readouterr().err
    assert main(['export', str(path), '--model', TINY_MODEL, '--out', str(tmp_path / 'b'),
                 '--model-kwargs', json.dumps({**TINY_ARGS, 'num_classes': 10, 'in_chans': 3})]) == 0
    # a report that is no evaluation report is refused before anything is written
    (tmp_path / 'not-a-report.json').write_text('{"accuracy": {}}')
    assert main(['export', str(path), '--model', TINY_MODEL, '--model-kwargs', json.dumps(TINY_ARGS),
                 '--eval-report', str(tmp_path / 'not-a-report.json'), '--out', str(tmp_path / 'c')]) == 2
    err = capsys.readouterr().err
    assert 'not an evaluation report' in err and 'missing model, dataset, norm, eps' in err
    assert not (tmp_path / 'c').exists()
    # the CIFAR BatchNorm twin (--compare-bn, the study's bn arms) has a replaced stem: no timm architecture
    from timm_nofrost.training.baseline import create_bn_twin
    twin, twin_name = create_bn_twin(TINY_MODEL, 10, TINY_ARGS)
    torch.save({'state_dict': twin.state_dict(), 'arch': twin_name}, tmp_path / 'twin.pth')
    assert main(['export', str(tmp_path / 'twin.pth'), '--model', twin_name, '--model-kwargs',
                 json.dumps({'channels': TINY_ARGS['channels']}), '--out', str(tmp_path / 'twin')]) == 2
    err = capsys.readouterr().err
    assert 'shape mismatches (conv1.weight' in err and 'has no timm architecture to export' in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / 'twin').exists()
    # the model's width in --model-kwargs: the export works from the command line
    assert main(['export', str(path), '--model', TINY_MODEL, '--model-kwargs', json.dumps(TINY_ARGS),
                 '--out', str(tmp_path / 'd')]) == 0
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(_logits(timm.create_model(f'local-dir:{tmp_path / "d"}', pretrained=True), x), _logits(model, x))


def test_export_of_a_model_trained_from_a_local_dir_model(tmp_path):
    """``train --model local-dir:DIR`` (fine-tuning an exported folder): its checkpoints export with that name."""
    source = randomize_gains(tiny_model()).eval()
    torch.save(source.state_dict(), tmp_path / 'a.pth')
    export_checkpoint(tmp_path / 'a.pth', tmp_path / 'base', model_name=TINY_MODEL, model_kwargs=TINY_ARGS)
    tuned = randomize_gains(timm.create_model(f'local-dir:{tmp_path / "base"}', num_classes=4)).eval()
    torch.save({'state_dict': tuned.state_dict(), 'epoch': 3}, tmp_path / 'tuned.pth')
    result = export_checkpoint(tmp_path / 'tuned.pth', tmp_path / 'out', model_name=f'local-dir:{tmp_path / "base"}')
    assert result.model_name == TINY_MODEL and result.num_classes == 4
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(_logits(timm.create_model(f'local-dir:{tmp_path / "out"}', pretrained=True), x),
                       _logits(tuned, x))


# -- evaluation reports in the model card ------------------------------------------------------------------
@pytest.fixture(scope='module')
def report() -> RobustReport:
    """A real evaluation: two attacks at two radii on a tiny CNN (some images broken, some not)."""
    x, y = eval_data(n=24)
    return evaluate(trained_tiny_cnn(), torch.utils.data.TensorDataset(x, y), attacks='clean,pgd-3,apgd-ce-3',
                    eps='1/255,4/255', sanity=False, progress=False, model_name='tiny_cnn', seed=0)


def _synthetic(**fields) -> dict:
    """A report as RobustReport.to_dict() writes it (the class builds it: its fields are the real ones)."""
    values = dict(model='nf_resnet18_cifar_nofrost', dataset='torch/cifar10', norm='Linf', eps=[8 / 255],
                  attacks=['apgd-ce', 'autoattack'], n_examples=1000, subset={'kind': 'seeded', 'n': 1000},
                  clean_accuracy=0.8125, accuracy={'8/255': {'apgd-ce': 0.4375, 'autoattack': 0.40625,
                                                             WORST_CASE: 0.40625}},
                  zero_grad_frac={}, settings={'split': 'test'})
    return RobustReport(**{**values, **fields}).to_dict()


def _card_results(path: Path):
    """The card's results through huggingface_hub's parsers: ModelCard.load and metadata_load."""
    card = ModelCard.load(path)
    name, results = model_index_to_eval_results(metadata_load(path)['model-index'])
    assert [(r.metric_config, r.metric_value) for r in card.data.eval_results] == \
        [(r.metric_config, r.metric_value) for r in results]
    return name, results, card


def test_model_index_round_trips_through_huggingface_hub(report, tmp_path):
    d = report.to_dict()
    assert 0 < d['accuracy']['4/255'][WORST_CASE] < d['clean_accuracy']  # some images broken at 4/255, not all
    info = ModelCardInfo(model_name='tiny_cnn', repo_id='org/tiny', num_params=1, num_classes=4, input_size=(3, 16, 16),
                         dataset=None)
    path = tmp_path / 'README.md'
    path.write_text(render_model_card(info, {'model-index': model_index(report.to_dict(), 'tiny')}))
    name, results, card = _card_results(path)
    assert name == 'tiny' and card.text.lstrip().startswith('# Model card for tiny_cnn')
    assert card.data.license == 'apache-2.0' and card.data.library_name == 'timm'
    expected = {('clean', None): 100 * d['clean_accuracy']}
    expected.update({(attack, label): 100 * d['accuracy'][label][attack]
                     for label in ('1/255', '4/255') for attack in ('pgd-3', 'apgd-ce-3', WORST_CASE)})
    got = {(r.metric_args.get('attack', 'clean' if r.metric_config == 'clean' else WORST_CASE),
            r.metric_args.get('eps')): r.metric_value for r in results}
    assert got == expected  # every value exactly the report's, in percent
    for r in results:
        assert (r.task_type, r.dataset_type, r.dataset_name, r.dataset_split, r.metric_type) == (
            'image-classification', 'dataset', 'dataset (validation)', 'validation', 'accuracy')
        assert r.metric_args['n_images'] == 24 and '24 images' in r.metric_name
    worst = next(r for r in results if r.metric_config == f'{WORST_CASE}@4/255')
    assert worst.metric_args == {'threat_model': 'Linf', 'eps': '4/255', 'n_images': 24, 'protocol': 'per attack',
                                 'attacks': ['pgd-3', 'apgd-ce-3']}
    assert worst.metric_name == ('Robust accuracy (%), worst case per image over pgd-3, apgd-ce-3, Linf eps 4/255, '
                                 '24 images')


def test_model_index_writes_only_what_an_attack_measured(tmp_path):
    cascade = _synthetic(cascade=True, accuracy={'8/255': {'apgd-ce': None, 'autoattack': None, WORST_CASE: 0.375}},
                         sanity=[{'name': 'near 0 % at a very large eps', 'ok': False}])
    _, results = model_index_to_eval_results(model_index(cascade, 'm'))
    assert [(r.metric_config, r.metric_value) for r in results] == [('clean', 81.25), ('worst-case@8/255', 37.5)]
    assert results[1].metric_args['protocol'] == 'cascade'
    assert results[1].metric_args['sanity_checks_failed'] == ['near 0 % at a very large eps']
    assert results[0].dataset_type == 'cifar10' and results[0].dataset_name == 'cifar10 (test)'
    # no attack: the clean accuracy alone (the worst case over no attack is no robustness measurement)
    clean_only = _synthetic(attacks=[], accuracy={'8/255': {WORST_CASE: 0.8125}})
    assert [r.metric_config for r in model_index_to_eval_results(model_index(clean_only, 'm'))[1]] == ['clean']
    with pytest.raises(ValueError, match=r"accuracy\['8/255'\]\['apgd-ce'\] must be an accuracy in \[0, 1\], got 43"):
        model_index(_synthetic(accuracy={'8/255': {'apgd-ce': 43.75}}), 'm')
    with pytest.raises(ValueError, match='missing clean_accuracy, accuracy'):
        model_index({'model': 'm', 'dataset': 'd', 'norm': 'Linf', 'eps': [], 'attacks': [], 'n_examples': 1}, 'm')


def test_card_metadata_update_keeps_the_card(tmp_path):
    card = render_model_card(ModelCardInfo(model_name='m', repo_id='o/m', num_params=1, num_classes=10,
                                           input_size=(3, 32, 32), dataset='cifar10'))
    updated = with_metadata(card, {'model-index': model_index(_synthetic(), 'm')})
    assert updated.split('\n---\n', 1)[1] == card.split('\n---\n', 1)[1]  # the text after the front matter
    assert with_metadata(updated, {'model-index': model_index(_synthetic(), 'm')}) == updated
    path = tmp_path / 'README.md'
    path.write_text(updated)
    meta = metadata_load(path)
    assert meta['datasets'] == ['cifar10'] and meta['tags'][0] == 'image-classification'
    assert [r.metric_value for r in model_index_to_eval_results(meta['model-index'])[1]] == [81.25, 43.75, 40.625,
                                                                                               40.625]
    assert with_metadata('# just text\n', {'license': 'mit'}) == '---\nlicense: mit\n---\n\n# just text\n'
    assert with_metadata('---\r\nlicense: mit\r\n---\r\n# text\r\n', {'a': 1}) == '---\nlicense: mit\na: 1\n---\n# text\r\n'


def test_dataset_names():
    from timm_nofrost.data.sources import TIMM_PREFIXES
    from timm_nofrost import model_card
    from timm_nofrost.evaluate import WORST_CASE as worst
    assert model_card._TIMM_PREFIXES == TIMM_PREFIXES and model_card.WORST_CASE == worst  # a leaf module's copies
    assert [dataset_id(s) for s in ('torch/cifar10', 'torch/cifar100:/data', 'hfds/org/name', '/data/imagenet/val',
                                    '/data/imagenet', 'demo', 'runs/pets/')] == [
        'cifar10', 'cifar100', 'org/name', 'imagenet', 'imagenet', 'demo', 'pets']


def test_push_with_eval_report_on_the_loopback_hub(tmp_path, monkeypatch, capsys):
    source = randomize_gains(tiny_model()).eval()
    torch.save(source.state_dict(), tmp_path / 'w.pth')
    folder = tmp_path / 'export'
    export_checkpoint(tmp_path / 'w.pth', folder, model_name=TINY_MODEL, model_kwargs=TINY_ARGS)
    text_before = (folder / 'README.md').read_text().split('\n---\n', 1)[1]
    report = _synthetic()
    (tmp_path / 'report.json').write_text(json.dumps(report))
    with HubServer(tmp_path / 'hub') as server:
        configure_hub_env(monkeypatch, server.endpoint, tmp_path / 'cache')
        monkeypatch.setenv('HF_TOKEN', 'hf_test_token')
        monkeypatch.setattr('huggingface_hub.constants.HF_TOKEN_PATH', str(tmp_path / 'no-token-file'))
        assert main(['push', str(folder), '--repo-id', 'someone/tiny-robust', '--eval-report',
                     str(tmp_path / 'report.json')]) == 0
        assert 'model-index' in capsys.readouterr().out
        card = ModelCard.load('someone/tiny-robust')  # downloaded from the loopback Hub
        readme = hf_hub_download('someone/tiny-robust', 'README.md')
    pushed = Path(readme).read_text()
    assert pushed == (folder / 'README.md').read_text()  # the folder's card, updated, is what was pushed
    assert pushed.split('\n---\n', 1)[1] == text_before and '# Model card for' in card.text  # the text kept
    name, results = model_index_to_eval_results(metadata_load(readme)['model-index'])
    assert name == 'tiny-robust' and card.data.model_name == 'tiny-robust'
    assert {r.metric_config: r.metric_value for r in card.data.eval_results} == {
        'clean': 81.25, 'apgd-ce@8/255': 43.75, 'autoattack@8/255': 40.625, 'worst-case@8/255': 40.625}
    assert {r.dataset_type for r in results} == {'cifar10'} and results[0].dataset_split == 'test'
    assert metadata_load(readme)['library_name'] == 'timm'
    # a bad report is refused before anything is uploaded or changed
    with pytest.raises(FileNotFoundError, match='timm-nofrost eval --out'):
        push_folder(folder, 'someone/tiny-robust', eval_report=tmp_path / 'missing.json')


# -- RobustBench's model_info layout -----------------------------------------------------------------------
def test_robustbench_model_info_layout():
    info = robustbench_model_info(_synthetic(), name='Removing Batch Normalization Boosts Adversarial Training',
                                  link='https://arxiv.org/abs/2207.01156', authors='Haotao Wang et al.',
                                  venue='ICML 2022', architecture='NF-ResNet-18')
    assert list(info) == ROBUSTBENCH_KEYS + ['footnote']
    assert info['dataset'] == 'cifar10' and info['eps'] == '8/255' and info['number_forward_passes'] == 1
    assert info['clean_acc'] == '81.25' and info['autoattack_acc'] == '40.62' and info['reported'] == ''
    assert info['additional_data'] is False
    assert info['footnote'] == "Evaluated on 1,000 images of the test split, not the leaderboard's 10,000."
    assert json.loads(json.dumps(info)) == info
    l2 = {'0.5': {'apgd-ce': 0.7, 'autoattack': 0.6925, WORST_CASE: 0.69}}
    full = robustbench_model_info(_synthetic(n_examples=10_000, norm='L2', eps=[0.5], accuracy=l2))
    assert list(full) == ROBUSTBENCH_KEYS and full['eps'] == '0.5' and full['autoattack_acc'] == '69.25'
    assert full['name'] == full['architecture'] == 'nf_resnet18_cifar_nofrost'
    # a RobustReport works as its dict; the eps to write is chosen when the report has several
    two = _synthetic(eps=[4 / 255, 8 / 255], accuracy={'4/255': {'apgd-ce': 0.6, 'autoattack': 0.59, WORST_CASE: 0.58},
                                                       '8/255': {'apgd-ce': 0.4, 'autoattack': 0.39, WORST_CASE: 0.38}})
    with pytest.raises(ValueError, match='measured eps 4/255, 8/255: pass eps='):
        robustbench_model_info(two)
    assert robustbench_model_info(RobustReport(**two), eps=4 / 255)['autoattack_acc'] == '59.00'
    assert robustbench_model_info(two, eps='8/255', dataset='imagenet')['dataset'] == 'imagenet'
    with pytest.raises(ValueError, match='not measured by the report'):
        robustbench_model_info(two, eps='2/255')
    with pytest.raises(ValueError, match="data set 'demo' has no RobustBench leaderboard"):
        robustbench_model_info(_synthetic(dataset='demo'))


def test_robustbench_refuses_autoattack_acc_without_autoattack(report):
    # a real report of PGD and APGD-CE: no AutoAttack
    with pytest.raises(ValueError, match=r'AutoAttack did not run \(attacks: pgd-3, apgd-ce-3\)'):
        robustbench_model_info(report, dataset='cifar10', eps='4/255')
    fast = _synthetic(attacks=['fast-worst-case'], accuracy={'8/255': {'fast-worst-case': 0.4, WORST_CASE: 0.4}})
    with pytest.raises(ValueError, match='fast-worst-case is not AutoAttack'):
        robustbench_model_info(fast)
    cascade = _synthetic(cascade=True, accuracy={'8/255': {'apgd-ce': None, 'autoattack': None, WORST_CASE: 0.4}})
    with pytest.raises(ValueError, match='cascade, which measures only the worst case'):
        robustbench_model_info(cascade)
    unmeasured = _synthetic(accuracy={'8/255': {'apgd-ce': 0.4, 'autoattack': None, WORST_CASE: 0.4}})
    with pytest.raises(ValueError, match='its AutoAttack column at eps 8/255 holds no measurement'):
        robustbench_model_info(unmeasured)
    parts = _synthetic(attacks=['apgd-ce', 'fab-t', 'square'],
                       accuracy={'8/255': {'apgd-ce': 0.4, 'fab-t': 0.5, 'square': 0.6, WORST_CASE: 0.39}})
    with pytest.raises(ValueError, match='AutoAttack did not run'):
        robustbench_model_info(parts)
    # asked for explicitly: the entry without the field, never another attack's number in it
    for without in (fast, cascade, unmeasured, parts):
        info = robustbench_model_info(without, require_autoattack=False)
        assert 'autoattack_acc' not in info and list(info) == ROBUSTBENCH_KEYS[:-1] + ['footnote']
