"""``AdversarialTrainer``: NoFrost adversarial training as a timm ``ClassificationTask``.

Each ``forward(input, target)`` makes adversarial examples with the attacks' own PGD loop (in ``attack_mode``,
on the module under any DDP / compile wrapper) and returns the method's loss (formulas and attacks:
``timm_nofrost.training.adversarial``). A model without batch-statistics layers gets both halves in ONE forward
on the concatenated batch; BatchNorm models get the paper's baselines (shared BN with two forwards, or split BN).
"""
import logging
from typing import Any, Callable, Dict, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.task import ClassificationTask

from ..attacks.base import attack_mode, check_inputs, random_delta
from ..pixels import PixelModel, amp_dtype, denormalize, normalize, resolve_mean_std, unwrap_model
from ..attacks.pgd import PGD
from .batch_stats import batch_statistics_layers, has_split_batchnorm
from .adversarial import BETA_METHODS, NFGSM_NOISE, AdversarialConfig

__all__ = ['AdversarialTrainer', 'resolve_batch_mode']

_logger = logging.getLogger(__name__)

NOFROST_CRITERION_KWARGS = dict(smoothing=0.1)  # the authors' label smoothing


def resolve_batch_mode(model: nn.Module, batch_mode: str) -> str:
    """The batch mode ``model`` can use: ``'auto'`` picks concat for normalizer-free models.

    Raises:
        ValueError: ``'concat'`` on a model with batch-statistics layers (the concatenated batch would change
            the loss), or ``'split'`` on a model without BatchNorm.
    """
    layers = batch_statistics_layers(model)
    if batch_mode == 'auto':
        return ('split' if has_split_batchnorm(model) else 'separate') if layers else 'concat'
    if batch_mode == 'concat' and layers:
        shown = ', '.join(layers[:3]) + (f' and {len(layers) - 3} more' if len(layers) > 3 else '')
        raise ValueError(
            f"batch_mode='concat' needs a model whose layers never mix batch statistics, but {shown} do: one "
            f"forward on cat([clean, adv]) would normalise both halves together. Use batch_mode='separate' "
            f"(shared BN, BN-AT) or 'split' (split BN, MBN-AT), or convert the model with convert_to_normfree.")
    if batch_mode == 'split' and not layers:
        raise ValueError("batch_mode='split' needs BatchNorm layers to split; this model has none "
                         "(use 'concat' or 'auto').")
    return batch_mode


def _hard_labels(target: torch.Tensor) -> torch.Tensor:
    """Class indices of ``target`` (the argmax of soft targets)."""
    return target.argmax(dim=1) if target.ndim == 2 else target


def _float(logits: torch.Tensor) -> torch.Tensor:
    """Logits in at least float32 (softmax / log terms of low-precision outputs lose too much)."""
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


def trades_kl(out_clean: torch.Tensor, out_adv: torch.Tensor) -> torch.Tensor:
    """TRADES' robust term: ``sum_i KL(p(x_i) || p(x'_i)) / B`` (the reference's summed ``KLDivLoss`` over B).

    Gradients flow through both outputs, as in the reference code (its target p(x) is not detached).
    """
    out_clean, out_adv = _float(out_clean), _float(out_adv)
    return F.kl_div(F.log_softmax(out_adv, dim=1), F.softmax(out_clean, dim=1), reduction='sum') / out_clean.shape[0]


def mart_terms(out_clean: torch.Tensor, out_adv: torch.Tensor, labels: torch.Tensor):
    """MART's boosted CE on the adversarial outputs and its unweighted robust term, as the reference code: the
    two terms of the formula in ``timm_nofrost.training.adversarial`` (``y'``: the most likely wrong class under q)."""
    out_clean, out_adv = _float(out_clean), _float(out_adv)
    q = F.softmax(out_adv, dim=1)
    top2 = q.topk(2, dim=1).indices
    wrong = torch.where(top2[:, 0] == labels, top2[:, 1], top2[:, 0])
    boosted = F.cross_entropy(out_adv, labels) + F.nll_loss(torch.log(1.0001 - q + 1e-12), wrong)
    p = F.softmax(out_clean, dim=1)
    p_true = p.gather(1, labels[:, None])[:, 0]
    kl = F.kl_div(torch.log(q + 1e-12), p, reduction='none').sum(dim=1)
    return boosted, (kl * (1.0000001 - p_true)).sum() / out_clean.shape[0]


