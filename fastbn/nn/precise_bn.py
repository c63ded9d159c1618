"""PreciseBN (Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm"; fvcore's
`update_bn_stats`): recompute the running statistics of every BatchNorm layer as the
true average of per-batch statistics over many batches, with the weights fixed.

During training the running statistics are an exponential moving average over
batches seen while the weights kept changing: the early ones describe a network
that no longer exists, and with a small momentum the average lags. PreciseBN runs
the model forward in training mode (no gradients) on `num_batches` batches and sets
each layer's running mean and variance to the average of its batches' means and
unbiased variances.

How the average is taken, per layer, through the layer's own running update (so it
works for any BatchNorm layer, torch's or fastbn's, and costs nothing beyond the
forward passes):

- layers whose statistics are those of their input (BatchNorm*d, Batch Renorm): the
  momentum of batch t is n_t / (n_1 + ... + n_t), n_t the values per channel of its
  input, which makes the running statistics the average of the per-batch ones
  weighted by batch size (equal batches: the plain average, fvcore's);
- Ghost BatchNorm and SyncBatchNorm: momentum None (torch's cumulative average) from
  a zeroed ``num_batches_tracked``: each virtual batch, resp. each global batch, weighs
  the same (a SyncBatchNorm's processes must all use the same momenta, and only the
  global count would weight them right).
"""
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from fastbn.nn.ghost import GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d
from fastbn.nn.sync_batch_norm import SyncBatchNorm

__all__ = ["StatisticsChange", "precise_bn"]

# Layers whose running update is not one per call on the call's input: equal weights.
_EQUAL_WEIGHTS = (GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d, SyncBatchNorm,
                  nn.SyncBatchNorm)


@dataclass
class StatisticsChange:
    """One layer's running statistics before and after `precise_bn`.

    Attributes
    ----------
    old_mean, old_var, new_mean, new_var : Tensor of shape (C,)
    eps : float
        The layer's eps, for `mean_shift`.
    """

    old_mean: torch.Tensor
    old_var: torch.Tensor
    new_mean: torch.Tensor
    new_var: torch.Tensor
    eps: float

    @property
    def mean_shift(self):
        """The largest change of a channel's mean, in units of its new standard deviation."""
        shift = (self.new_mean - self.old_mean).abs() / (self.new_var + self.eps).sqrt()
        return float(shift.max()) if shift.numel() else 0.0

    @property
    def var_ratio(self):
        """The largest factor by which a channel's variance (plus eps) changed, up or down
        (1: unchanged)."""
        ratio = (self.new_var + self.eps) / (self.old_var + self.eps)
        ratio = torch.maximum(ratio, 1.0 / ratio)
        return float(ratio.max()) if ratio.numel() else 1.0


def _default_forward(model, batch):
    """model(batch); for a tuple or list (a data loader's (inputs, targets)), model(batch[0]);
    for a dict, model(**batch)."""
    if isinstance(batch, (tuple, list)):
        return model(batch[0])
    if isinstance(batch, dict):
        return model(**batch)
    return model(batch)


def precise_bn(model, batches, num_batches=200, progress=True, forward=None):
    """Recompute every BatchNorm layer's running statistics as the average over batches.

    Every :class:`torch.nn.modules.batchnorm._BatchNorm` layer of `model` that tracks
    running statistics (torch's and fastbn's BatchNorm*d, SyncBatchNorm, Ghost BatchNorm,
    Batch Renorm; not FrozenBatchNorm2d) is put in training mode for the passes, which
    run under ``torch.no_grad()``; the other modules keep their mode (Dropout in eval mode
    stays off). Afterwards each layer's training mode, momentum and
    ``num_batches_tracked`` are what they were; only ``running_mean`` and ``running_var``
    change. If a batch raises, every layer is restored as it was, statistics included,
    and the error propagates.

    Parameters
    ----------
    model : torch.nn.Module
    batches : iterable
        E.g. a DataLoader; only its first `num_batches` items are used.
    num_batches : int, >= 1
        fvcore's default is 200 (Wu & Johnson: a few hundred suffice).
    progress : bool
        Show a tqdm progress bar.
    forward : callable, optional
        ``forward(model, batch)`` runs the model on one item of `batches`. Default:
        ``model(batch)``, ``model(batch[0])`` for a tuple or list, ``model(**batch)`` for
        a dict.

    Returns
    -------
    dict of str to StatisticsChange
        For each layer (by its name in ``model.named_modules()``), its statistics before
        and after.

    Raises
    ------
    ValueError
        `num_batches` < 1, or `batches` had no item.
    """
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
        raise ValueError(f"num_batches must be an int >= 1, got {num_batches!r}")
    forward = _default_forward if forward is None else forward
    layers = {name: module for name, module in model.named_modules()
              if isinstance(module, _BatchNorm) and module.track_running_stats
              and module.running_mean is not None and module.running_var is not None}
    saved = {name: (module.training, module.momentum, module.running_mean.clone(),
                    module.running_var.clone(),
                    None if module.num_batches_tracked is None
                    else module.num_batches_tracked.clone())
             for name, module in layers.items()}
    hooks = []
    seen = {}

    def weigh_by_batch_size(module, args):
        input = args[0]
        values = input.numel() // input.shape[1] if input.dim() > 1 and input.shape[1] else 0
        seen[module] = seen.get(module, 0) + values
        module.momentum = values / seen[module] if seen[module] else 0.0

    for module in layers.values():
        module.train()
        if isinstance(module, _EQUAL_WEIGHTS):
            module.momentum = None
            module.num_batches_tracked.zero_()
        else:
            hooks.append(module.register_forward_pre_hook(weigh_by_batch_size))
    done = 0
    failed = True
    try:
        from tqdm.auto import tqdm

        with torch.no_grad(), tqdm(total=num_batches, desc="precise_bn",
                                   disable=not progress) as bar:
            for batch in batches:  # no item is taken past the last one used
                forward(model, batch)
                done += 1
                bar.update()
                if done == num_batches:
                    break
        if done == 0:
            raise ValueError("precise_bn got no batches: `batches` was empty")
        failed = False
    finally:
        for hook in hooks:
            hook.remove()
        for name, module in layers.items():
            training, momentum, old_mean, old_var, num_batches_tracked = saved[name]
            module.train(training)
            module.momentum = momentum
            if num_batches_tracked is not None:
                module.num_batches_tracked.copy_(num_batches_tracked)
            if failed:
                module.running_mean.copy_(old_mean)
                module.running_var.copy_(old_var)
    if done < num_batches:
        warnings.warn(f"precise_bn ran {done} batches: `batches` ended before num_batches="
                      f"{num_batches}", stacklevel=2)
    return {name: StatisticsChange(saved[name][2], saved[name][3],
                                   module.running_mean.detach().clone(),
                                   module.running_var.detach().clone(), module.eps)
            for name, module in layers.items()}
