"""The grouped strategy as one autograd node: gather, both grouped GEMMs and the combine, chunk by chunk.

Rows are taken in expert order a chunk of about `CHUNK_BYTES` at a time (`pieces`): each chunk is gathered from x
into a small buffer that stays in cache, multiplied at once, and its output is written straight to its rows of the
result (`index_copy_` when each row has one expert, else `index_add_`). The backward does the same with the output's
gradient and the input's. So no full-size tensor in expert order is ever made (the unfused path makes four: the
gathered input, the sorted output, and their gradients), and nothing of size (rows, D) is saved beyond x itself:
the backward gathers x's rows again. Only the (assignments, H) hidden activations are kept; the activation (and
`post`, a dropout) runs on them as a small autograd graph, differentiated in the backward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .grouping import Grouping
from .kernels import _grouped_mm_fits

# a chunk's gathered rows: about 1 MiB, which stays in a core's L2 cache between the gather and the GEMM
CHUNK_BYTES = 1 << 20


@dataclass
class Piece:
    """Assignments a0:a1 (tokens t0:t1) in expert order, of experts e0:e1 (`counts` tokens each); `split`: one
    expert's group cut into several pieces (its weight gradients are accumulated)."""

    a0: int
    a1: int
    t0: int
    t1: int
    e0: int
    e1: int
    counts: list[int]
    offsets: torch.Tensor
    split: bool


