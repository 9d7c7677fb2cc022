"""The routers' BatchNorm: running statistics that are right after a short training, not only after a long one.

`nn.BatchNorm1d` starts its running mean at 0 and variance at 1 and moves them by `momentum` (0.1) per batch, so
after t batches the first values still weigh 0.9^t: 35% after 10 steps, 12% after 20. Routing inputs are hidden
states, far from mean 0 and variance 1, so in evaluation every row is shifted the same way and a short run routes
everything to one expert ("Routing collapse ... 100%") while training routed well.

Here the update factor of batch t (t = 1, 2, ...) is max(momentum, 1/t): the first batch sets the statistics, the
next ones form a plain average of the batches seen (the bias-corrected estimate of their mean, with no weight left
on the arbitrary initial values), and from t = 1/momentum on it is the usual exponential average, which follows the
features as training moves them. The state dict is `nn.BatchNorm1d`'s (`num_batches_tracked` is t), so a saved
router loads unchanged, and a router trained past 1/momentum batches updates exactly as `nn.BatchNorm1d` does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RouterBatchNorm1d(nn.BatchNorm1d):
    """`nn.BatchNorm1d` whose running statistics average the first 1/momentum batches, then follow the usual EMA."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._averaging_done = False  # known to be past the averaging phase: no need to read the counter (a sync)

    def update_factor(self) -> float:
        """The weight of the current batch in the running statistics (after `num_batches_tracked` counted it)."""
        if self.momentum is None:  # nn.BatchNorm1d's cumulative average, as asked for
            return 1.0 / float(self.num_batches_tracked)
        if self._averaging_done:
            return self.momentum
        factor = max(self.momentum, 1.0 / float(self.num_batches_tracked))
        self._averaging_done = factor == self.momentum
        return factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.track_running_stats):
            return super().forward(x)
        self._check_input_dim(x)
        self.num_batches_tracked.add_(1)
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, True, self.update_factor(), self.eps
        )

    def reset_running_stats(self) -> None:
        super().reset_running_stats()
        self._averaging_done = False

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._averaging_done = False  # the loaded counter decides again
