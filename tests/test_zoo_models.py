import pytest
import torch
from torch import nn

import saliency
from saliency import zoo
from saliency.zoo import get_model

SHAPES = {
    "lenet300": (1, 28, 28),
    "lenet5": (1, 28, 28),
    "mlp256": (1, 28, 28),
    "cnn_small": (1, 28, 28),
    "regression_mlp": (10,),
    "resnet20": (3, 32, 32),
    "vgg_small": (3, 32, 32),
    "mobilenet_small": (3, 32, 32),
    "mnist1d_mlp": (1, 40),
    "mnist1d_cnn": (1, 40),
}


def test_registry_names():
    # tokens: test_layerwise (char_gpt), test_hf_zoo (smollm2-135m)
    assert set(zoo.available_models()) == set(SHAPES) | {"char_gpt", "smollm2-135m"}
    with pytest.raises(ValueError, match="unknown model 'vgg'.*lenet300"):
        get_model("vgg", input_shape=(1, 28, 28), num_classes=10)
    with pytest.raises(ValueError, match="already registered"):
        zoo.register_model("lenet5")(lambda shape, n: nn.Linear(1, 1))


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_forward_backward_and_prunable(name):
    torch.manual_seed(0)
    shape = SHAPES[name]
    m = get_model(name, input_shape=shape, num_classes=7)
    out = m(torch.randn(3, *shape))
    assert out.shape == (3, 7)
    out.sum().backward()
    assert all(p.grad is not None for p in m.parameters())
    params = saliency.prunable_parameters(m)
    assert params and all(p.dim() >= 2 for p in params.values())
    masks = saliency.prune(m, "magnitude", 0.5)
    assert masks.sparsity == pytest.approx(0.5, abs=1e-3)
    assert m(torch.randn(2, *shape)).shape == (2, 7)


@pytest.mark.parametrize("name", ["lenet300", "regression_mlp", "mlp256", "cnn_small"])
def test_regression_head_has_one_output(name):
    shape = SHAPES[name] if name != "regression_mlp" else (10,)
    m = get_model(name, input_shape=shape, num_classes=None)
    assert m(torch.zeros(4, *shape)).shape == (4, 1)


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def test_parameter_counts_match_the_papers():
    mk = lambda name, shape=(1, 28, 28), n=10, **kw: get_model(
        name, input_shape=shape, num_classes=n, **kw
    )
    assert n_params(mk("lenet300")) == 784 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10
    assert n_params(mk("mlp256")) == 784 * 256 + 256 + 256 * 128 + 128 + 128 * 10 + 10
    assert n_params(mk("cnn_small")) == 20410  # the tfmot tutorial's model summary
    assert n_params(mk("regression_mlp", (10,), None)) == 10 * 128 + 128 + 128 + 1
    assert n_params(mk("lenet5")) == 61706  # LeNet-5 with 28x28 input and padding 2
    # He et al. 2016 report 0.27M for ResNet-20; conv + fc weights alone are 269,722 - BN
    r = mk("resnet20", (3, 32, 32))
    assert 0.26e6 < n_params(r) < 0.28e6
    assert len([m for m in r.modules() if isinstance(m, nn.Conv2d)]) == 19  # + fc = 20 layers
    assert n_params(mk("mnist1d_mlp", (1, 40))) == 40 * 100 + 100 + 100 * 100 + 100 + 100 * 10 + 10


def test_layer_names_are_readable():
    names = [
        n
        for n, _ in get_model("mlp256", input_shape=(1, 28, 28), num_classes=10).named_parameters()
    ]
    assert names == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "fc3.weight", "fc3.bias"]
    m = get_model("regression_mlp", input_shape=(10,), num_classes=None, out_relu=True)
    assert isinstance(list(m.children())[-1], nn.ReLU)


def test_models_adapt_to_input_shape():
    assert get_model("lenet5", input_shape=(3, 32, 32), num_classes=10)(
        torch.zeros(1, 3, 32, 32)
    ).shape == (1, 10)
    assert get_model("cnn_small", input_shape=(1, 8, 8), num_classes=10)(
        torch.zeros(1, 1, 8, 8)
    ).shape == (1, 10)
    assert get_model("lenet300", input_shape=(1, 8, 8), num_classes=10)(
        torch.zeros(2, 1, 8, 8)
    ).shape == (2, 10)


def test_bad_shapes_and_classes_are_errors():
    with pytest.raises(ValueError, match=r"lenet5.*\[C, H, W\].*\(10,\)"):
        get_model("lenet5", input_shape=(10,), num_classes=10)
    with pytest.raises(ValueError, match="lenet5.*cannot take input_shape"):
        get_model("lenet5", input_shape=(1, 4, 4), num_classes=10)
    with pytest.raises(ValueError, match="num_classes"):
        get_model("lenet300", input_shape=(1, 28, 28), num_classes=1)
    with pytest.raises(ValueError, match="input_shape"):
        get_model("lenet300", input_shape=(), num_classes=10)


def test_resnet_shortcut_option_a_keeps_identity_channels():
    torch.manual_seed(0)
    block = zoo.models.BasicBlock(4, 8, stride=2)
    for p in block.parameters():
        nn.init.zeros_(p)  # conv branch outputs 0 (BN weight 0): out = relu(shortcut)
    x = torch.randn(2, 4, 6, 6)
    out = block.eval()(x)
    expected = torch.zeros(2, 8, 3, 3)
    expected[:, 2:6] = torch.relu(x[:, :, ::2, ::2])
    torch.testing.assert_close(out, expected)


def test_init_follows_the_torch_seed():
    torch.manual_seed(3)
    a = get_model("lenet300", input_shape=(1, 28, 28), num_classes=10)
    torch.manual_seed(3)
    b = get_model("lenet300", input_shape=(1, 28, 28), num_classes=10)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
