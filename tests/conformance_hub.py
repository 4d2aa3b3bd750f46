"""pytest plugin for running timm's own ``tests/test_models.py`` against the NoFrost models, offline.

timm's suite checks that every model with published weights loads them (``pretrained=True`` with
``in_chans=1``, ``num_classes=5`` / ``0``, and ``features_only``). Those tests would need the real Hub, so
this plugin exports randomly initialised weights for every ``*nofrost*`` pretrained tag into a loopback
``HubServer`` at the tag's ``hf_hub_id`` and points huggingface_hub at it: the tests then run for real,
through huggingface_hub's download code and timm's loading path, instead of being skipped.
Load with ``-p timm_nofrost -p conformance_hub`` (this folder on ``PYTHONPATH``).
"""
import shutil
import tempfile
from pathlib import Path

import pytest
import timm
from timm.models import save_for_hf, split_model_name_tag

from hub_server import HubServer, configure_hub_env

_state = {}


def _publish_random_weights(root: Path) -> None:
    for name in timm.list_pretrained('*nofrost*'):
        arch, tag = split_model_name_tag(name)
        model = timm.create_model(arch, pretrained_cfg=tag)
        save_for_hf(model, str(root / model.pretrained_cfg['hf_hub_id']), safe_serialization=True)


def pytest_configure(config: pytest.Config) -> None:
    work = Path(tempfile.mkdtemp(prefix='nofrost-conformance-'))
    _publish_random_weights(work / 'hub')
    server = HubServer(work / 'hub').__enter__()
    patch = pytest.MonkeyPatch()
    configure_hub_env(patch, server.endpoint, work / 'cache')
    _state.update(work=work, server=server, patch=patch)


def pytest_report_header(config: pytest.Config) -> str:
    server = _state.get('server')
    return f'timm-nofrost: pretrained *nofrost* weights served by a loopback Hub at {server.endpoint}' if server else ''


def pytest_unconfigure(config: pytest.Config) -> None:
    if 'server' in _state:
        _state['patch'].undo()
        _state['server'].__exit__(None, None, None)
        shutil.rmtree(_state['work'], ignore_errors=True)
        _state.clear()
