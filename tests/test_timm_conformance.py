"""timm's own model test-suite (``tests/test_models.py`` from timm's sdist) on every ``*nofrost*`` model.

The sdist of the installed timm version is downloaded from the package index with pip (cached under
``TIMM_NOFROST_CACHE`` or ``~/.cache/timm-nofrost``). Only its ``tests/`` folder and ``pyproject.toml``
(markers) are extracted: the sdist's own ``timm/`` package would shadow the installed one.
"""
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import timm

pytestmark = pytest.mark.slow

HERE = Path(__file__).parent
# test functions of timm's suite that must have run for each kind of model (ids are 'test_x[name-...]')
PER_MODEL = ('test_model_forward', 'test_model_backward', 'test_model_forward_features',
             'test_model_forward_torchscript', 'test_model_forward_fx', 'test_model_backward_fx',
             'test_model_forward_fx_torchscript', 'test_model_forward_intermediates',
             'test_model_forward_intermediates_features', 'test_prune_intermediate_layers_contract')
PER_PRETRAINED = ('test_model_default_cfgs', 'test_model_load_pretrained', 'test_model_features_pretrained')


def _timm_sdist(version: str) -> Path:
    cache = Path(os.environ.get('TIMM_NOFROST_CACHE', Path.home() / '.cache' / 'timm-nofrost')) / 'sdist'
    archive = cache / f'timm-{version}.tar.gz'
    if not archive.exists():
        cache.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            [sys.executable, '-m', 'pip', 'download', '--no-deps', '--no-binary', ':all:',
             f'timm=={version}', '-d', str(cache)],
            capture_output=True, text=True)
        assert done.returncode == 0 and archive.exists(), f'could not download timm=={version} sdist:\n{done.stderr}'
    return archive


def _extract_tests(archive: Path, dest: Path, version: str) -> Path:
    prefix = f'timm-{version}/'
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers()
                   if m.name.startswith(prefix + 'tests/') or m.name == prefix + 'pyproject.toml']
        for member in members:
            member.name = member.name[len(prefix):]
        tar.extractall(dest, members=members, filter='data')
    assert not (dest / 'timm').exists()
    return dest


def test_timm_model_suite_passes_for_every_nofrost_model(tmp_path):
    version = timm.__version__
    suite = _extract_tests(_timm_sdist(version), tmp_path / 'suite', version)
    env = {k: v for k, v in os.environ.items() if k not in ('GITHUB_ACTIONS', 'HF_HUB_OFFLINE')}
    env['PYTHONPATH'] = os.pathsep.join([str(HERE), env.get('PYTHONPATH', '')]).rstrip(os.pathsep)
    env['HF_HOME'] = str(tmp_path / 'hf_home')
    cmd = [sys.executable, '-m', 'pytest', '-p', 'timm_nofrost', '-p', 'conformance_hub',
           'tests/test_models.py', '-k', 'nofrost', '-rfEs', '-v', '-p', 'no:cacheprovider', '--durations=5']
    result = subprocess.run(cmd, cwd=suite, env=env, capture_output=True, text=True, timeout=1800)
    output = result.stdout + result.stderr
    print(output[-6000:])
    assert result.returncode == 0, output[-6000:]

    # the installed timm ran, not a copy from the sdist
    assert str(suite / 'timm') not in output
    passed = set()
    for test_id in re.findall(r'^tests/test_models\.py::(\S+) PASSED', output, flags=re.M):
        name, params = test_id.split('[', 1)
        passed.update((name, param) for param in params.rstrip(']').split('-'))
    assert not re.search(r'\bSKIPPED\b|\bFAILED\b|\bERROR\b', output.split('short test summary info')[-1])
    for model in timm.list_models('*nofrost*'):
        for test in PER_MODEL:
            assert (test, model) in passed, f'{test} did not pass for {model}'
    for name in timm.list_pretrained('*nofrost*'):
        for test in PER_PRETRAINED:
            assert (test, name) in passed, f'{test} did not pass for {name}'
