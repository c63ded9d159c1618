"""What the BatchNorm-family layers of the small-batch toolbox share: the running-statistics
bookkeeping of torch's `_BatchNorm.forward`, and the checks a training call makes before
it changes any state.

Ghost BatchNorm, Batch Renormalization and SyncBatchNorm are BatchNorm with other
batch statistics; their buffers, momentum rules and errors are BatchNorm's.
"""
import math

import torch


class RunningState:
    """What a BatchNorm-family forward reads from its module, once per call.

    As torch's `_BatchNorm.forward`: `bn_training` (normalize with batch statistics: in
    training, and in eval mode when the module has no running statistics), the buffers
    to update or read (None when training does not track them), and the momentum
    (``momentum=None``: a cumulative average, ``1 / (num_batches_tracked + 1)`` for the
    next batch). `track`: whether the call counts a batch in ``num_batches_tracked``;
    the caller counts only after the call succeeded (a failed call changes no state).
    """

    __slots__ = ("bn_training", "running_mean", "running_var", "track", "momentum",
                 "num_batches_tracked")

    def __init__(self, module):
        training = module.training
        self.running_mean, self.running_var = module.running_mean, module.running_var
        self.num_batches_tracked = module.num_batches_tracked
        self.track = (training and module.track_running_stats
                      and self.num_batches_tracked is not None)
        self.momentum = module.momentum
        self.bn_training = training or (self.running_mean is None and self.running_var is None)
        if training and not module.track_running_stats:  # untracked buffers are not updated
            self.running_mean = self.running_var = None

    def momentum_of_batch(self, index=0):
        """The momentum of the `index`-th batch of this call (ghost batches: one per chunk)."""
        if self.momentum is not None:
            return self.momentum
        if not self.track:
            return 0.0
        return 1.0 / float(self.num_batches_tracked.item() + 1 + index)

    def count(self, batches=1):
        if self.track:
            self.num_batches_tracked.add_(batches)


def check_eps(eps, training):
    """torch.nn.functional.batch_norm's eps checks, with its messages."""
    if training and eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")


def check_batch_size(shape):
    """torch's error for a training batch with one value per channel."""
    if shape[0] * math.prod(shape[2:]) == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, "
                         f"got input size {torch.Size(shape)}")


def channel_view(vector, input):
    """A per-channel vector shaped to broadcast over `input`: (1, C, 1, ...)."""
    return vector.view((1, -1) + (1,) * (input.dim() - 2))
