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

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """`valid` (R,) bool: the real rows of x, over which the batch statistics are taken (torch.compile keeps a
        padded batch's padding tokens as rows; eager drops them and passes None). Padding rows are normalised with
        the real rows' statistics and add nothing to them."""
        if not (self.training and self.track_running_stats):
            if valid is not None and (self.training or self.running_mean is None):  # batch statistics, not updated
                return self._traced_forward(x, valid, update=False)
            return super().forward(x)
        self._check_input_dim(x)
        self.num_batches_tracked.add_(1)
        if valid is not None or torch.compiler.is_compiling():
            return self._traced_forward(x, valid)
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, True, self.update_factor(), self.eps
        )

    def _traced_forward(self, x: torch.Tensor, valid: torch.Tensor | None = None, update: bool = True) -> torch.Tensor:
        """The same update with the factor a tensor: under torch.compile, reading the counter as a Python number
        would break the graph and freeze its value into the guards (a recompilation every step). With `valid`, the
        statistics (and the unbiased variance's count) are those of the real rows only, as eager's."""
        if valid is None:
            var, mean = torch.var_mean(x, dim=0, correction=0)
            rows = x.shape[0]
            bessel = rows / max(rows - 1, 1)
        else:
            keep = valid.unsqueeze(1)
            zero = torch.zeros((), dtype=x.dtype, device=x.device)
            rows = valid.sum().to(x.dtype)
            mean = torch.where(keep, x, zero).sum(dim=0) / rows.clamp(min=1)
            var = torch.where(keep, (x - mean).square(), zero).sum(dim=0) / rows.clamp(min=1)
            bessel = rows / (rows - 1).clamp(min=1)
        if update:
            count = self.num_batches_tracked.to(self.running_mean.dtype)
            factor = 1.0 / count if self.momentum is None else (1.0 / count).clamp(min=self.momentum)
            with torch.no_grad():
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), factor)
                unbiased = var.detach() * bessel
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)
        y = (x - mean) * torch.rsqrt(var + self.eps)
        return y * self.weight + self.bias if self.affine else y

    def reset_running_stats(self) -> None:
        super().reset_running_stats()
        self._averaging_done = False

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._averaging_done = False  # the loaded counter decides again


class _BatchNormLinear(torch.autograd.Function):
    """linear(batch_norm(x)) with the batch's statistics folded into the Linear's weights, in one node.

    Forward: logits = x @ (W diag(s))^T + (b + W (beta - mean * s)), s = gamma / sqrt(var + eps), from the statistics
    `torch.batch_norm_update_stats` computes in one pass (the kernel BatchNorm itself uses; `var_mean` over the rows
    takes 20x longer on CPU). Backward: BatchNorm's gradient written through the logits' gradient G (M, N):
    G^T x (an (N, D) GEMM) gives every parameter's gradient, and the input's is G @ A + x * u + v, one (M, D) tensor
    instead of BatchNorm's and the Linear's four. Nothing of size (M, D) is saved beyond x itself."""

    @staticmethod
    def forward(ctx, x, mean, var, eps, gamma, beta, weight, bias):
        invstd = (var + eps).rsqrt()
        scale = invstd if gamma is None else gamma * invstd
        shift = -mean * scale if beta is None else beta - mean * scale
        w = weight * scale  # (N, D)
        c = weight @ shift if bias is None else torch.addmv(bias, weight, shift)
        ctx.save_for_backward(x, mean, invstd, gamma, beta, weight)
        return torch.addmm(c, x, w.t())

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, mean, invstd, gamma, beta, weight = ctx.saved_tensors
        rows = x.shape[0]
        g_sum = grad.sum(0)  # (N,)
        g_xhat = (grad.t() @ x - g_sum.unsqueeze(1) * mean) * invstd  # (N, D) = G^T xhat
        y_sum = g_sum @ weight  # (D,) sum over rows of dL/dy, y = BatchNorm's output
        y_xhat = (weight * g_xhat).sum(0)  # (D,) sum over rows of dL/dy * xhat
        grad_x = grad_gamma = grad_beta = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            scale = invstd if gamma is None else gamma * invstd
            # dx = s * (dy - mean(dy) - xhat * mean(dy * xhat)): G @ (W s) + x * u + v
            u = -scale * invstd * y_xhat / rows
            v = -scale * y_sum / rows - mean * u
            grad_x = torch.addmm(v, grad, weight * scale)
            grad_x.addcmul_(x, u)
        if gamma is not None and ctx.needs_input_grad[4]:
            grad_gamma = y_xhat
        if beta is not None and ctx.needs_input_grad[5]:
            grad_beta = y_sum
        if ctx.needs_input_grad[6]:
            grad_weight = g_xhat if gamma is None else g_xhat * gamma
            if beta is not None:
                grad_weight = grad_weight.addr_(g_sum, beta)
        if ctx.needs_input_grad[7]:
            grad_bias = g_sum
        return grad_x, None, None, None, grad_gamma, grad_beta, grad_weight, grad_bias


