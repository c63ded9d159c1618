"""One training run of the study and its evaluation.

The protocol is the Group Normalization paper's (Wu & He 2018, Figure 1), after Goyal et
al. (2017): every batch size trains for the same number of epochs, with SGD (momentum 0.9)
at a learning rate scaled linearly with the batch (``base_lr * batch_size / 32``), a
linear warm-up over the first `warmup_fraction` of the steps, then a cosine decay to zero.
A fixed learning rate would confound the batch size with the number of steps (at batch 2
a network takes 16 times as many steps per epoch as at batch 32).

Batch Renorm follows Ioffe (2017): plain BatchNorm (r_max 1, d_max 0) during the warm-up,
then r_max ramped linearly to 3 and d_max to 5 by `RENORM_RAMP_END` of the run.

The evaluation of a BatchNorm-family network (Wu & Johnson 2021, "Rethinking 'Batch' in
BatchNorm") measures the test accuracy three ways, each on a copy of the trained network:

- ``accuracy`` (EMA): eval mode, the running statistics the layers kept in training;
- ``accuracy_precise_bn``: PreciseBN, `fastbn.nn.precise_bn` over the whole training set
  in batches of `PRECISE_BATCH_SIZE` (Ghost BatchNorm layers normalize those whole
  batches during the pass): the population statistics of the final weights;
- ``accuracy_precise_bn_train_batch``: PreciseBN in batches of the training batch (Ghost
  layers keep their virtual batches): the average of the statistics the layers saw in
  training, rather than the population's;
- ``accuracy_batch_stats``: no running statistics, each test batch normalized with its
  own statistics, in test batches of the training's normalization batch
  (``batch_stats_test_batch_size``: the SGD batch for BatchNorm and Batch Renorm, the
  virtual batch for Ghost BatchNorm), as in training.

Every other network has one accuracy (eval mode is training mode for them).
"""
import copy
import math
import time

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import fastbn
import fastbn.nn
from fastbn.study import data as study_data
from fastbn.study import models

LR_REFERENCE_BATCH = 32
RENORM_RAMP_END = 0.5
R_MAX, D_MAX = 3.0, 5.0
PRECISE_BATCH_SIZE = 200
EVAL_BATCH_SIZE = 500


def set_threads(threads):
    torch.set_num_threads(threads)
    fastbn.set_num_threads(threads)


