"""Imported by subprocess runs in test_train_cli.py: slows each training step so a run can be killed mid-epoch."""
import time

from timm_nofrost.training import AdversarialTrainer

_forward = AdversarialTrainer.forward


def _slow_forward(self, input, target):
    time.sleep(0.15)
    return _forward(self, input, target)


AdversarialTrainer.forward = _slow_forward
