"""COMET (Ibrahim et al., KDD 2023): k soft binary trees whose splits are smooth-steps, one leaf per expert.

Each tree has N - 1 splits and N leaves in heap layout (node v has children 2v+1 and 2v+2; nodes >= N - 1 are
leaves), so any N works with no unused leaf; expert i is the i-th leaf of a left-first depth-first walk. Split v of
tree t sends h = S(w.x + b) of its mass left and 1 - h right, so each tree's leaf reach probabilities P_t sum to
one. Each leaf also has a linear score a_t,i; the gate is one softmax over all k*N entries of a + log P (log 0 =
-inf), summed over the trees:

    g_i = sum_t P_t,i exp(a_t,i) / sum_t' sum_j P_t',j exp(a_t',j)

Once every split saturates each tree reaches one leaf, so at most k experts have non-zero weight; trees that land
on the same leaf add up. The regulariser is the mean over rows of sum_t H(P_t), which drives the splits to 0/1.
Only experts with non-zero weight are computed, which is exact for the reason given in `dselect_k`.
"""

from __future__ import annotations

import torch

from .losses import row_mean
from .smooth_step import SmoothGateNetwork, SmoothStepGate, entropy_sum, smooth_step


def leaf_paths(num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each expert (leaf in left-first depth-first order): the splits on its path from the root (N, D) (0 where
    padded) and the direction taken at each (N, D): 1 left, -1 right, 0 padding. D = the deepest leaf's depth."""
    leaves = []

    def walk(v: int) -> None:
        if v >= num_experts - 1:
            leaves.append(v)
        else:
            walk(2 * v + 1)
            walk(2 * v + 2)

    walk(0)
    paths = []
    for leaf in leaves:
        path, v = [], leaf
        while v > 0:
            parent = (v - 1) // 2
            path.append((parent, 1 if v == 2 * parent + 1 else -1))
            v = parent
        paths.append(path[::-1])
    depth = max(len(p) for p in paths)
    nodes = torch.zeros(num_experts, depth, dtype=torch.long)
    dirs = torch.zeros(num_experts, depth, dtype=torch.long)
    for i, path in enumerate(paths):
        for j, (node, direction) in enumerate(path):
            nodes[i, j], dirs[i, j] = node, direction
    return nodes, dirs


def leaf_probs(h: torch.Tensor, nodes: torch.Tensor, dirs: torch.Tensor) -> torch.Tensor:
    """P (..., N): each leaf's reach probability from the split values h (..., N - 1) of one tree."""
    if h.shape[-1] == 0:  # one expert: the root is the leaf
        return h.new_ones(*h.shape[:-1], nodes.shape[0])
    f = h[..., nodes]  # (..., N, D)
    f = torch.where(dirs > 0, f, torch.where(dirs < 0, 1 - f, torch.ones_like(f)))
    return f.prod(dim=-1)


def tree_gates(probs: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """g (R, N) from the leaf reach probabilities P (R, k, N) and leaf scores a (R, k, N): the softmax over all k*N
    entries of a + log P, summed over the trees. Leaves with P = 0 get exactly 0 (and no NaN gradient)."""
    reached = probs > 0
    logp = torch.log(torch.where(reached, probs, torch.ones_like(probs)))
    s = torch.where(reached, scores + logp, torch.full_like(scores, float("-inf")))
    rows, k, n = s.shape
    return s.reshape(rows, k * n).softmax(dim=-1).reshape(rows, k, n).sum(dim=1)


class CometRouter(SmoothStepGate):
    name = "comet"

    def __init__(self, in_features, num_experts, config, block_name=""):
        super().__init__(in_features, num_experts, config, block_name)
        self.gamma = config.comet_gamma
        nodes, dirs = leaf_paths(num_experts)
        # derived from N, so not saved
        self.register_buffer("path_nodes", nodes, persistent=False)
        self.register_buffer("path_dirs", dirs, persistent=False)

    def build_network(self, in_features, num_experts, config):
        # k*(N-1) split pre-activations, then k*N leaf scores
        k = self.top_k
        return SmoothGateNetwork(
            in_features,
            k * (2 * num_experts - 1),
            k * (num_experts - 1),
            config.comet_gamma,
            config.router_batchnorm,
            config.router_init_std,
        )

    def trees(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Leaf reach probabilities P (R, k, N) and leaf scores a (R, k, N) from the packed logits."""
        k, n = self.top_k, self.num_experts
        splits = k * (n - 1)
        h = smooth_step(logits[:, :splits].reshape(logits.shape[0], k, n - 1), self.gamma)
        return leaf_probs(h, self.path_nodes, self.path_dirs), logits[:, splits:].reshape(logits.shape[0], k, n)

    def routing_probs(self, logits: torch.Tensor) -> torch.Tensor:
        return tree_gates(*self.trees(logits))

    def loss_coefficients(self) -> dict[str, float]:
        coefs = super().loss_coefficients()
        if self.num_experts > 1:  # one expert: the entropy is a constant
            coefs["comet_entropy"] = self.config.comet_entropy_coef
        return {k: v for k, v in coefs.items() if v > 0}

    def loss_terms(self, logits, experts, baseline=None, targets=None, reward=None, valid=None):
        terms = super().loss_terms(logits, experts, baseline, targets, reward, valid)
        coefs = self.loss_coefficients()
        if "comet_entropy" in coefs:
            probs, _ = self.trees(logits)
            terms["comet_entropy"] = coefs["comet_entropy"] * row_mean(entropy_sum(probs).sum(dim=-1), valid)
        return terms
