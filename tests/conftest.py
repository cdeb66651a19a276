import pytest
import torch
from torch import nn


def mlp_784() -> nn.Module:
    """The MLP 784-256-128-10 of the torch.nn.utils.prune article."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, 256),
        nn.ReLU(),
        nn.Linear(256, 128),
        nn.ReLU(),
        nn.Linear(128, 10),
    )


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


@pytest.fixture
def mlp():
    torch.manual_seed(0)
    return mlp_784()


@pytest.fixture
def tiny_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))


@pytest.fixture
def tiny_cnn():
    torch.manual_seed(0)
    return TinyCNN()


@pytest.fixture
def tiny_data():
    """Two batches of 8 samples for the tiny MLP (6 features, 3 classes)."""
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(2)
    ]


@pytest.fixture
def cnn_data():
    g = torch.Generator().manual_seed(2)
    return [
        (torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 3, (8,), generator=g))
        for _ in range(2)
    ]
