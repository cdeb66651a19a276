import pytest
import torch
from torch import nn

from saliency import prunable_parameters


def test_default_targets_are_linear_and_conv_weights(tiny_cnn):
    assert list(prunable_parameters(tiny_cnn)) == ["conv.weight", "fc.weight"]


def test_all_conv_types_are_targets():
    m = nn.Sequential(
        nn.Conv1d(1, 2, 3), nn.Conv3d(2, 2, 1), nn.ConvTranspose2d(2, 2, 2), nn.BatchNorm1d(2)
    )
    assert list(prunable_parameters(m)) == ["0.weight", "1.weight", "2.weight"]


def test_include_exclude_and_output_layer(mlp):
    assert list(prunable_parameters(mlp, keep_output_dense=True)) == ["1.weight", "3.weight"]
    assert list(prunable_parameters(mlp, exclude="1.*")) == ["3.weight", "5.weight"]
    assert list(prunable_parameters(mlp, include=["*.bias"])) == ["1.bias", "3.bias", "5.bias"]


def test_module_types_in_and_out():
    m = nn.Sequential(nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(2, 2), nn.Linear(2, 2))
    assert list(prunable_parameters(m, exclude_types=(nn.Conv1d,))) == ["2.weight", "3.weight"]
    assert list(prunable_parameters(m, types=(nn.Conv1d,))) == ["0.weight"]
    with pytest.raises(ValueError, match="exclude_types=\\['Linear'\\]"):
        prunable_parameters(nn.Linear(2, 2), exclude_types=(nn.Linear,))


def test_shared_parameter_is_one_target():
    lin = nn.Linear(3, 3)
    m = nn.Sequential(lin, nn.ReLU(), lin)
    assert list(prunable_parameters(m)) == ["0.weight"]


def test_nothing_prunable_is_a_clear_error():
    with pytest.raises(ValueError, match="nothing to prune"):
        prunable_parameters(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3)))
    with pytest.raises(TypeError, match="torch.nn.Module"):
        prunable_parameters(torch.zeros(3))
