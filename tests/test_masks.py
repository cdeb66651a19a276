import pickle

import pytest
import torch

from saliency import Masks, prunable_parameters


def test_sparsity_report_and_table(mlp):
    params = prunable_parameters(mlp)
    masks = Masks.ones_like(params)
    assert masks.sparsity == 0.0
    m = dict(masks)
    m["1.weight"] = m["1.weight"].clone()
    m["1.weight"][:128] = False
    masks = Masks(m)
    rows = masks.layer_report()
    assert rows[0] == {
        "name": "1.weight",
        "shape": (256, 784),
        "numel": 200704,
        "zeros": 128 * 784,
        "sparsity": 0.5,
        "emptied": False,
    }
    assert rows[-1]["name"] == "total" and rows[-1]["zeros"] == 128 * 784
    assert masks.sparsity == pytest.approx(128 * 784 / sum(p.numel() for p in params.values()))
    assert "1.weight" in masks.table() and "50.00%" in masks.table()


def test_save_load_round_trip(tmp_path, mlp):
    masks = Masks({n: torch.rand(p.shape) > 0.5 for n, p in prunable_parameters(mlp).items()})
    masks.save(tmp_path / "m.pt")
    assert Masks.load(tmp_path / "m.pt", model=mlp) == masks
    assert Masks.from_state_dict(masks.state_dict()) == masks
    assert pickle.loads(pickle.dumps(masks)) == masks


def test_validation_errors(mlp, tiny_mlp):
    with pytest.raises(ValueError, match="0/1"):
        Masks({"a": torch.tensor([0.5])})
    with pytest.raises(TypeError, match="torch.Tensor"):
        Masks({"a": [1, 0]})
    masks = Masks.ones_like(prunable_parameters(mlp))
    with pytest.raises(ValueError, match="does not have"):
        masks.apply(tiny_mlp)
    bad = Masks({"0.weight": torch.ones(3, 3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="shape"):
        bad.apply(tiny_mlp)


def test_float_masks_are_converted():
    m = Masks({"w": torch.tensor([1.0, 0.0, 1.0])})
    assert m["w"].dtype == torch.bool and m.zeros == 1
