"""The fused grouped dispatch (`experts/fused.py`): pieces that split large groups and pack small ones, against a
naive per-row loop, forward and the gradients of the input, the combine weights and every expert weight; and its
inference path (no gradients wanted), against the same loop."""

from __future__ import annotations

import pytest
import torch

import hf_condroute.experts.fused as fused
from hf_condroute.experts import ExpertMLPWeights, expert_mlp
from hf_condroute.experts.fused import pieces

D, H, OUT, N = 16, 8, 12, 6


def mlp_weights(dtype, gated: bool, biases: bool, seed: int = 0) -> ExpertMLPWeights:
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * 0.3).to(dtype).requires_grad_()

    return ExpertMLPWeights(
        rand(N, D, H),
        rand(N, H) if biases else None,
        rand(N, H, OUT),
        rand(N, OUT) if biases else None,
        rand(N, D, H) if gated else None,
        rand(N, H) if gated and biases else None,
    )


def mlp_fields(mlp: ExpertMLPWeights) -> tuple:
    return (mlp.w1, mlp.b1, mlp.w2, mlp.b2, mlp.w_gate, mlp.b_gate)


def naive(x, experts, weights, mlp: ExpertMLPWeights, act):
    rows = []
    for r in range(x.shape[0]):
        acc = x.new_zeros(*x.shape[1:-1], OUT)
        for j in range(experts.shape[1]):
            e = int(experts[r, j])
            if e < 0:
                continue
            pre = x[r] @ mlp.w1[e] + (mlp.b1[e] if mlp.b1 is not None else 0)
            if mlp.gated:
                h = act(x[r] @ mlp.w_gate[e] + (mlp.b_gate[e] if mlp.b_gate is not None else 0)) * pre
            else:
                h = act(pre)
            acc = acc + weights[r, j] * (h @ mlp.w2[e] + (mlp.b2[e] if mlp.b2 is not None else 0))
        rows.append(acc)
    return torch.stack(rows)


def decision(rows, k, seed, counts_skew=True, drops=True):
    """Experts 1 and 5 get no rows (a middle and the last expert), expert 0 most rows (a group that is split)."""
    g = torch.Generator().manual_seed(seed)
    pool = torch.tensor([0, 0, 0, 0, 0, 2, 3, 4] if counts_skew else [0, 2, 3, 4])
    experts = torch.stack([pool[torch.randperm(len(pool), generator=g)[:k]] for _ in range(rows)])
    if k > 1:  # distinct experts per row, as top-k gives; repeats are tested in test_dispatch
        experts[:, 1] = torch.where(experts[:, 1] == experts[:, 0], (experts[:, 0] + 2) % 5, experts[:, 1])
        experts[experts == 1] = 3
    if drops:  # capacity drops: empty slots
        experts[2, 0] = -1
        experts[5, k - 1] = -1
    return experts, torch.rand(rows, k, generator=g, dtype=torch.float64)


CASES = [
    # (k, length, drops): k=1 without drops is a permutation (index_copy_), else index_add_
    (1, 1, False),
    (1, 1, True),
    (2, 1, True),
    (1, 3, False),
    (2, 3, True),
]


@pytest.mark.parametrize("k,length,drops", CASES)
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("biases", [True, False])
@pytest.mark.parametrize("grouped_mm", [True, False])
@pytest.mark.parametrize("chunk_bytes", [None, 6 * D * 8])
def test_fused_grouped_matches_the_per_row_loop(monkeypatch, k, length, drops, gated, biases, grouped_mm, chunk_bytes):
    dtype = torch.float64 if not grouped_mm else torch.float32  # grouped_mm has no float64: its loop fallback
    # grouped_mm for pieces of several experts (what CUDA takes; CPU loops mm(out=)), or the loop everywhere
    if grouped_mm:
        monkeypatch.setattr(fused, "_one_launch", fused._grouped_mm_fits)
    else:
        monkeypatch.setattr(fused, "_grouped_mm_fits", lambda a, b: False)
        monkeypatch.setattr(fused, "_one_launch", lambda a, b: False)
    if chunk_bytes is not None:  # pieces of ~6 tokens: the large group is split, small ones are packed
        monkeypatch.setattr(fused, "CHUNK_BYTES", chunk_bytes * torch.finfo(dtype).bits // 64)
    rows = 40
    experts, weights = decision(rows, k, seed=k + 10 * length)
    weights = weights.to(dtype).requires_grad_()
    mlp = mlp_weights(dtype, gated, biases)
    act = torch.nn.functional.silu if gated else torch.relu
    x = torch.randn(rows, length, D, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(rows, length, OUT, dtype=dtype)
    inputs = [x, weights, *mlp.parameters()]
    out = expert_mlp(x, experts, weights, mlp, act, strategy="grouped")
    ref = naive(x, experts, weights, mlp, act)
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out, ref, **tol)
    # with nothing to differentiate, the piece-by-piece inference path: the same values
    with torch.no_grad():
        torch.testing.assert_close(expert_mlp(x, experts, weights, mlp, act, strategy="grouped"), ref, **tol)
    frozen = ExpertMLPWeights(*(t.detach() if t is not None else None for t in mlp_fields(mlp)))
    inferred = expert_mlp(x.detach(), experts, weights.detach(), frozen, act, strategy="grouped")
    assert not inferred.requires_grad
    torch.testing.assert_close(inferred, ref.detach(), **tol)
    grads = torch.autograd.grad(out, inputs, grad_out, retain_graph=True)
    ref_grads = torch.autograd.grad(ref, inputs, grad_out, allow_unused=True)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, torch.zeros_like(got) if want is None else want, **tol)
    for param in mlp.parameters():  # experts 1 and 5 have no rows: exactly zero gradient
        assert (torch.autograd.grad(out, param, grad_out, retain_graph=True)[0][[1, 5]] == 0).all()
    assert (grads[1][experts < 0] == 0).all()


