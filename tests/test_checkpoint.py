"""Checkpoints keep the masks: a reloaded pruned model trains on with its pruned weights at 0."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import saliency


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def _step(model, opt):
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


def test_plain_state_dict_loses_masks_the_checkpoint_keeps_them(tmp_path):
    model = _model()
    masks = saliency.prune(model, "magnitude", 0.7)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _step(model, opt)
    path = saliency.save_checkpoint(tmp_path / "ck.pt", model, opt, epoch=3)

    # the problem: a plain state_dict carries no masks, so training regrows pruned weights
    plain = _model()
    plain.load_state_dict(model.state_dict())
    _step(plain, torch.optim.SGD(plain.parameters(), lr=0.1))
    assert any(plain.state_dict()[n][~m].abs().sum() > 0 for n, m in masks.items())

    # the round trip: weights, masks, optimizer state (momentum included)
    fresh = _model()
    opt2 = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    assert saliency.load_checkpoint(path, fresh, opt2) == {"epoch": 3}
    assert saliency.attached_masks(fresh) == masks
    assert opt2.state_dict()["state"].keys() == opt.state_dict()["state"].keys()
    for _ in range(3):
        _step(fresh, opt2)
    params = dict(fresh.named_parameters())
    assert all(not params[n].detach()[~m].any() for n, m in masks.items())

    # the file's "model" entry is a plain state_dict: it loads into an unpruned model
    state = torch.load(path, weights_only=True)
    _model().load_state_dict(state["model"])
    assert set(state["masks"]) == set(masks)


def test_unpruned_model_and_plain_files(tmp_path):
    model = _model()
    path = saliency.save_checkpoint(tmp_path / "dense.pt", model)
    fresh = _model()
    saliency.load_checkpoint(path, fresh)
    assert saliency.attached_masks(fresh) is None
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="not a saliency checkpoint"):
        saliency.load_checkpoint(tmp_path / "plain.pt", fresh)
    assert not list(tmp_path.glob("*.tmp"))
