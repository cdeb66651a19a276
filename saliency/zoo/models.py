"""Models by name, built for a dataset's input shape and number of classes.

`get_model(name, input_shape=..., num_classes=...)`; `num_classes=None` gives one regression
output. MLPs flatten their input; layers have readable names ("fc1.weight", "conv1.weight") so
masks, scores and reports are keyed by them.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from saliency.channels import ChannelPad

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable:
    """Decorator: register `fn(input_shape, num_classes, **kw) -> nn.Module` under `name`."""

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _MODELS and _MODELS[name] is not fn:
            raise ValueError(f"model name {name!r} is already registered")
        _MODELS[name] = fn
        return fn

    return wrap


def available_models() -> list[str]:
    return sorted(_MODELS)


def get_model(name: str, *, input_shape: Sequence[int], num_classes: int | None, **kw) -> nn.Module:
    """A freshly initialized model `name` (initialized from torch's global RNG: seed it, or
    wrap the call in `torch.random.fork_rng`)."""
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(available_models())}")
    shape = tuple(int(d) for d in input_shape)
    if not shape or any(d < 1 for d in shape):
        raise ValueError(
            f"input_shape must be a non-empty tuple of positive ints; got {input_shape!r}"
        )
    if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 2):
        raise ValueError(
            f"num_classes must be an int >= 2, or None for regression; got {num_classes!r}"
        )
    return _MODELS[name](shape, num_classes, **kw)


def _outputs(num_classes: int | None) -> int:
    return 1 if num_classes is None else num_classes


def _channels(shape: tuple[int, ...], name: str, ndim: int) -> int:
    if len(shape) != ndim + 1:
        layout = "[C, H, W]" if ndim == 2 else "[C, L]"
        raise ValueError(f"model {name!r} takes images shaped {layout}; got input_shape {shape}")
    return shape[0]


def _flat_features(features: nn.Module, shape: tuple[int, ...], name: str) -> int:
    """Size of `features(x)` flattened, for one input shaped `shape` (a dry run, no grad)."""
    try:
        with torch.no_grad():
            return math.prod(features(torch.zeros(1, *shape)).shape[1:])
    except RuntimeError as err:
        raise ValueError(f"model {name!r} cannot take input_shape {shape}: {err}") from None


def mlp(shape: tuple[int, ...], widths: Sequence[int], outputs: int, *, out_relu: bool = False):
    """Flatten -> fc1 -> relu1 -> ... -> fc{k} (optionally -> relu on the output)."""
    layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
    sizes = [math.prod(shape), *widths, outputs]
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True), start=1):
        layers[f"fc{i}"] = nn.Linear(a, b)
        if i < len(sizes) - 1 or out_relu:
            layers[f"relu{i}"] = nn.ReLU()
    return nn.Sequential(layers)


@register_model("lenet300")
def lenet300(shape, num_classes, *, hidden: Sequence[int] = (300, 100)) -> nn.Module:
    """LeNet-300-100 (LeCun et al. 1998): 784-300-100-10 with ReLU."""
    return mlp(shape, hidden, _outputs(num_classes))


@register_model("mlp256")
def mlp256(shape, num_classes, *, hidden: Sequence[int] = (256, 128)) -> nn.Module:
    """The MLP 784-256-128-10 of the PyTorch pruning article."""
    return mlp(shape, hidden, _outputs(num_classes))


@register_model("regression_mlp")
def regression_mlp(shape, num_classes, *, hidden: int = 128, out_relu: bool = False) -> nn.Module:
    """Dense(128, relu) -> Dense(1), the tfmot tutorial's Friedman #1 model (which also puts a
    relu on the output: `out_relu=True`)."""
    return mlp(shape, [hidden], _outputs(num_classes), out_relu=out_relu)


@register_model("mnist1d_mlp")
def mnist1d_mlp(shape, num_classes, *, hidden: Sequence[int] = (100, 100)) -> nn.Module:
    """The MNIST-1D MLP (Greydanus 2020): 40-100-100-10 with ReLU."""
    return mlp(shape, hidden, _outputs(num_classes))


class _ConvNet(nn.Module):
    """`features` (convolutions) -> flatten -> `classifier` (dense layers)."""

    def __init__(self, features: nn.Sequential, classifier: nn.Sequential):
        super().__init__()
        self.features, self.classifier = features, classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


@register_model("cnn_small")
def cnn_small(shape, num_classes, *, channels: int = 12) -> nn.Module:
    """Conv(12, 3x3, relu) -> MaxPool(2) -> Dense(10): the tfmot MNIST tutorial's CNN."""
    c = _channels(shape, "cnn_small", 2)
    features = nn.Sequential(
        OrderedDict(conv=nn.Conv2d(c, channels, 3), relu=nn.ReLU(), pool=nn.MaxPool2d(2))
    )
    n = _flat_features(features, shape, "cnn_small")
    return _ConvNet(features, nn.Sequential(OrderedDict(fc=nn.Linear(n, _outputs(num_classes)))))


@register_model("lenet5")
def lenet5(shape, num_classes) -> nn.Module:
    """LeNet-5 (LeCun et al. 1998) with ReLU and max pooling: conv 6@5x5 (padding 2) -> pool ->
    conv 16@5x5 -> pool -> 120 -> 84 -> classes."""
    c = _channels(shape, "lenet5", 2)
    features = nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(c, 6, 5, padding=2),
            relu1=nn.ReLU(),
            pool1=nn.MaxPool2d(2),
            conv2=nn.Conv2d(6, 16, 5),
            relu2=nn.ReLU(),
            pool2=nn.MaxPool2d(2),
        )
    )
    n = _flat_features(features, shape, "lenet5")
    classifier = nn.Sequential(
        OrderedDict(
            fc1=nn.Linear(n, 120),
            relu1=nn.ReLU(),
            fc2=nn.Linear(120, 84),
            relu2=nn.ReLU(),
            fc3=nn.Linear(84, _outputs(num_classes)),
        )
    )
    return _ConvNet(features, classifier)


