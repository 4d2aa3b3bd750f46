"""Catastrophic-overfitting guard: the detector on per-epoch trajectories, and where its flag shows up."""
import pytest

from timm_nofrost.training.overfitting import catastrophic_overfitting, first_catastrophic_overfitting
from timm_nofrost.training.results import final_table


def history(robust, attack_acc, attack='pgd-10'):
    """Per-epoch rows as ``_Run`` records them: PGD accuracy on the validation subset, training-attack accuracy."""
    return [{'epoch': i + 1, 'val_robust_top1': r, 'val_robust_attack': attack, 'train_acc_adv': a}
            for i, (r, a) in enumerate(zip(robust, attack_acc))]


# Shapes of the trajectories of Wong, Rice & Kolter (2020): FGSM-RS at a large step trains normally, then within
# one epoch PGD accuracy falls to about 0 while the FGSM training accuracy jumps towards the clean accuracy.
FGSM_COLLAPSE = history(robust=[22.0, 31.5, 36.0, 39.2, 41.0, 0.4, 0.0, 0.0],
                        attack_acc=[28.0, 36.0, 40.5, 43.0, 45.1, 71.3, 88.0, 92.4])
# The same recipe at a safe step (or N-FGSM): both accuracies climb together, with epoch-to-epoch noise.
FGSM_HEALTHY = history(robust=[21.0, 30.8, 35.1, 34.0, 38.6, 40.2, 39.1, 41.7],
                       attack_acc=[27.0, 35.2, 39.0, 40.1, 42.8, 44.0, 45.3, 46.9])
# PGD-10 AT: the training attack's accuracy keeps rising (the model fits its training examples) and PGD accuracy
# on held-out images plateaus and slowly declines (robust overfitting, Rice et al. 2020): not the collapse.
PGD_AT = history(robust=[18.0, 27.5, 33.0, 37.2, 39.0, 38.1, 36.9, 35.5],
                 attack_acc=[20.0, 29.0, 35.0, 40.0, 46.0, 52.0, 58.0, 64.0])


def test_collapse_with_rising_attack_accuracy_is_flagged_at_the_epoch_it_happens():
    verdict = first_catastrophic_overfitting(FGSM_COLLAPSE)
    assert verdict is not None
    assert verdict['epoch'] == 6 and verdict['best_epoch'] == 5
    assert verdict['best_robust'] == 41.0 and verdict['robust'] == 0.4
    assert verdict['attack_acc_at_best'] == 45.1 and verdict['attack_acc'] == 71.3
    message = verdict['message']
    assert message.startswith('catastrophic overfitting at epoch 6: validation pgd-10 accuracy fell from 41.0 % '
                              '(epoch 5) to 0.4 %')
    assert '--adv-attack n-fgsm' in message and '--adv-step-size' in message and '--adv-attack pgd' in message
    # every later epoch of the collapsed run is flagged too; the epochs before it are not
    assert [catastrophic_overfitting(FGSM_COLLAPSE[:n]) is not None for n in range(1, 9)] == \
        [False] * 5 + [True] * 3


@pytest.mark.parametrize('trajectory', [FGSM_HEALTHY, PGD_AT], ids=['fgsm-healthy', 'pgd-at'])
def test_normal_training_is_not_flagged(trajectory):
    assert first_catastrophic_overfitting(trajectory) is None


def test_attack_accuracy_rising_alone_is_not_flagged():
    rising = history(robust=[30.0, 31.0, 30.5, 31.2], attack_acc=[30.0, 50.0, 70.0, 90.0])
    assert first_catastrophic_overfitting(rising) is None


def test_a_collapse_without_rising_attack_accuracy_is_not_flagged():
    # PGD and training-attack accuracy fall together (e.g. a learning-rate blow-up): not this failure
    both_fall = history(robust=[30.0, 40.0, 5.0], attack_acc=[35.0, 45.0, 10.0])
    assert first_catastrophic_overfitting(both_fall) is None


@pytest.mark.parametrize('robust, flagged', [
    ([40.0, 19.0], True),   # more than half and >= 10 points
    ([40.0, 21.0], False),  # 19 points, but not half
    ([15.0, 6.0], False),   # more than half, but 9 points
    ([8.0, 0.5], True),     # to near 0 from a real value
    ([3.0, 0.0], False),    # from near 0 to 0: noise on a few images
])
def test_thresholds(robust, flagged):
    assert (catastrophic_overfitting(history(robust, [30.0, 60.0])) is not None) is flagged


def test_standard_training_and_short_histories_are_not_flagged():
    assert catastrophic_overfitting([]) is None
    assert catastrophic_overfitting(FGSM_COLLAPSE[:1]) is None
    no_attack = [{k: v for k, v in row.items() if k != 'train_acc_adv'} for row in FGSM_COLLAPSE]
    assert first_catastrophic_overfitting(no_attack) is None


def _results(overfit):
    run = {'name': 'nofrost', 'epochs': FGSM_COLLAPSE, 'catastrophic_overfitting': overfit,
           'final': {'attacks': ['clean', 'pgd-20'], 'accuracy': {'clean': 90.0, 'pgd-20': 0.0}, 'n_examples': 8}}
    return {'config': {'adv': {'norm': 'Linf', 'eps': 8 / 255}}, 'runs': {'nofrost': run}}


def test_final_table_marks_the_run_and_says_what_to_do():
    table = final_table(_results(first_catastrophic_overfitting(FGSM_COLLAPSE)))
    assert '| nofrost (catastrophic overfitting) | 90.0 % | 0.0 % |' in table
    warning = table.splitlines()[-1]
    assert warning.startswith('Warning: nofrost: catastrophic overfitting at epoch 6') and 'n-fgsm' in warning
    clean = final_table(_results(None))
    assert '| nofrost | 90.0 % | 0.0 % |' in clean and 'Warning' not in clean
