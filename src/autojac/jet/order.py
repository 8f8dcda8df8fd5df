"""Which Taylor coefficients the interpreter carries, and the products of first-order terms
that second-order rules need.

Every traced value carries a stack of first-order coefficients T (K, *b), one per direction
(the input basis vectors of a chunk, and for Hessian-vector products v last), and, for second
order, a stack S of second derivatives along pairs of directions (a_p, b_p):

    kind      S                                  pairs
    "first"   none                               -
    "sum"     (1, *b): sum_k d2y / de_k de_k     the diagonal, summed (Laplacian)
    "diag"    (K, *b): d2y / de_k de_k           the diagonal (Hessian diagonal)
    "along"   (K, *b): d2y / de_k dv             (e_k, v) for the K basis vectors (HVP)
    "pairs"   (P, *b): d2y / de_a de_b           given index pairs (Hessian: a <= b)

All rules are linear in S and in the products T_a T_b, so a sum over pairs ("collapsed" Taylor
mode) propagates as cheaply as one pair.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor

Bilinear = Callable[[Tensor, Tensor], Tensor]


class Order:
    """The coefficients to carry; see the module docstring."""

    def __init__(self, kind: str, directions: int, pairs: tuple[Tensor, Tensor] | None = None):
        if kind not in ("first", "sum", "diag", "along", "pairs"):
            raise ValueError(f"unknown kind of coefficients {kind!r}; known: first, sum, diag, along, pairs")
        self.kind = kind
        self.directions = directions  # K, the length of T (the basis vectors; v comes on top for "along")
        self.second = kind != "first"
        self.pairs = pairs

    def quad(self, t: Tensor) -> Tensor:
        """T_a * T_b over the pairs, shaped like S: the term a unary rule scales by y''."""
        kind = self.kind
        if kind == "sum":
            if t.shape[0] <= 16 and t.numel() >= 1 << 20 and not torch.is_grad_enabled():
                # a large (K, *b) temporary would cost more than K fused multiply-adds
                total = torch.zeros_like(t[:1])
                for k in range(t.shape[0]):
                    total.addcmul_(t[k:k + 1], t[k:k + 1])
                return total
            return (t * t).sum(0, keepdim=True)
        if kind == "diag":
            return t * t
        if kind == "along":
            k = self.directions
            return t[:k] * t[k:]
        assert self.pairs is not None
        a, b = self.pairs
        return t.index_select(0, a) * t.index_select(0, b)

    def cross(self, bilinear: Bilinear, ta: Tensor, tb: Tensor) -> Tensor:
        """bil(Ta_a, Tb_b) + bil(Ta_b, Tb_a) over the pairs, shaped like S: the second-order term
        of y = bil(a, b) for a bilinear bil (a product, a matrix product)."""
        kind = self.kind
        if kind == "sum":
            return bilinear(ta, tb).sum(0, keepdim=True) * 2
        if kind == "diag":
            return bilinear(ta, tb) * 2
        if kind == "along":
            k = self.directions
            return bilinear(ta[:k], tb[k:]) + bilinear(ta[k:], tb[:k])
        assert self.pairs is not None
        a, b = self.pairs
        ta_a, ta_b = ta.index_select(0, a), ta.index_select(0, b)
        tb_a, tb_b = tb.index_select(0, a), tb.index_select(0, b)
        return bilinear(ta_a, tb_b) + bilinear(ta_b, tb_a)


@functools.lru_cache(maxsize=64)
def pair_table(n: int, device: torch.device) -> Tensor:
    """(n * n,) index of the pair (min(i, j), max(i, j)) among upper_pairs(n), for entry (i, j)."""
    a, b = torch.triu_indices(n, n, device=device)
    table = torch.empty(n, n, dtype=torch.long, device=device)
    places = torch.arange(a.numel(), device=device)
    table[a, b] = places
    table[b, a] = places
    return table.reshape(-1)
