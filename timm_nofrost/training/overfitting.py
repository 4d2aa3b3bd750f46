"""Catastrophic overfitting: the collapse of single-step adversarial training, read off the per-epoch history.

Wong, Rice and Kolter (ICLR 2020) saw FGSM training fail within an epoch: PGD accuracy falls to about 0 while
the accuracy under the training attack itself jumps up (the model learns to mask the one gradient step it is
trained on). Both numbers are in every epoch of a ``timm-nofrost train`` run (``val_robust_top1``: PGD on the
fixed validation subset; ``train_acc_adv``: accuracy on the training attack's examples), so the check is a
pure function over that history; it needs no extra evaluation.
"""
from typing import Any, Dict, Optional, Sequence

__all__ = ['catastrophic_overfitting', 'first_catastrophic_overfitting', 'OVERFITTING_ADVICE']

OVERFITTING_ADVICE = ('Train with a smaller step (--adv-step-size), with N-FGSM (--adv-attack n-fgsm), or with PGD '
                      '(--adv-attack pgd --adv-steps 10); model_best.pth holds the best epoch before the collapse.')


def catastrophic_overfitting(history: Sequence[Dict[str, Any]], rel_drop: float = 0.5, min_drop: float = 10.0,
                             near_zero: float = 1.0) -> Optional[Dict[str, Any]]:
    """Whether the LAST epoch of ``history`` shows catastrophic overfitting; None if not.

    Flagged when the last epoch's ``val_robust_top1`` (percent) has collapsed against the best earlier epoch,
    i.e. fallen by at least ``min_drop`` points AND to at most ``(1 - rel_drop)`` of that best, or to at most
    ``near_zero`` percent after having been at least ``min_drop / 2`` points higher, WHILE ``train_acc_adv`` (the
    training attack's own accuracy) is higher than at that best epoch. Attack accuracy rising on its own is
    ordinary progress, and a robust accuracy that dips while the attack accuracy dips too is noise or a
    learning-rate effect: neither is flagged.

    Returns the evidence (``epoch``, ``best_epoch``, ``robust``, ``best_robust``, ``attack_acc``,
    ``attack_acc_at_best``, ``robust_attack``) and a ``message`` saying what happened and what to do.
    """
    rows = [r for r in history if r.get('val_robust_top1') is not None]
    if len(rows) < 2 or rows[-1] is not history[-1]:
        return None
    last, earlier = rows[-1], rows[:-1]
    best = max(reversed(earlier), key=lambda r: r['val_robust_top1'])  # ties: the latest best epoch
    robust, best_robust = float(last['val_robust_top1']), float(best['val_robust_top1'])
    drop = best_robust - robust
    collapsed = (drop >= min_drop and robust <= (1 - rel_drop) * best_robust) or \
                (robust <= near_zero and drop >= min_drop / 2)
    attack_acc, attack_acc_at_best = last.get('train_acc_adv'), best.get('train_acc_adv')
    if not collapsed or attack_acc is None or attack_acc_at_best is None or attack_acc <= attack_acc_at_best:
        return None
    attack = last.get('val_robust_attack', 'PGD')
    message = (f"catastrophic overfitting at epoch {last['epoch']}: validation {attack} accuracy fell from "
               f"{best_robust:.1f} % (epoch {best['epoch']}) to {robust:.1f} % while the training attack's own "
               f"accuracy rose from {attack_acc_at_best:.1f} % to {attack_acc:.1f} %: the model beats its training "
               f"attack, not a stronger one. {OVERFITTING_ADVICE}")
    return {'epoch': last['epoch'], 'best_epoch': best['epoch'], 'robust': robust, 'best_robust': best_robust,
            'attack_acc': float(attack_acc), 'attack_acc_at_best': float(attack_acc_at_best),
            'robust_attack': attack, 'message': message}


def first_catastrophic_overfitting(history: Sequence[Dict[str, Any]], **kwargs: Any) -> Optional[Dict[str, Any]]:
    """The first epoch of ``history`` that ``catastrophic_overfitting`` flags (its evidence), or None."""
    verdicts = (catastrophic_overfitting(history[:i + 1], **kwargs) for i in range(len(history)))
    return next((v for v in verdicts if v is not None), None)
