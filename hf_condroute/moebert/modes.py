"""Running a model in eval mode for a while and restoring every module's own mode afterwards."""

from __future__ import annotations

from contextlib import contextmanager

from torch import nn


@contextmanager
def eval_mode(model: nn.Module):
    """model.eval() inside the block; afterwards each module is back in the mode it had (not model.train())."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
