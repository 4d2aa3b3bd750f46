"""AdversarialTrainer under DistributedDataParallel: two CPU processes (gloo) train like one process on the
global batch, and the attack never triggers a gradient all-reduce nor touches parameter gradients.

The ranks run in child processes started with ``torch.multiprocessing.spawn``; a failing rank's traceback is
re-raised in the test (``ProcessRaisedException``) and the other rank is terminated, and every collective has
a timeout, so a broken rank cannot hang the suite.

The runs use float64: the attack takes the sign of input gradients, and in float32 a near-zero gradient
entry can flip sign between a batch of 8 (one process) and a batch of 4 (one rank), because the convolution
kernels differ with the batch size. float64 makes both runs agree to ~1e-12, so the tolerance below tests
DDP, not rounding luck.
"""
import datetime
import os
import socket
import sys
from typing import Dict, List

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from timm_nofrost import AdversarialTrainer

from conftest import randomize_gains, tiny_model

pytestmark = pytest.mark.slow

WORLD_SIZE = 2
STEPS = 4
PER_RANK = 4
IMG = 16
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
ADV = dict(eps=8 / 255, steps=2, random_start=False, adv_weight=0.5)
DTYPE = torch.float64
TIMEOUT_S = 90


def make_model() -> torch.nn.Module:
    model = tiny_model(num_classes=4, drop_rate=0., drop_path_rate=0.)
    return randomize_gains(model).to(DTYPE)


def global_batches() -> List[tuple]:
    """``STEPS`` global batches of ``WORLD_SIZE * PER_RANK`` normalised images and labels."""
    g = torch.Generator().manual_seed(123)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    out = []
    for _ in range(STEPS):
        pixels = torch.rand(WORLD_SIZE * PER_RANK, 3, IMG, IMG, generator=g)
        labels = torch.randint(0, 4, (WORLD_SIZE * PER_RANK,), generator=g)
        out.append((((pixels - mean) / std).to(DTYPE), labels))
    return out


def make_task(model: torch.nn.Module) -> AdversarialTrainer:
    return AdversarialTrainer(model, mean=MEAN, std=STD, verbose=False, **ADV)


def make_optimizer(task: AdversarialTrainer) -> torch.optim.Optimizer:
    return torch.optim.SGD(task.trainable_module.parameters(), lr=0.1, momentum=0.9, nesterov=True)


def train_single_process() -> Dict[str, object]:
    """The reference: one process, each step on the whole global batch."""
    task = make_task(make_model())
    optimizer = make_optimizer(task)
    losses = []
    for x, y in global_batches():
        optimizer.zero_grad()
        out = task(x, y)
        out['loss'].backward()
        optimizer.step()
        losses.append(out['loss'].item())
    return {'losses': losses, 'state': {k: v.detach().clone() for k, v in task.trainable_module.state_dict().items()}}


def _grads(params) -> List[object]:
    return [None if p.grad is None else p.grad.detach().clone() for p in params]