# rows from which folding the running statistics into the Linear beats normalising x (about 6 small ops on (N, D)
# against one pass over (M, D))
FOLD_MIN_ROWS = 64


def _folded_linear(norm: nn.BatchNorm1d, linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """Evaluation: BatchNorm's running statistics folded into the Linear, x @ (W diag(s))^T + (b + W shift), one GEMM
    and no (M, D) normalised copy. Plain differentiable ops, so gradients still reach x and every parameter."""
    scale = (norm.running_var + norm.eps).rsqrt()
    if norm.weight is not None:
        scale = norm.weight * scale
    shift = -norm.running_mean * scale if norm.bias is None else norm.bias - norm.running_mean * scale
    c = linear.weight @ shift if linear.bias is None else torch.addmv(linear.bias, linear.weight, shift)
    return torch.addmm(c, x, (linear.weight * scale).t())


def batchnorm_linear(
    norm: nn.Module, linear: nn.Linear, x: torch.Tensor, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """linear(norm(x)) for x (M, D) and `norm` a BatchNorm1d. Training on batch statistics: one fused node
    (`_BatchNormLinear`, the same values and gradients up to float rounding; the running statistics are updated as
    `norm` would). Evaluating on running statistics: the statistics folded into the Linear (`_folded_linear`).
    Anything else (hooks, other norms, other shapes): the two modules. `valid`: the real rows of a padded batch
    under torch.compile (see `RouterBatchNorm1d.forward`)."""
    plain = (
        not isinstance(norm, nn.BatchNorm1d)
        or x.dim() != 2
        or bool(norm._forward_hooks or norm._forward_pre_hooks or linear._forward_hooks or linear._forward_pre_hooks)
    )
    if plain or valid is not None or torch.compiler.is_compiling():  # traced: plain ops, which the compiler fuses
        masked = valid is not None and isinstance(norm, RouterBatchNorm1d)
        return linear(norm(x, valid) if masked else norm(x))
    if not norm.training:
        if not (norm.track_running_stats and norm.running_mean is not None):
            return linear(norm(x))
        if x.shape[0] >= FOLD_MIN_ROWS:
            return _folded_linear(norm, linear, x)
        # a few rows (decoding): folding would cost more small ops than the one normalisation pass it saves
        normed = F.batch_norm(x, norm.running_mean, norm.running_var, norm.weight, norm.bias, False, 0.0, norm.eps)
        return F.linear(normed, linear.weight, linear.bias)
    if x.shape[0] <= 1:
        return linear(norm(x))
    norm._check_input_dim(x)
    if norm.track_running_stats:
        norm.num_batches_tracked.add_(1)
        factor = norm.update_factor() if isinstance(norm, RouterBatchNorm1d) else _torch_factor(norm)
        mean, var = torch.batch_norm_update_stats(x.detach(), norm.running_mean, norm.running_var, factor)
    else:
        mean, var = torch.batch_norm_update_stats(x.detach(), None, None, 0.0)
    return _BatchNormLinear.apply(x, mean, var, norm.eps, norm.weight, norm.bias, linear.weight, linear.bias)


def _torch_factor(norm: nn.BatchNorm1d) -> float:
    """nn.BatchNorm1d's own update factor (after `num_batches_tracked` counted the batch)."""
    return 1.0 / float(norm.num_batches_tracked) if norm.momentum is None else norm.momentum