class AdversarialTrainer(ClassificationTask):
    """Adversarial training task for timm's ``train.py`` or any training loop.

    Args:
        model: The model to train (a timm model, a converted model, any classifier).
        criterion: Training loss (timm's, label smoothing and soft targets included); None creates one from
            ``criterion_kwargs``, which default to the authors' label smoothing 0.1.
        criterion_kwargs: Arguments for ``timm.loss.create_classification_loss`` when ``criterion`` is None.
        adv_cfg: Attack and loss settings; or pass them as keyword arguments (``eps='8/255', steps=10, ...``).
        mean, std: Normalisation of the inputs (the data config's); default: the model's timm ``pretrained_cfg``
            (a ValueError if it has none: ``mean=(0, 0, 0), std=(1, 1, 1)`` for a model taking [0, 1] pixels).
        input_normalized: Inputs arrive normalised (timm's loaders and prefetcher do this); False for pixels
            in [0, 1] fed to a model that takes them as they are (then mean/std do not apply).
        device, dtype, verbose: As for ``timm.task.ClassificationTask``.

    ``forward`` returns ``loss``, ``output`` (clean logits; adversarial ones for Madry / lambda 1),
    ``output_adv``, ``loss_clean``, ``loss_adv`` and attack statistics (``adv_eps``, ``acc_clean``, ``acc_adv``,
    ``attack_zero_grad_frac``), all tensors, none of them synchronised with the host. ``loss_clean`` and
    ``loss_adv`` are the classification losses of the clean and adversarial outputs: for nofrost/madry the
    criterion's (``loss = (1 - lambda) * loss_clean + lambda * loss_adv``); for trades ``loss_clean`` is its
    natural term (the criterion's) and ``loss_adv`` the criterion on the adversarial outputs (logged only);
    for mart ``loss_clean`` is plain CE on the clean outputs (logged only) and ``loss_adv`` its boosted CE on
    the adversarial ones. trades and mart also return ``loss_robust``, the beta-weighted KL term:
    ``loss = loss_clean + loss_robust`` (trades), ``loss_adv + loss_robust`` (mart).
    """

    def __init__(
            self,
            model: nn.Module,
            criterion: Optional[Union[nn.Module, Callable]] = None,
            criterion_kwargs: Optional[Dict[str, Any]] = None,
            adv_cfg: Optional[AdversarialConfig] = None,
            mean: Optional[Sequence[float]] = None,
            std: Optional[Sequence[float]] = None,
            input_normalized: bool = True,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
            verbose: bool = True,
            **adv_kwargs: Any,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f'AdversarialTrainer needs a torch.nn.Module, got {type(model).__name__}.')
        if adv_cfg is not None and adv_kwargs:
            raise ValueError(f'Pass either adv_cfg or adversarial keyword arguments, not both: {sorted(adv_kwargs)}.')
        if adv_cfg is not None and not isinstance(adv_cfg, AdversarialConfig):
            raise TypeError(f'adv_cfg must be an AdversarialConfig, got {type(adv_cfg).__name__}.')
        try:
            adv_cfg = adv_cfg or AdversarialConfig(**adv_kwargs)
        except TypeError as e:
            accepted = ', '.join(AdversarialConfig.__dataclass_fields__)
            raise TypeError(f'{e}; accepted adversarial settings: {accepted}.') from None
        if criterion is None and criterion_kwargs is None:
            criterion_kwargs = dict(NOFROST_CRITERION_KWARGS)
        if input_normalized:  # the inputs' normalisation: given, the model's timm pretrained_cfg, or a ValueError
            mean, std = resolve_mean_std(model, mean, std)
        elif mean is not None or std is not None:
            raise ValueError('input_normalized=False feeds the [0, 1] pixel inputs to the model as they are, so '
                             'mean/std do not apply; drop them, or pass normalised inputs with input_normalized=True.')
        else:  # the model takes pixels: the attack must see the same function the training forward does
            mean, std = (0.0,), (1.0,)
        self.batch_mode = resolve_batch_mode(unwrap_model(model), adv_cfg.batch_mode)
        if self.batch_mode == 'split' and not has_split_batchnorm(model):
            from timm.layers import convert_splitbn_model
            model = convert_splitbn_model(model, num_splits=2)
        super().__init__(model, criterion=criterion, criterion_kwargs=criterion_kwargs, device=device, dtype=dtype,
                         verbose=verbose)
        self.adv_cfg = adv_cfg
        self.mean, self.std = mean, std
        self.input_normalized = input_normalized
        self.adv_batches = 0  # batches attacked so far: drives the eps warm-up, kept in the task state
        self._attack: Optional[PGD] = None
        if verbose:
            _logger.info(f'AdversarialTrainer: {adv_cfg.describe()}, batch mode {self.batch_mode}')

    def attack(self) -> PGD:
        """The training attack (PGD, or one step of it) on the current (unwrapped) trainable module."""
        module = unwrap_model(self.get_trainable_module())
        if self._attack is None or self._attack.model.model is not module:
            cfg = self.adv_cfg
            self._attack = PGD(
                PixelModel(module, self.mean, self.std), threat=cfg.threat, steps=max(cfg.steps, 1),
                step_fraction=cfg.step_fraction, random_start=cfg.random_start, loss='ce')
        return self._attack

    def make_adversarial(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Adversarial versions of ``input`` (in the same normalisation and memory format) and attack stats.

        The attack maximises CE on ``target`` (soft targets too), MART's CE on the hard label, or TRADES'
        KL(p(x) || p(x')) with p(x) from the eval-mode model (CE with the soft target p(x): the same input
        gradient direction).
        """
        cfg = self.adv_cfg
        eps = cfg.eps_at(self.adv_batches)
        # random erasing / noise can leave the [0, 1] range: the attack's ball lives in valid images
        pixels = (denormalize(input, self.mean, self.std) if self.input_normalized else input).detach().clamp(0, 1)
        attack = self.attack()
        device_type = input.device.type  # the attack's autocast: its own dtype, or the caller's
        attack.amp_dtype = amp_dtype(cfg.attack_dtype) or (
            torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None)
        eps_t = torch.full((input.shape[0],), eps, device=input.device, dtype=pixels.dtype)
        # N-FGSM projects onto its wider radius; a multiple of eps, it scales with the warm-up like the step does
        radius = None if cfg.radius_fraction == 1 else eps_t * cfg.radius_fraction
        if cfg.attack == 'n-fgsm':  # uniform noise in the k * eps ball (kept in [0, 1])
            delta = random_delta(pixels, NFGSM_NOISE * eps_t, cfg.norm, None)
        elif cfg.attack == 'pgd' and cfg.method in BETA_METHODS and cfg.random_start:
            delta = 0.001 * torch.randn_like(pixels)  # the reference codes' start, neither projected nor clamped
        else:
            delta = None  # generate's own start: uniform in the eps ball, or zero
        labels = _hard_labels(target) if cfg.method == 'mart' else target
        with attack_mode(attack.model):
            if cfg.method == 'trades':
                with torch.no_grad():
                    labels = torch.softmax(attack.logits(pixels).to(pixels.dtype), dim=1)
            x_adv, zeros = attack.generate(pixels, labels, eps=eps_t, delta=delta, radius=radius)
        x_adv = normalize(x_adv, self.mean, self.std) if self.input_normalized else x_adv
        if input.is_contiguous(memory_format=torch.channels_last) and not input.is_contiguous():
            x_adv = x_adv.contiguous(memory_format=torch.channels_last)
        return {
            'input_adv': x_adv.to(input.dtype).detach(),
            'adv_eps': torch.tensor(eps, device=input.device),
            'attack_zero_grad_frac': zeros.float() / max(input.numel() * cfg.steps, 1),
        }

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Attack the batch, then one training forward (or two, for shared BN) and the method's loss. A batch
        ``check_inputs`` refuses (NaN, pixels outside [0, 1] with ``input_normalized=False``, ...) is a ValueError
        or TypeError."""
        input = check_inputs(input, target, pixels=not self.input_normalized, model=self.trainable_module,
                             soft_labels=True)
        cfg = self.adv_cfg
        if cfg.method == 'nofrost' and cfg.adv_weight == 0:
            result = super().forward(input, target)
            return {**result, 'loss_clean': result['loss'].detach()}
        adv = self.make_adversarial(input, target)
        self.adv_batches += 1
        x_adv = adv.pop('input_adv')
        module = self.trainable_module
        out_clean = None
        if not cfg.uses_clean_forward and self.batch_mode != 'split':
            out_adv = module(x_adv)  # Madry AT: the clean half would carry no weight
        elif self.batch_mode == 'separate':
            out_clean, out_adv = module(input), module(x_adv)
        else:  # concat (normalizer-free) or split BN: one forward on both halves
            out_clean, out_adv = module(torch.cat([input, x_adv], dim=0)).split(input.shape[0])
        labels = _hard_labels(target)
        result = dict(adv)
        if cfg.method == 'trades':
            loss_clean = self.criterion(out_clean, target)
            loss_robust = cfg.beta * trades_kl(out_clean, out_adv)
            loss = loss_clean + loss_robust
            with torch.no_grad():
                loss_adv = self.criterion(out_adv, target)
        elif cfg.method == 'mart':
            loss_adv, robust = mart_terms(out_clean, out_adv, labels)
            loss_robust = cfg.beta * robust
            loss = loss_adv + loss_robust
            with torch.no_grad():
                loss_clean = F.cross_entropy(out_clean, labels)
        else:
            loss_adv = self.criterion(out_adv, target)
            loss_clean = None if out_clean is None else self.criterion(out_clean, target)
            loss = loss_adv if out_clean is None else (1 - cfg.adv_weight) * loss_clean + cfg.adv_weight * loss_adv
        if cfg.method in BETA_METHODS:
            result['loss_robust'] = loss_robust.detach()
        if loss_clean is not None:
            result['loss_clean'] = loss_clean.detach()
        result.update(
            loss=loss,
            loss_adv=loss_adv.detach(),
            output=out_clean if out_clean is not None else out_adv,
            output_adv=out_adv,
            acc_adv=(out_adv.detach().argmax(dim=1) == labels).float().mean(),
        )
        if out_clean is not None:
            result['acc_clean'] = (out_clean.detach().argmax(dim=1) == labels).float().mean()
        return result

    def prepare_distributed(self, device_ids: Optional[list] = None, **ddp_kwargs: Any) -> 'AdversarialTrainer':
        """Wrap the model in DDP. CPU device ids are dropped (timm's train.py passes ``[device]`` on every
        device, but DDP takes device ids for GPU modules only), so gloo training on CPUs works too."""
        if device_ids and all(isinstance(d, (str, torch.device)) and torch.device(d).type == 'cpu'
                              for d in device_ids):
            device_ids = None
        return super().prepare_distributed(device_ids=device_ids, **ddp_kwargs)

    # -- task state (resume keeps the warm-up position) -------------------------------------------------
    def get_task_state(self, module: Optional[nn.Module] = None, ema: bool = False) -> Dict[str, Any]:
        return {} if ema else {'adv_batches': self.adv_batches, 'adv_cfg': self.adv_cfg.to_dict(),
                               'batch_mode': self.batch_mode}

    def load_task_state(self, state: Optional[Dict[str, Any]], strict: bool = True, module: Optional[nn.Module] = None,
                        ema: bool = False) -> None:
        if state and not ema:
            saved = state.get('adv_cfg') if isinstance(state.get('adv_cfg'), dict) else state
            for key, flag in (('method', '--adv-method'), ('attack', '--adv-attack')):
                was = saved.get(key, state.get(key, {'method': 'nofrost', 'attack': 'pgd'}[key]))
                now = getattr(self.adv_cfg, key)
                if was != now:  # a resumed run continues its own recipe, never silently another one
                    raise ValueError(f'This checkpoint was trained with {key} {was!r}, but the task is configured '
                                     f'with {now!r}; resume with {flag} {was} (or start a new run).')
            self.adv_batches = int(state.get('adv_batches', 0))