def seed_everything(seed):
    """The initial weights come from torch's generator; numpy's is seeded too, for any
    layer that draws from it (none does today)."""
    import random

    import numpy as np

    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def learning_rate(peak, step, total_steps, warmup_steps):
    """Linear warm-up to `peak` over `warmup_steps`, then a cosine decay to 0."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


def renorm_limits(step, total_steps, warmup_steps):
    """Batch Renorm's (r_max, d_max) at `step`: (1, 0) during the warm-up, then ramped
    linearly to (R_MAX, D_MAX) by RENORM_RAMP_END of the run."""
    ramp_end = max(warmup_steps + 1, RENORM_RAMP_END * total_steps)
    t = min(1.0, max(0.0, (step - warmup_steps) / (ramp_end - warmup_steps)))
    return 1.0 + (R_MAX - 1.0) * t, D_MAX * t


def train(model, run, data, rank=0, world_size=1, network=None):
    """Train `model` as `run` says on `data`; return the training metrics.

    Parameters
    ----------
    model : torch.nn.Module
    run : experiments.Run
        The settings (batch size, epochs, seed, learning rate, ...).
    data : data.Dataset
    rank, world_size : int
        Data-parallel training: each global batch of ``run.batch_size`` images is cut
        into `world_size` equal parts and this process takes part `rank` (the images of
        a global batch are those of a single-process run at that batch size).
    network : torch.nn.Module, optional
        What the forward calls (a DistributedDataParallel wrapper of `model`).

    Returns
    -------
    dict
        ``train_loss`` (mean of the last epoch's batches; of every process's),
        ``steps``, ``diverged`` (a loss was not finite; it stops a single-process run),
        ``train_time_s``,
        ``time_per_epoch_s``, ``time_per_step_ms``.
    """
    network = model if network is None else network
    n = data.train_x.shape[0]
    local = run.batch_size // world_size
    steps_per_epoch = n // run.batch_size
    total = steps_per_epoch * run.epochs
    warmup = max(1, round(run.warmup_fraction * total))
    optimizer = torch.optim.SGD(model.parameters(), lr=run.lr, momentum=run.momentum,
                                weight_decay=run.weight_decay)
    renorm = [m for m in model.modules() if hasattr(m, "r_max") and hasattr(m, "d_max")]
    model.train()
    step = 0
    diverged = False
    last_losses = []
    start = time.perf_counter()
    for epoch in range(run.epochs):
        order = study_data.epoch_order(n, run.seed, epoch)
        last_losses = []
        for index in range(steps_per_epoch):
            chosen = order[index * run.batch_size:(index + 1) * run.batch_size]
            chosen = chosen[rank * local:(rank + 1) * local]
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(run.lr, step, total, warmup)
            for layer in renorm:
                layer.r_max, layer.d_max = renorm_limits(step, total, warmup)
            loss = nn.functional.cross_entropy(network(data.train_x[chosen]),
                                               data.train_y[chosen])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            value = loss.item()
            step += 1
            last_losses.append(value)
            if not math.isfinite(value):
                diverged = True
                # Processes must make the same collective calls: in data-parallel runs
                # the run goes on (the NaN reaches every process through the gradients).
                if world_size == 1:
                    break
        if diverged and world_size == 1:
            break
    elapsed = time.perf_counter() - start
    train_loss = sum(last_losses) / len(last_losses) if last_losses else math.nan
    if world_size > 1:  # every process's losses (the mean of a global batch), and flags
        import torch.distributed as dist

        summary = torch.tensor([train_loss, float(diverged)], dtype=torch.float64)
        dist.all_reduce(summary)
        train_loss, diverged = float(summary[0]) / world_size, bool(summary[1] > 0)
    return {"train_loss": train_loss,
            "steps": step, "diverged": diverged, "train_time_s": elapsed,
            "time_per_epoch_s": elapsed * steps_per_epoch / max(step, 1),
            "time_per_step_ms": 1e3 * elapsed / max(step, 1)}


@torch.no_grad()
def accuracy(model, x, y, batch_size=EVAL_BATCH_SIZE):
    """Test accuracy in percent, `model` in eval mode, in batches of `batch_size` (the
    last one holds the remainder)."""
    model.eval()
    correct = 0
    for xb, yb in study_data.batches(x, y, batch_size, drop_last=False):
        correct += int((model(xb).argmax(1) == yb).sum())
    return 100.0 * correct / x.shape[0]


class BatchStatistics(nn.Module):
    """A BatchNorm-family layer evaluated with batch statistics: each group of
    `group_size` consecutive samples normalized with its own mean and variance, the
    layer's affine parameters, no running statistics."""

    def __init__(self, layer, group_size):
        super().__init__()
        self.layer, self.group_size = layer, group_size

    def forward(self, x):
        layer = self.layer
        return fastbn.nn.ghost_batch_norm(x, self.group_size, None, None, layer.weight,
                                          layer.bias, training=True, eps=layer.eps)


def _batch_norm_layers(model):
    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, _BatchNorm)]


def _replace(model, name, new):
    parent, _, attribute = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attribute, new)


def norm_batch_size(run):
    """The number of samples a BatchNorm-family layer normalizes over in training."""
    if run.norm == "ghost":
        return run.virtual_batch_size
    if run.norm == "sync":
        return run.batch_size
    return run.batch_size // run.processes


def _precise(model, data, batch_size, ghost_batch_size=None):
    """A copy of `model` with PreciseBN statistics over the training set in batches of
    `batch_size` (Ghost layers' virtual batch set to `ghost_batch_size` if given)."""
    model = copy.deepcopy(model)
    if ghost_batch_size is not None:
        for _, layer in _batch_norm_layers(model):
            if hasattr(layer, "virtual_batch_size"):
                layer.virtual_batch_size = ghost_batch_size
    count = data.train_x.shape[0] // batch_size
    fastbn.nn.precise_bn(model, study_data.batches(data.train_x, data.train_y, batch_size),
                         num_batches=count, progress=False)
    return model


def evaluate(model, run, data):
    """The test accuracies of a trained network (see the module docstring)."""
    results = {"accuracy": accuracy(model, data.test_x, data.test_y)}
    if run.norm not in models.BATCH_NORMS:
        return results
    precise_batch = min(PRECISE_BATCH_SIZE, data.train_x.shape[0])
    results["accuracy_precise_bn"] = accuracy(
        _precise(model, data, precise_batch, ghost_batch_size=precise_batch),
        data.test_x, data.test_y)
    group = norm_batch_size(run)
    # Ghost layers cut the training batch into their virtual batches themselves.
    train_batch = run.batch_size if run.norm == "ghost" else group
    results["accuracy_precise_bn_train_batch"] = accuracy(
        _precise(model, data, train_batch), data.test_x, data.test_y)
    with_batch_statistics = copy.deepcopy(model)
    for name, layer in _batch_norm_layers(with_batch_statistics):
        _replace(with_batch_statistics, name, BatchStatistics(layer, group))
    results["accuracy_batch_stats"] = accuracy(with_batch_statistics, data.test_x,
                                               data.test_y, batch_size=group)
    results["batch_stats_test_batch_size"] = group
    return results
