"""Mistakes a type checker must report: each line marked `# error: CODE` must get that mypy error,
and no other line any (tests/test_typing.py)."""

from __future__ import annotations

import torch
from torch import nn

import autojac
from autojac import Op

model = nn.Linear(3, 2)
x = torch.randn(4, 3)

autojac.explain(model, x, op="jacobain")  # error: arg-type
autojac.warm(model, x, ops=("hessain",))  # error: arg-type
autojac.plans(op="laplace")  # error: arg-type
wrong: Op = "hessian-diag"  # error: assignment
D: int = autojac.derivatives(model, x)  # error: assignment
autojac.jacobian(model, x, create_graph="yes")  # error: arg-type
autojac.hvp(model, x)  # error: call-arg
autojac.divergence(nn.Linear(3, 3), x, estimator="hutchinsn")  # error: arg-type
autojac.derivatives(model, x, ops=("value", "laplace"))  # error: arg-type
