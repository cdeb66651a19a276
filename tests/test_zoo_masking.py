"""The masking core on every architecture of the zoo: prune by magnitude, attach, train with every
optimizer; pruned weights stay exactly zero, the others train, and `remove` leaves a plain model
whose state_dict loads into an unpruned copy. No per-sample quantity is involved, so archs whose
samples mix (BatchNorm on batch statistics) are in too."""

import copy

import pytest
import torch
from arch_zoo import ARCH_IDS, ARCHS, _logits
from test_apply import MAKE_OPTIMIZER, pruned_values

import saliency
from saliency.allocate import group_index
from saliency.targets import channel_layout


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Models this small gain nothing from intra-op threads, and on a busy machine their
    synchronization costs ~100x the work."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def assert_whole_channels(model, masks):
    """Every output channel (dim 0, or a column of a group for ConvTranspose) all kept or all pruned."""
    layout = channel_layout(model, saliency.prunable_parameters(model))
    for n, keep in masks.items():
        idx = group_index(keep.shape, "channel", None, "cpu", layout.get(n, (0, 1)))
        for c in idx.unique():
            assert keep[idx == c].all() or not keep[idx == c].any(), (n, int(c))


@pytest.mark.parametrize("granularity", ["element", "channel"])
@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
def test_pruned_weights_stay_zero_on_every_arch(arch, granularity):
    for opt_name, make_opt in MAKE_OPTIMIZER.items():
        model, x, y = arch.make()
        fresh = copy.deepcopy(model)
        model.train()
        masks = saliency.prune(model, "magnitude", 0.5, scope="global", granularity=granularity)
        assert 0 < masks.sparsity < 1
        if granularity == "channel":
            assert_whole_channels(model, masks)
        params = dict(model.named_parameters())
        before = {n: p.detach().clone() for n, p in params.items()}
        opt = make_opt(model.parameters())
        for _ in range(3):
            opt.zero_grad()
            arch.loss(_logits(model(x)), y).backward()
            opt.step()
        pruned = pruned_values(model, masks)
        assert pruned.numel() == masks.zeros and (pruned == 0.0).all(), opt_name
        for n, p in params.items():
            keep = masks[n] if n in masks else torch.ones_like(p, dtype=torch.bool)
            moved = not torch.equal(p.detach()[keep], before[n][keep])
            # trained, unless frozen; or a zero tensor with zero gradient (upstream of the
            # zero-initialised head of a "zero_init" arch: weight decay has nothing to shrink)
            still = "zero_init" in arch.tags and not before[n].any()
            assert moved == p.requires_grad or still, (opt_name, n)
        saliency.remove(model)
        assert saliency.attached_masks(model) is None
        fresh.load_state_dict(model.state_dict())
        assert not pruned_values(fresh, masks).any(), opt_name