@register_model("mnist1d_cnn")
def mnist1d_cnn(shape, num_classes, *, channels: int = 25) -> nn.Module:
    """The MNIST-1D CNN (Greydanus 2020): three Conv1d (5, 3, 3; stride 2) with ReLU -> Dense."""
    c = _channels(shape, "mnist1d_cnn", 1)
    features = nn.Sequential(
        OrderedDict(
            conv1=nn.Conv1d(c, channels, 5, stride=2, padding=1),
            relu1=nn.ReLU(),
            conv2=nn.Conv1d(channels, channels, 3, stride=2, padding=1),
            relu2=nn.ReLU(),
            conv3=nn.Conv1d(channels, channels, 3, stride=2, padding=1),
            relu3=nn.ReLU(),
        )
    )
    n = _flat_features(features, shape, "mnist1d_cnn")
    return _ConvNet(features, nn.Sequential(OrderedDict(fc=nn.Linear(n, _outputs(num_classes)))))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity shortcut; where the shape changes, the shortcut
    subsamples and zero-pads channels (option A of He et al. 2016, no extra parameters)."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        # a module (not F.pad inline) so that channel groups and compact can follow it
        changes = stride > 1 or c_out != c_in
        self.shortcut = ChannelPad(c_in, c_out, stride) if changes else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR ResNet-(6n+2) of He et al. 2016: 3 stages of n blocks, widths w, 2w, 4w."""

    def __init__(self, c_in: int, outputs: int, n: int = 3, width: int = 16):
        super().__init__()
        self.conv = nn.Conv2d(c_in, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        blocks, c = [], width
        for stage in range(3):
            w = width * 2**stage
            for i in range(n):
                blocks.append(BasicBlock(c, w, 2 if stage > 0 and i == 0 else 1))
                c = w
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(c, outputs)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(F.relu(self.bn(self.conv(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@register_model("resnet20")
def resnet20(shape, num_classes, *, width: int = 16) -> nn.Module:
    """ResNet-20 for 3x32x32 input (He et al. 2016, 0.27M parameters at width 16)."""
    return ResNet(_channels(shape, "resnet20", 2), _outputs(num_classes), n=3, width=width)


@register_model("vgg_small")
def vgg_small(shape, num_classes, *, widths: Sequence[int] = (16, 32, 64)) -> nn.Module:
    """VGG-style: per width, conv3x3-BN-ReLU twice then max-pool 2; flatten -> Linear(128) ->
    ReLU -> Linear(classes) (Simonyan & Zisserman 2015, scaled down for 32x32 inputs)."""
    c = _channels(shape, "vgg_small", 2)
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    for i, w in enumerate(widths, start=1):
        for j in (1, 2):
            layers[f"conv{i}_{j}"] = nn.Conv2d(c, w, 3, padding=1, bias=False)
            layers[f"bn{i}_{j}"] = nn.BatchNorm2d(w)
            layers[f"relu{i}_{j}"] = nn.ReLU()
            c = w
        layers[f"pool{i}"] = nn.MaxPool2d(2)
    features = nn.Sequential(layers)
    n = _flat_features(features, shape, "vgg_small")
    classifier = nn.Sequential(
        OrderedDict(
            fc1=nn.Linear(n, 128), relu=nn.ReLU(), fc2=nn.Linear(128, _outputs(num_classes))
        )
    )
    return _ConvNet(features, classifier)


class SeparableBlock(nn.Module):
    """MobileNet block (Howard et al. 2017): depthwise 3x3 conv-BN-ReLU, pointwise 1x1 conv-BN-ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.dw = nn.Conv2d(c_in, c_in, 3, stride=stride, padding=1, groups=c_in, bias=False)
        self.bn1 = nn.BatchNorm2d(c_in)
        self.pw = nn.Conv2d(c_in, c_out, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn2(self.pw(F.relu(self.bn1(self.dw(x))))))


@register_model("mobilenet_small")
def mobilenet_small(shape, num_classes, *, width: int = 16) -> nn.Module:
    """Depthwise-separable CNN: conv3x3-BN-ReLU stem, four `SeparableBlock`s (widths w, 2w, 2w,
    4w; stride 2 at the 2nd and 4th), global average pool, Linear head."""
    c = _channels(shape, "mobilenet_small", 2)
    plan = [(width, 2 * width, 2), (2 * width, 2 * width, 1), (2 * width, 4 * width, 2)]
    layers: OrderedDict[str, nn.Module] = OrderedDict(
        conv=nn.Conv2d(c, width, 3, padding=1, bias=False), bn=nn.BatchNorm2d(width), relu=nn.ReLU()
    )
    layers["block1"] = SeparableBlock(width, width, 1)
    for i, (a, b, s) in enumerate(plan, start=2):
        layers[f"block{i}"] = SeparableBlock(a, b, s)
    layers["pool"] = nn.AdaptiveAvgPool2d(1)
    features = nn.Sequential(layers)
    return _ConvNet(
        features, nn.Sequential(OrderedDict(fc=nn.Linear(4 * width, _outputs(num_classes))))
    )