def _worker(rank: int, port: int) -> Dict[str, object]:
    """One rank: DDP-wrapped AdversarialTrainer on its half of each global batch, instrumented."""
    torch.set_num_threads(1)
    os.environ['MASTER_ADDR'] = '127.0.0.1'
    os.environ['MASTER_PORT'] = str(port)
    dist.init_process_group('gloo', rank=rank, world_size=WORLD_SIZE,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))
    try:
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        task = make_task(make_model())
        task.prepare_distributed()
        ddp = task.trainable_module
        assert isinstance(ddp, torch.nn.parallel.DistributedDataParallel), type(ddp)
        params = list(ddp.module.parameters())
        optimizer = make_optimizer(task)

        state = {'attacking': False}
        log = {'hook_in_attack': 0, 'hook_in_train': 0, 'ddp_forward_in_attack': 0, 'ddp_forward_in_train': 0,
               'attack_touched_grads': [], 'attacks': 0}

        def counting_hook(process_group, bucket):
            log['hook_in_attack' if state['attacking'] else 'hook_in_train'] += 1
            return allreduce_hook(process_group, bucket)

        ddp.register_comm_hook(None, counting_hook)

        def count_forward(module, args):
            log['ddp_forward_in_attack' if state['attacking'] else 'ddp_forward_in_train'] += 1

        ddp.register_forward_pre_hook(count_forward)

        make_adversarial = task.make_adversarial

        def watched_make_adversarial(input, target):
            before = _grads(params)
            state['attacking'] = True
            try:
                adv = make_adversarial(input, target)
            finally:
                state['attacking'] = False
            after = _grads(params)
            touched = any((a is None) != (b is None) or (a is not None and not torch.equal(a, b))
                          for a, b in zip(before, after))
            log['attack_touched_grads'].append(touched)
            log['attacks'] += 1
            return adv

        task.make_adversarial = watched_make_adversarial

        losses, losses_clean, losses_adv, hooks_per_step = [], [], [], []
        for step, (x, y) in enumerate(global_batches()):
            part = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
            # step 0 attacks with .grad None, later steps with zero-filled .grad tensors: both must survive
            optimizer.zero_grad(set_to_none=step == 0)
            hooks_before = log['hook_in_train']
            out = task(x[part], y[part])
            out['loss'].backward()
            hooks_per_step.append(log['hook_in_train'] - hooks_before)
            optimizer.step()
            losses.append(out['loss'].item())
            losses_clean.append(out['loss_clean'].item())
            losses_adv.append(out['loss_adv'].item())

        return {
            'losses': losses, 'losses_clean': losses_clean, 'losses_adv': losses_adv,
            'hooks_per_step': hooks_per_step, 'log': log,
            'state': {k: v.detach().clone() for k, v in ddp.module.state_dict().items()},
        }
    finally:
        dist.destroy_process_group()


def _spawned(rank: int, port: int, out_dir: str) -> None:
    # results go through files: a pipe could fill up while the parent waits in join()
    torch.save(_worker(rank, port), os.path.join(out_dir, f'rank{rank}.pt'))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def run_ranks(out_dir) -> Dict[int, Dict]:
    # a failing child raises ProcessRaisedException here, with its own traceback in the message
    mp.start_processes(_spawned, args=(_free_port(), str(out_dir)), nprocs=WORLD_SIZE, join=True,
                       start_method='spawn')
    missing = [r for r in range(WORLD_SIZE) if not (out_dir / f'rank{r}.pt').exists()]
    assert not missing, f'ranks {missing} exited without results'
    return {r: torch.load(out_dir / f'rank{r}.pt') for r in range(WORLD_SIZE)}


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason='needs torch.distributed gloo')
@pytest.mark.skipif(sys.platform == 'win32', reason='gloo on loopback')
def test_ddp_matches_single_process_and_attack_never_all_reduces(tmp_path):
    reference = train_single_process()
    ranks = run_ranks(tmp_path)

    # (a) the mean loss across ranks is the single-process loss on the global batch, step after step
    mean_losses = [sum(ranks[r]['losses'][i] for r in ranks) / WORLD_SIZE for i in range(STEPS)]
    assert mean_losses == pytest.approx(reference['losses'], rel=1e-4), (mean_losses, reference['losses'])
    assert len(set(reference['losses'])) == STEPS  # the model did train: the losses moved
    for r in ranks:  # every rank ends with the same weights, and they are the single process's
        for name, value in reference['state'].items():
            torch.testing.assert_close(ranks[r]['state'][name], value, rtol=1e-4, atol=1e-7,
                                       msg=lambda m: f'rank {r} {name}: {m}')

    # (b) the attack runs outside DDP: no all-reduce, no DDP forward, parameter gradients untouched
    for r in ranks:
        log = ranks[r]['log']
        assert log['attacks'] == STEPS
        assert log['hook_in_attack'] == 0, f'rank {r}: {log["hook_in_attack"]} gradient all-reduces during attacks'
        assert log['ddp_forward_in_attack'] == 0, f'rank {r}: the attack went through the DDP wrapper'
        assert not any(log['attack_touched_grads']), f'rank {r}: attack changed .grad: {log["attack_touched_grads"]}'
        assert all(n > 0 for n in ranks[r]['hooks_per_step']), ranks[r]['hooks_per_step']
        assert log['ddp_forward_in_train'] == STEPS  # one training forward per step (concatenated batch)
        assert log['hook_in_train'] == sum(ranks[r]['hooks_per_step'])
