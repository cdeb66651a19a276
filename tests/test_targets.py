import pytest
import torch
from torch import nn

from saliency import prunable_parameters
from saliency.targets import channel_layout, parameter_aliases


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


def test_tied_weight_is_one_target_under_its_named_parameters_name():
    from arch_zoo import TiedLM

    model = TiedLM()  # head.weight = emb.weight: named_parameters() calls it emb.weight
    assert list(prunable_parameters(model)) == ["mix.weight", "emb.weight"]
    assert prunable_parameters(model)["emb.weight"] is model.head.weight
    # the head's place in model order: keep_output_dense keeps the tied head (and embedding) dense
    assert list(prunable_parameters(model, keep_output_dense=True)) == ["mix.weight"]
    # patterns see every name; exclusion by any name wins
    assert list(prunable_parameters(model, include="head.weight")) == ["emb.weight"]
    assert list(prunable_parameters(model, exclude="head.*")) == ["mix.weight"]
    assert parameter_aliases(model) == {"head.weight": "emb.weight"}


def test_attention_projections_are_targets():
    mha = nn.MultiheadAttention(4, 2)
    assert list(prunable_parameters(nn.Sequential(mha))) == [
        "0.in_proj_weight",
        "0.out_proj.weight",
    ]
    split = nn.MultiheadAttention(4, 2, kdim=3, vdim=5)  # separate q/k/v weights
    assert list(prunable_parameters(split)) == [
        "q_proj_weight",
        "k_proj_weight",
        "v_proj_weight",
        "out_proj.weight",
    ]
    layer = nn.TransformerEncoderLayer(4, 2, dim_feedforward=6)
    assert "self_attn.in_proj_weight" in prunable_parameters(layer)
    assert "self_attn.in_proj_weight" not in prunable_parameters(
        layer, exclude_types=(nn.MultiheadAttention,)
    )


def test_channel_layout_of_transposed_convolutions():
    m = nn.Sequential(
        nn.Conv2d(2, 4, 3, groups=2), nn.ConvTranspose2d(4, 6, 2, groups=2), nn.Linear(3, 3)
    )
    assert channel_layout(m, prunable_parameters(m)) == {"1.weight": (1, 2)}
    conv, up = nn.Conv1d(3, 3, 1), nn.ConvTranspose1d(3, 3, 1)
    up.weight = conv.weight  # the same [3, 3, 1] tensor read as [out, in] and as [in, out]
    tied = nn.Sequential(conv, up)
    with pytest.raises(ValueError, match="'0.weight' is shared by modules whose output channels"):
        channel_layout(tied, prunable_parameters(tied))