def pieces(counts: list[int], length: int, chunk_tokens: int, device) -> list[Piece]:
    """One piece per group of at least a quarter chunk, smaller consecutive groups packed up to `chunk_tokens`
    tokens, and a group over twice that cut into pieces (so most pieces are one expert: one plain GEMM each)."""
    out: list[Piece] = []

    def add(a0, a1, e0, e1, token_counts, split):
        offsets = torch.tensor(token_counts, dtype=torch.int64).cumsum(0).to(device=device, dtype=torch.int32)
        out.append(Piece(a0, a1, a0 * length, a1 * length, e0, e1, token_counts, offsets, split))

    start, e0, packed = 0, 0, 0  # the open piece: assignments from `start`, experts from e0, `packed` tokens
    pos = 0
    for e, c in enumerate(counts):
        if c * length > 2 * chunk_tokens:
            if e > e0:
                add(start, pos, e0, e, [n * length for n in counts[e0:e]], False)
            n_sub = -(-c * length // chunk_tokens)
            bounds = [pos + c * i // n_sub for i in range(n_sub + 1)]
            for lo, hi in zip(bounds, bounds[1:]):
                add(lo, hi, e, e + 1, [(hi - lo) * length], True)
            pos += c
            start, e0, packed = pos, e + 1, 0
            continue
        if c * length >= chunk_tokens // 4 and packed:  # a large enough group gets its own piece
            add(start, pos, e0, e, [n * length for n in counts[e0:e]], False)
            start, e0, packed = pos, e, 0
        pos += c
        packed += c * length
        if packed >= chunk_tokens // 4 and (packed >= chunk_tokens or c * length >= chunk_tokens // 4):
            add(start, pos, e0, e + 1, [n * length for n in counts[e0 : e + 1]], False)
            start, e0, packed = pos, e + 1, 0
    if e0 < len(counts) and pos > start:
        add(start, pos, e0, len(counts), [n * length for n in counts[e0:]], False)
    return out


def _one_launch(a: torch.Tensor, b: torch.Tensor) -> bool:
    """grouped_mm for the weight gradients of a piece of several experts off the CPU (one kernel launch instead of
    one per expert). On CPU it loops over the groups itself, and its fresh (experts, K, H) output would cost a copy
    into the gradient: a loop of mm(out=) is faster there."""
    return a.device.type != "cpu" and _grouped_mm_fits(a, b)


def _mm(a: torch.Tensor, b: torch.Tensor, p: Piece, out: torch.Tensor, scratch: bool = False) -> torch.Tensor:
    """a (tokens, K) @ b[e] (K, H) for each expert's rows of the piece (b: the piece's experts), into `out`; with
    `scratch` (out is only a buffer), grouped_mm's own output is returned as it is, not copied."""
    if p.e1 - p.e0 == 1:
        return torch.mm(a, b[0], out=out)
    if _grouped_mm_fits(a, b):
        result = F.grouped_mm(a, b, offs=p.offsets)
        return result if scratch else out.copy_(result)
    for i, (part, part_out) in enumerate(zip(a.split(p.counts), out.split(p.counts))):
        if p.counts[i]:
            torch.mm(part, b[i], out=part_out)
    return out


class _Buffer:
    """One reused buffer for a piece's gathered rows or GEMM output (a fresh one per piece would be new pages)."""

    def __init__(self, like: torch.Tensor, plan: list[Piece], width: int):
        self.data = like.new_empty(max((p.t1 - p.t0 for p in plan), default=0) * width)
        self.width = width

    def rows(self, p: Piece, per_row: int = 1) -> torch.Tensor:
        """(tokens, width), or (assignments, per_row * width) viewed by assignment (per_row tokens each)."""
        n = p.t1 - p.t0
        return self.data[: n * self.width].view(n // per_row, per_row * self.width)


def _gather(src: torch.Tensor, index: torch.Tensor, buf: _Buffer, p: Piece, length: int) -> torch.Tensor:
    """src's rows `index` (one per assignment, `length` tokens each) into the buffer, as (tokens, width)."""
    out = buf.rows(p, length)
    torch.index_select(src, 0, index, out=out)
    return out.view(-1, buf.width)


def _weight_grad(out: torch.Tensor, a: torch.Tensor, g: torch.Tensor, p: Piece, first: bool) -> None:
    """out[e] (= or +=) a[rows of e]^T @ g[rows of e] for the piece's experts (out: their gradient slice)."""
    if p.e1 - p.e0 == 1:
        if first:
            torch.mm(a.t(), g, out=out[0])
        else:
            out[0].addmm_(a.t(), g)
        return
    if _one_launch(a, g):  # (a's strides, before the transpose, are what grouped_mm reads)
        out.copy_(F.grouped_mm(a.t(), g, offs=p.offsets))
        return
    for i, (ai, gi) in enumerate(zip(a.split(p.counts), g.split(p.counts))):
        torch.mm(ai.t(), gi, out=out[i])  # an empty group gives zeros


def _token_experts(counts: list[int], device) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(len(counts), device=device), torch.tensor(counts, device=device))


class _GroupedExpertMLP(torch.autograd.Function):
    """sum over a row's assignments of w * f_e(x_row), f_e the two-matmul expert (see `strategies`), in one node.

    Inputs: seq (R, T, D); token_weights (A*T,) the combine weight of each assigned token in expert order; `spec`:
    (grouping, hidden, chunk pieces); then w1, b1, w2, b2, w_gate, b_gate (None where
    absent)."""

    @staticmethod
    def forward(ctx, seq, token_weights, spec, w1, b1, w2, b2, w_gate, b_gate):
        g, hidden, plan = spec
        rows, length, d = seq.shape
        n, _, h = w1.shape
        o = w2.shape[2]
        x2 = seq.reshape(rows, length * d)
        tokens = token_weights.shape[0]
        token_counts = [c * length for c in g.counts]
        e_tok = _token_experts(token_counts, seq.device) if b1 is not None or b_gate is not None else None
        pre = seq.new_empty(tokens, h)
        gate = seq.new_empty(tokens, h) if w_gate is not None else None
        buf_x = _Buffer(seq, plan, d)
        for p in plan:
            xs = _gather(x2, g.rows[p.a0 : p.a1], buf_x, p, length)
            _mm(xs, w1[p.e0 : p.e1], p, pre[p.t0 : p.t1])
            if gate is not None:
                _mm(xs, w_gate[p.e0 : p.e1], p, gate[p.t0 : p.t1])
        del buf_x
        if b1 is not None:
            pre += b1.index_select(0, e_tok)
        if gate is not None and b_gate is not None:
            gate += b_gate.index_select(0, e_tok)
        with torch.enable_grad():
            pre.requires_grad_()
            if gate is not None:
                gate.requires_grad_()
            act = hidden(pre, gate)
        act_values = act.detach()
        a = act_values * token_weights.unsqueeze(1)
        permutation = g.inverse is not None
        out = seq.new_empty(rows, length * o) if permutation else seq.new_zeros(rows, length * o)
        buf_y = _Buffer(seq, plan, o)
        for p in plan:
            y = _mm(a[p.t0 : p.t1], w2[p.e0 : p.e1], p, buf_y.rows(p), scratch=True)
            if b2 is not None:
                wc = token_weights[p.t0 : p.t1]
                if p.e1 - p.e0 == 1:
                    y.addr_(wc, b2[p.e0])
                else:
                    y.addcmul_(b2.index_select(0, e_tok[p.t0 : p.t1]), wc.unsqueeze(1))
            index = g.rows[p.a0 : p.a1]
            if permutation:
                out.index_copy_(0, index, y.view(-1, length * o))
            else:
                out.index_add_(0, index, y.view(-1, length * o))
        ctx.spec = (g, plan, act, pre, gate, e_tok, token_counts)
        ctx.save_for_backward(seq, token_weights, act_values, a, w1, b1, w2, b2, w_gate, b_gate)
        return out.view(rows, length, o)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        seq, token_weights, act_values, a, w1, b1, w2, b2, w_gate, b_gate = ctx.saved_tensors
        g, plan, act, pre, gate, e_tok, token_counts = ctx.spec
        rows, length, d = seq.shape
        n, _, h = w1.shape
        o = w2.shape[2]
        needs = ctx.needs_input_grad
        go2 = grad_out.reshape(rows, length * o)
        grad_a = torch.empty_like(a)
        grad_w2 = torch.empty_like(w2) if needs[5] else None
        grad_b2 = torch.zeros_like(b2) if b2 is not None and needs[6] else None
        grad_tw_bias = torch.empty_like(token_weights) if b2 is not None and needs[1] else None
        started: set[int] = set()  # experts whose split group already wrote its weight gradient
        buf_g = _Buffer(seq, plan, o)
        for p in plan:
            gs = _gather(go2, g.rows[p.a0 : p.a1], buf_g, p, length)
            _mm(gs, w2[p.e0 : p.e1].transpose(1, 2), p, grad_a[p.t0 : p.t1])
            if grad_w2 is not None:
                _weight_grad(grad_w2[p.e0 : p.e1], a[p.t0 : p.t1], gs, p, p.e0 not in started)
            wc = token_weights[p.t0 : p.t1]
            if b2 is not None and p.e1 - p.e0 == 1:
                if grad_b2 is not None:
                    grad_b2[p.e0].addmv_(gs.t(), wc)
                if grad_tw_bias is not None:
                    torch.mv(gs, b2[p.e0], out=grad_tw_bias[p.t0 : p.t1])
            elif b2 is not None:
                e_c = e_tok[p.t0 : p.t1]
                if grad_b2 is not None:
                    grad_b2.index_add_(0, e_c, gs * wc.unsqueeze(1))
                if grad_tw_bias is not None:
                    grad_tw_bias[p.t0 : p.t1] = (gs * b2.index_select(0, e_c)).sum(1)
            if p.split:
                started.add(p.e0)
        grad_tw = None
        if needs[1]:
            grad_tw = (grad_a * act_values).sum(1)
            if grad_tw_bias is not None:
                grad_tw += grad_tw_bias
        grad_act = grad_a.mul_(token_weights.unsqueeze(1))
        inputs = (pre,) if gate is None else (pre, gate)
        # retained: a backward with retain_graph=True may run this node again
        grads_pre = torch.autograd.grad(act, inputs, grad_act, retain_graph=True)
        grad_pre, grad_gate = grads_pre[0], (grads_pre[1] if gate is not None else None)
        grad_b1 = torch.zeros_like(b1).index_add_(0, e_tok, grad_pre) if b1 is not None and needs[4] else None
        grad_bg = None
        if gate is not None and b_gate is not None and needs[8]:
            grad_bg = torch.zeros_like(b_gate).index_add_(0, e_tok, grad_gate)
        grad_w1 = torch.empty_like(w1) if needs[3] else None
        grad_wg = torch.empty_like(w_gate) if gate is not None and needs[7] else None
        grad_seq = None
        permutation = g.inverse is not None
        if needs[0]:
            grad_x = seq.new_empty(rows, length * d) if permutation else seq.new_zeros(rows, length * d)
        x2 = seq.reshape(rows, length * d)
        started.clear()
        del buf_g
        buf_x, buf_gx = _Buffer(seq, plan, d), _Buffer(seq, plan, d)
        for p in plan:
            index = g.rows[p.a0 : p.a1]
            if grad_w1 is not None or grad_wg is not None:
                xs = _gather(x2, index, buf_x, p, length)
                first = p.e0 not in started
                if grad_w1 is not None:
                    _weight_grad(grad_w1[p.e0 : p.e1], xs, grad_pre[p.t0 : p.t1], p, first)
                if grad_wg is not None:
                    _weight_grad(grad_wg[p.e0 : p.e1], xs, grad_gate[p.t0 : p.t1], p, first)
            if needs[0]:
                gx = _mm(grad_pre[p.t0 : p.t1], w1[p.e0 : p.e1].transpose(1, 2), p, buf_gx.rows(p), scratch=True)
                if grad_gate is not None:
                    if p.e1 - p.e0 == 1:
                        gx.addmm_(grad_gate[p.t0 : p.t1], w_gate[p.e0].t())
                    else:
                        gx += _mm(
                            grad_gate[p.t0 : p.t1],
                            w_gate[p.e0 : p.e1].transpose(1, 2),
                            p,
                            torch.empty_like(gx),
                            scratch=True,
                        )
                if permutation:
                    grad_x.index_copy_(0, index, gx.view(-1, length * d))
                else:
                    grad_x.index_add_(0, index, gx.view(-1, length * d))
            if p.split:
                started.add(p.e0)
        if needs[0]:
            grad_seq = grad_x.view(rows, length, d)
        for grad in (grad_w1, grad_wg, grad_w2):  # experts with no rows (outside every piece)
            if grad is not None:
                _zero_unrouted(grad, plan, n)
        return grad_seq, grad_tw, None, grad_w1, grad_b1, grad_w2, grad_b2, grad_wg, grad_bg


def _zero_unrouted(grad: torch.Tensor, plan: list[Piece], n: int) -> None:
    covered = torch.zeros(n, dtype=torch.bool)
    for p in plan:
        covered[p.e0 : p.e1] = True
    for e in (~covered).nonzero().flatten().tolist():
        grad[e].zero_()


def _add_expert_bias(y: torch.Tensor, bias: torch.Tensor, p: Piece, e_tok: torch.Tensor | None) -> None:
    """y += the bias of each row's expert, for a piece's rows."""
    if p.e1 - p.e0 == 1:
        y += bias[p.e0]
    else:
        y += bias.index_select(0, e_tok[p.t0 : p.t1])


@torch.no_grad()
def _grouped_expert_mlp_inference(seq, token_weights, g: Grouping, hidden, plan: list[Piece], mlp) -> torch.Tensor:
    """The same sum with nothing to differentiate: each piece runs end to end (gather, first GEMM, bias,
    activation, combine weight, second GEMM, bias, write to its rows) through reused piece-sized buffers, so the
    (assignments, H) activations the training path keeps for its backward are never made whole."""
    rows, length, d = seq.shape
    o = mlp.w2.shape[2]
    x2 = seq.reshape(rows, length * d)
    token_counts = [c * length for c in g.counts]
    multi = any(p.e1 - p.e0 > 1 for p in plan)
    biased = mlp.b1 is not None or mlp.b2 is not None or mlp.b_gate is not None
    e_tok = _token_experts(token_counts, seq.device) if multi and biased else None
    h = mlp.w1.shape[2]
    buf_x, buf_pre, buf_y = _Buffer(seq, plan, d), _Buffer(seq, plan, h), _Buffer(seq, plan, o)
    buf_gate = _Buffer(seq, plan, h) if mlp.w_gate is not None else None
    permutation = g.inverse is not None
    out = seq.new_empty(rows, length * o) if permutation else seq.new_zeros(rows, length * o)
    for p in plan:
        index = g.rows[p.a0 : p.a1]
        xs = _gather(x2, index, buf_x, p, length)
        pre = _mm(xs, mlp.w1[p.e0 : p.e1], p, buf_pre.rows(p), scratch=True)
        if mlp.b1 is not None:
            _add_expert_bias(pre, mlp.b1, p, e_tok)
        gate = None
        if buf_gate is not None:
            gate = _mm(xs, mlp.w_gate[p.e0 : p.e1], p, buf_gate.rows(p), scratch=True)
            if mlp.b_gate is not None:
                _add_expert_bias(gate, mlp.b_gate, p, e_tok)
        wc = token_weights[p.t0 : p.t1].unsqueeze(1)
        act = hidden(pre, gate).mul_(wc)  # fresh, or pre's own scratch buffer: free to overwrite
        y = _mm(act, mlp.w2[p.e0 : p.e1], p, buf_y.rows(p), scratch=True)
        if mlp.b2 is not None:
            if p.e1 - p.e0 == 1:
                y.addr_(wc.squeeze(1), mlp.b2[p.e0])
            else:
                y.addcmul_(mlp.b2.index_select(0, e_tok[p.t0 : p.t1]), wc)
        if permutation:
            out.index_copy_(0, index, y.view(-1, length * o))
        else:
            out.index_add_(0, index, y.view(-1, length * o))
    return out.view(rows, length, o)


def _needs_grad(seq, token_weights, mlp) -> bool:
    if not torch.is_grad_enabled():
        return False
    tensors = (seq, token_weights, mlp.w1, mlp.b1, mlp.w2, mlp.b2, mlp.w_gate, mlp.b_gate)
    return any(t is not None and t.requires_grad for t in tensors)


def grouped_expert_mlp(seq, token_weights, g: Grouping, hidden, mlp, length: int) -> torch.Tensor:
    """The fused grouped strategy (see the module docstring): (R, T, D) -> (R, T, O)."""
    d = seq.shape[2]
    chunk_tokens = max(1, CHUNK_BYTES // (d * seq.element_size()))
    plan = pieces(g.counts, length, chunk_tokens, seq.device)
    if not _needs_grad(seq, token_weights, mlp):
        return _grouped_expert_mlp_inference(seq, token_weights, g, hidden, plan, mlp)
    spec = (g, hidden, plan)
    return _GroupedExpertMLP.apply(seq, token_weights, spec, mlp.w1, mlp.b1, mlp.w2, mlp.b2, mlp.w_gate, mlp.b_gate)
