"""Grouped linear layers: `torch.nn.functional.grouped_mm` where a one-time probe finds it working on the device
and dtype, else one matmul per non-empty group."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .grouping import group_offsets

_GROUPED_MM_OK: dict[tuple, bool] = {}


def grouped_mm_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `torch.nn.functional.grouped_mm` runs here, forward and backward (probed once per device
    and dtype: support differs between torch versions, CPUs and GPU generations)."""
    key = (device.type, device.index, dtype)
    if key not in _GROUPED_MM_OK:
        ok = hasattr(F, "grouped_mm")
        if ok:
            try:
                ok = _probe_grouped_mm(device, dtype)
            except (RuntimeError, NotImplementedError, TypeError, ValueError):
                ok = False
        _GROUPED_MM_OK[key] = ok
    return _GROUPED_MM_OK[key]


def _probe_grouped_mm(device: torch.device, dtype: torch.dtype) -> bool:
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype).requires_grad_()

    a, b, bias, scale = rand(24, 32), rand(3, 32, 16), rand(3, 16), rand(24)
    counts = [8, 0, 16]  # an empty group too
    offs = group_offsets(counts, device)
    with torch.enable_grad():
        out = _GroupedLinear.apply(a, b, offs, counts, bias, scale)
        grads = torch.autograd.grad(out.float().sum(), (a, b, bias, scale))
        ref = _looped_linear(a, b, counts, bias, scale)
        ref_grads = torch.autograd.grad(ref.float().sum(), (a, b, bias, scale))
    pairs = [(out, ref), *zip(grads, ref_grads)]
    return all(torch.allclose(x.float(), y.float(), rtol=2e-2, atol=2e-2) for x, y in pairs)


def _segments(counts: list[int]):
    start = 0
    for e, c in enumerate(counts):
        if c:
            yield e, start, start + c
        start += c


class _GroupedLinear(torch.autograd.Function):
    """F.grouped_mm(a, b, offs), plus row_scale[i] * bias[e] added in place to each row i of group e.

    Its own backward because grouped_mm's refuses gradients that are not dense (e.g. from `out.sum()`),
    and so that the bias needs no (rows, H) buffer: it is added group by group (a loop over experts, not
    rows)."""

    @staticmethod
    def forward(ctx, a, b, offs, counts, bias, row_scale):
        out = F.grouped_mm(a, b, offs=offs)
        if bias is not None:
            for e, start, end in _segments(counts):
                if row_scale is None:
                    out[start:end].add_(bias[e])
                else:
                    out[start:end].addr_(row_scale[start:end], bias[e])
        ctx.save_for_backward(a, b, offs, bias, row_scale)
        ctx.counts = counts
        return out

    @staticmethod
    def backward(ctx, grad):
        a, b, offs, bias, row_scale = ctx.saved_tensors
        grad = grad.contiguous()
        grad_a = grad_b = grad_bias = grad_scale = None
        if ctx.needs_input_grad[0]:
            grad_a = F.grouped_mm(grad, b.transpose(-2, -1), offs=offs)
        if ctx.needs_input_grad[1]:
            grad_b = F.grouped_mm(a.transpose(-2, -1), grad, offs=offs)
        if bias is not None and ctx.needs_input_grad[4]:
            grad_bias = torch.zeros_like(bias)
            for e, start, end in _segments(ctx.counts):
                if row_scale is None:
                    torch.sum(grad[start:end], 0, out=grad_bias[e])
                else:
                    torch.mv(grad[start:end].t(), row_scale[start:end], out=grad_bias[e])
        if row_scale is not None and ctx.needs_input_grad[5]:
            grad_scale = torch.zeros_like(row_scale)
            for e, start, end in _segments(ctx.counts):
                torch.mv(grad[start:end], bias[e], out=grad_scale[start:end])
        return grad_a, grad_b, None, None, grad_bias, grad_scale


def _looped_linear(a, b, counts, bias=None, row_scale=None):
    """The same as _GroupedLinear with one matmul per non-empty group (where grouped_mm is unsupported)."""
    per_expert = b.unbind(0)  # one backward node stacks the per-expert gradients
    parts = []
    for e, start, end in _segments(counts):
        part = a[start:end] @ per_expert[e]
        if bias is not None:
            part = part + bias[e] if row_scale is None else torch.addr(part, row_scale[start:end], bias[e])
        parts.append(part)
    return torch.cat(parts) if parts else a.new_zeros(0, b.shape[2])


def _grouped_mm_fits(a: torch.Tensor, b: torch.Tensor) -> bool:
    # grouped GEMM kernels need 16-byte aligned row strides
    size = a.element_size()
    # traced by torch.compile, grouped_mm takes bf16 only (the eager probe passes float32 on CPU)
    traced_ok = not torch.compiler.is_compiling() or a.dtype == torch.bfloat16
    return (
        traced_ok
        and a.dtype == b.dtype
        and a.shape[-1] * size % 16 == 0
        and b.shape[-1] * size % 16 == 0
        and grouped_mm_supported(a.device, a.dtype)
    )


def grouped_linear(
    a: torch.Tensor,
    b: torch.Tensor,
    offsets: torch.Tensor,
    counts: list[int],
    bias: torch.Tensor | None = None,
    row_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """a (M, D), its rows grouped by expert (group e has counts[e] rows and ends at offsets[e]), times
    b[e] (N, D, H) -> (M, H), plus bias[e] (N, H) on each row of group e, times row_scale (M,) if given.

    One `torch.nn.functional.grouped_mm` where this device and dtype support it (on CPU it runs each group
    as one large GEMM; on CUDA it needs bf16 and a recent GPU), else one matmul per non-empty group."""
    if bias is None:
        row_scale = None  # it scales only the bias
    if a.shape[0] > 0 and _grouped_mm_fits(a, b):
        return _GroupedLinear.apply(a.contiguous(), b, offsets, counts, bias, row_scale)
    return _looped_linear(a, b, counts, bias, row_scale)
