import pytest
import torch
from hypothesis import settings

from autojac.cache import default_store
from autojac.planner import Planner, set_default_planner

# The property tests draw the same examples on every run, so that a CI run cannot fail on an
# example no run before it drew (to explore further: pytest --hypothesis-profile=default).
settings.register_profile("autojac", derandomize=True)
settings.load_profile("autojac")


@pytest.fixture(autouse=True)
def fresh_planner(monkeypatch, tmp_path_factory):
    """Every test starts with no plans, its own empty cache directory (never the user's cache)
    and a short tuning budget."""
    monkeypatch.setenv("AUTOJAC_CACHE_DIR", str(tmp_path_factory.mktemp("autojac-cache")))
    monkeypatch.setenv("AUTOJAC_TUNE_BUDGET", "0.2")
    for name in ("AUTOJAC_TUNE", "AUTOJAC_REQUIRE_PLAN", "AUTOJAC_PLANS"):
        monkeypatch.delenv(name, raising=False)
    old = set_default_planner(Planner(default_store()))
    torch.manual_seed(0)
    yield
    set_default_planner(old)
