import pytest
import torch

from autojac.planner import Planner, set_default_planner


@pytest.fixture(autouse=True)
def fresh_planner(monkeypatch):
    """Every test starts with no plans and a short tuning budget."""
    monkeypatch.setenv("AUTOJAC_TUNE_BUDGET", "0.2")
    monkeypatch.delenv("AUTOJAC_TUNE", raising=False)
    old = set_default_planner(Planner())
    torch.manual_seed(0)
    yield
    set_default_planner(old)
