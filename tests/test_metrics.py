import gzip
import io

import pytest
import torch
from torch import nn

import saliency
from saliency.sweep.metrics import count_flops, gzip_size, params_count


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)  # 9x9 -> 5x5
        self.conv2 = nn.Conv2d(8, 8, 3, groups=4)  # 5x5 -> 3x3
        self.bn = nn.BatchNorm2d(8)
        self.conv1d = nn.Conv1d(8, 4, 2)  # over the 9 flattened positions -> 8
        self.fc = nn.Linear(4 * 8, 5)

    def forward(self, x):
        x = self.bn(self.conv2(torch.relu(self.conv1(x))))
        x = self.conv1d(x.flatten(2))
        return self.fc(x.flatten(1))


def test_count_flops_by_hand():
    torch.manual_seed(0)
    m = Net().train()
    dense, nonzero = count_flops(m, (3, 9, 9))
    expect = 5 * 5 * 8 * 3 * 9 + 3 * 3 * 8 * 2 * 9 + 8 * 4 * 8 * 2 + 32 * 5
    assert dense == nonzero == expect
    assert m.training and float(m.bn.running_mean.abs().sum()) == 0.0  # eval pass, mode restored
    with torch.no_grad():
        m.conv1.weight[:4] = 0  # half the filters
        m.fc.weight[:, :10] = 0
    dense2, nonzero2 = count_flops(m, (3, 9, 9))
    assert dense2 == dense
    assert nonzero2 == expect - 5 * 5 * 4 * 3 * 9 - 10 * 5


def test_count_flops_linear_on_sequences():
    m = nn.Sequential(nn.Linear(6, 4))
    assert count_flops(m, (7, 6)) == (7 * 24, 7 * 24)  # applied at each of the 7 positions
    assert not any(mod._forward_hooks for mod in m.modules())


def test_count_flops_with_attached_masks():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Flatten(), nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 3))
    masks = saliency.prune(m, "magnitude", 0.75)
    dense, nonzero = count_flops(m, (3, 4))
    assert dense == 150 and nonzero == masks.numel - masks.zeros == 150 - round(0.75 * 150)


def test_gzip_size_is_gzip_of_torch_save():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in m.state_dict().items()}, buf)
    ref = len(gzip.compress(buf.getvalue(), compresslevel=9, mtime=0))
    assert gzip_size(m) == ref
    assert gzip_size(m) == gzip_size(m)  # deterministic
    dense = gzip_size(m)
    saliency.prune(m, "magnitude", 0.9)  # masks attached: non-persistent, not saved
    assert set(m.state_dict()) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert gzip_size(m) < 0.5 * dense


def test_params_count():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 2))
    assert params_count(m, None) == (120, 120)
    masks = saliency.prune(m, "magnitude", 0.5)
    assert params_count(m, masks) == (120, 60)
    saliency.remove(m)
    assert params_count(m, None) == (120, 60)
    only_first = {"0.weight": masks["0.weight"]}
    assert params_count(m, only_first)[0] == 100
    with pytest.raises(ValueError, match="fc9.weight"):
        params_count(m, {"fc9.weight": torch.ones(2, 2, dtype=torch.bool)})
