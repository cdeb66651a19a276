"""The 'writing your own criterion' example of docs/criteria.md, run as written."""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import saliency
from saliency.criteria import _REGISTRY

DOC = Path(__file__).parent.parent / "docs" / "criteria.md"
sys.path.insert(0, str(Path(__file__).parent))


def example_source() -> str:
    """The first Python code block of the guide: the Wanda criterion."""
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert blocks and "register_criterion" in blocks[0]
    return blocks[0]


@pytest.fixture
def wanda_module(tmp_path, monkeypatch):
    """The example written to a module of its own (as a user would), imported, then unregistered."""
    name = "docs_wanda_example"
    (tmp_path / f"{name}.py").write_text(example_source())
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        yield importlib.import_module(name)
    finally:
        _REGISTRY.pop("wanda_score", None)
        sys.modules.pop(name, None)


def test_example_is_short():
    code = [line for line in example_source().splitlines() if line.strip()]
    assert len(code) <= 35, "the guide promises a short example"


def test_wanda_by_name_in_prune(wanda_module):
    assert "wanda_score" in saliency.available_criteria()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    model.train()
    g = torch.Generator().manual_seed(0)
    data = [
        (torch.randn(10, 6, generator=g), torch.randint(0, 3, (10,), generator=g)) for _ in range(3)
    ]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    # reference: |W_ij| * ||X_j||_2 with X the layer's inputs over the 30 samples
    x = torch.cat([b[0] for b in data])
    with torch.no_grad():
        model.eval()
        h = model[2](model[1](model[0](x)))
        model.train()
    expect = {
        "0.weight": model[0].weight.detach().abs() * x.norm(dim=0),
        "3.weight": model[3].weight.detach().abs() * h.norm(dim=0),
    }
    s = saliency.score(model, "wanda_score", data=data, n_samples=30)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert model.training and all(not m._forward_hooks for m in model.modules())
    for n in expect:
        torch.testing.assert_close(s[n], expect[n], rtol=1e-5, atol=1e-6)
    masks = saliency.prune(model, "wanda_score", 0.5, data=data, scope="layer", n_samples=30)
    for n, m in masks.items():
        assert int((~m).sum()) == m.numel() // 2
        kept_min = expect[n][m].min()
        assert bool((expect[n][~m] <= kept_min).all()), n
    saliency.remove(model)


def test_wanda_by_name_in_a_sweep_config(wanda_module, tmp_path):
    sweep_runner = pytest.importorskip("saliency.sweep.runner")
    import sweep_helpers  # noqa: F401  (registers the tiny dataset and model)

    from saliency.sweep.config import parse_config, tomllib
    from saliency.sweep.records import read_records

    text = f"""
    imports = ["sweep_helpers", "{wanda_module.__name__}"]
    name = "wanda_tiny"
    model = "tiny_mlp"
    dataset = "tiny_blobs"
    seeds = [0]
    sparsities = [0.5]
    modes = ["oneshot"]
    criteria = ["magnitude", "wanda_score"]

    [criterion_defaults.wanda_score]
    n_samples = 32

    [train]
    epochs = 1
    batch_size = 32

    [scoring]
    n_samples = 64
    batch_size = 32
    """
    cfg = parse_config(tomllib.loads(text.replace("\n    ", "\n")))
    assert [c.name for c in cfg.criteria] == ["magnitude", "wanda_score"]
    assert dict(cfg.criteria[1].hparams)["n_samples"] == 32
    sweep_runner.run_sweep(cfg, tmp_path)
    records = read_records(tmp_path / "wanda_tiny")
    wanda = [r for r in records if r.get("criterion") == "wanda_score"]
    assert wanda and all(r["sparsity"] == pytest.approx(0.5, abs=0.01) for r in wanda)


def test_the_example_passes_the_contract_check(wanda_module):
    saliency.check_criterion(wanda_module.Wanda(), models=("mlp",))
    saliency.check_criterion("wanda", models=("mlp",), n_samples=64)