def test_fused_grouped_with_dropout_and_broadcast_gradient():
    """`post` (a dropout) runs inside the node: its mask is drawn once and the backward uses the same one; a
    broadcast output gradient (from out.sum()) is accepted."""
    mlp = mlp_weights(torch.float64, False, True)
    experts, weights = decision(40, 1, seed=3, drops=False)
    x = torch.randn(40, 1, D, dtype=torch.float64, requires_grad=True)
    masks = []

    def post(h):
        mask = (torch.rand_like(h) > 0.5).to(h.dtype) * 2
        masks.append(mask)
        return h * mask

    out = expert_mlp(x, experts, weights, mlp, torch.relu, strategy="grouped", post=post)
    out.sum().backward()
    mask = masks[0]
    # the reference: the same mask, applied in expert order (the node's hidden rows are sorted by expert)
    order = experts.view(-1).argsort(stable=True)
    full_mask = torch.empty_like(mask)
    full_mask[order] = mask
    x_ref = x.detach().clone().requires_grad_()
    ref_rows = []
    for r in range(40):
        e = int(experts[r, 0])
        h = torch.relu(x_ref[r] @ mlp.w1[e] + mlp.b1[e]) * full_mask[r]
        ref_rows.append(weights[r, 0] * (h @ mlp.w2[e] + mlp.b2[e]))
    ref = torch.stack(ref_rows)
    torch.testing.assert_close(out, ref)
    ref.sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)


def test_fused_grouped_bfloat16_matches_float32():
    mlp32 = mlp_weights(torch.float32, False, True)
    params32 = (mlp32.w1, mlp32.b1, mlp32.w2, mlp32.b2)
    mlp16 = ExpertMLPWeights(*(t.detach().bfloat16().requires_grad_() for t in params32))
    experts, weights = decision(64, 2, seed=5)
    x = torch.randn(64, 1, D, generator=torch.Generator().manual_seed(6))
    outs, grads = [], []
    for mlp, dtype in ((mlp32, torch.float32), (mlp16, torch.bfloat16)):
        xi = x.detach().to(dtype).clone().requires_grad_()
        out = expert_mlp(xi, experts, weights.to(dtype), mlp, torch.relu, strategy="grouped")
        out.float().sum().backward()
        outs.append(out.float())
        grads.append([xi.grad.float(), *(p.grad.float() for p in mlp.parameters())])
    for a, b in zip([outs[1], *grads[1]], [outs[0], *grads[0]]):  # bfloat16 keeps 8 bits: relative error ~1%
        assert (a - b).norm() <= 3e-2 * b.norm()


@pytest.mark.parametrize("length", [1, 4])
def test_pieces_cover_every_assignment_once(length):
    counts = [0, 900, 3, 0, 5, 130, 200, 0, 1, 2]
    plan = pieces(counts, length, chunk_tokens=128, device="cpu")
    assert plan[0].a0 == 0 and plan[-1].a1 == sum(counts)
    for p, q in zip(plan, plan[1:]):
        assert p.a1 == q.a0 and p.e1 <= q.e0 + (1 if q.split else 0)
    for p in plan:
        assert sum(p.counts) == (p.a1 - p.a0) * length == p.t1 - p.t0
        assert p.offsets.tolist() == torch.tensor(p.counts).cumsum(0).tolist()
        assert not p.split or p.e1 - p.e0 == 1
    by_expert = [0] * len(counts)
    for p in plan:
        for e, c in zip(range(p.e0, p.e1), p.counts):
            by_expert[e] += c
    assert by_expert == [c * length for c in counts]
    assert any(p.split for p in plan) and any(p.e1 - p.e0 > 1 for p in plan)
