"""Block-by-block propagation (saliency.blocks): the same masks and weights as the prefix path,
(groups + 1) block forwards, one block on the compute device at a time, resume after a kill."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from arch_zoo import ARCH_IDS, ARCHS  # noqa: E402

import saliency  # noqa: E402
from saliency import blocks  # noqa: E402
from saliency.zoo.text import CharGPT  # noqa: E402

CRITS = [("wanda", {}), ("sparsegpt", {"block_size": 4}), ("obc", {})]


def _gpt(layers=2):
    torch.manual_seed(0)
    return CharGPT(vocab=20, seq_len=16, d=16, layers=layers, heads=2)


def _tokens(n=12, batches=2):
    g = torch.Generator().manual_seed(3)
    out = []
    for _ in range(batches):
        x = torch.randint(0, 20, (n, 16), generator=g)
        out.append((x, x))
    return out


def _llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                   num_hidden_layers=3, num_attention_heads=4,
                                   num_key_value_heads=2)  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def _padded(batches=2, n=6, T=12):
    """Mapping batches with right padding of varying length (attention_mask 0, labels -100)."""
    g = torch.Generator().manual_seed(5)
    out = []
    for _ in range(batches):
        ids = torch.randint(0, 64, (n, T), generator=g)
        lens = torch.randint(T // 2, T + 1, (n,), generator=g)
        am = (torch.arange(T)[None, :] < lens[:, None]).long()
        out.append(
            {"input_ids": ids, "attention_mask": am, "labels": ids.masked_fill(am == 0, -100)}
        )
    return out


def _prune(model, data, crit, hp, params=None, **run):
    model = copy.deepcopy(model)
    cost = saliency.Cost(backward_passes=0)
    params = params or saliency.prunable_parameters(model)
    masks = saliency.prune(model, crit, 0.5, data=data, scope="layer", keep=False, cost=cost,
                           params={n: dict(model.named_parameters())[n] for n in params},
                           **hp, **run)  # fmt: skip
    return model, masks, cost.forwards


def _assert_same(a, b):
    (ma, ka, _), (mb, kb, _) = a, b
    assert set(ka) == set(kb)
    for n in ka:
        assert torch.equal(ka[n], kb[n]), n
    for (n, p), (_, q) in zip(ma.state_dict().items(), mb.state_dict().items(), strict=True):
        assert torch.equal(p, q), n


@pytest.mark.parametrize(("crit", "hp"), CRITS, ids=[c for c, _ in CRITS])
def test_char_gpt_blocks_bit_identical_to_prefix_path(crit, hp):
    model, data = _gpt(), _tokens()
    params = saliency.prunable_parameters(model, exclude=["head.weight"])
    new = _prune(model, data, crit, hp, params)
    old = _prune(model, data, crit, hp, params, blocks=False)
    _assert_same(new, old)
    # 2 blocks x (4 groups + 1), 2 batches; prefix: the probe + one catch per batch
    assert new[2] == {"prefix": 3, "block": 20}
    assert old[2] == {"prefix": 1 + 8 * 2, "block": 0}


def test_zoo_char_gpt_with_its_head_after_the_blocks():
    from saliency import zoo

    model = zoo.get_model("char_gpt", input_shape=(16,), num_classes=20)
    params = saliency.prunable_parameters(model, include_head=True)
    new = _prune(model, _tokens(batches=1), "sparsegpt", {}, params)
    _assert_same(new, _prune(model, _tokens(batches=1), "sparsegpt", {}, params, blocks=False))
    assert new[2]["prefix"] == 1 + 1 + 1  # probe, catch, the head on the prefix path


@pytest.mark.parametrize(("crit", "hp"), CRITS, ids=[c for c, _ in CRITS])
def test_llama_dict_batches_with_padding_bit_identical(crit, hp):
    model, data = _llama(), _padded()
    new = _prune(model, data, crit, hp)
    _assert_same(new, _prune(model, data, crit, hp, blocks=False))
    assert new[2] == {"prefix": 3, "block": 3 * (4 + 1) * 2}  # q/k/v, o, gate/up, down


@pytest.mark.parametrize("arch", ARCHS, ids=ARCH_IDS)
def test_arch_zoo_same_result_with_or_without_the_block_stage(arch):
    model, x, y = arch.make()
    try:
        old = _prune(model, [(x, y)], "sparsegpt", {"damp": 0.1}, blocks=False)
    except ValueError:
        return  # refused by the layer-wise capture (test_zoo_layerwise checks the message)
    _assert_same(_prune(model, [(x, y)], "sparsegpt", {"damp": 0.1}), old)


def test_offload_keeps_one_block_on_the_compute_device(monkeypatch):
    moves, on = [], set()
    real = blocks.move

    def watch(module, device):
        name = next(n for n, m in model_ref[0].named_modules() if m is module)
        moves.append(name)
        on.symmetric_difference_update({name})
        assert len(on) <= 1, on
        real(module, device)

    model_ref = [None]
    monkeypatch.setattr(blocks, "move", watch)
    model, data = _llama(), _padded()
    work = copy.deepcopy(model)
    model_ref[0] = work
    masks = saliency.prune(work, "sparsegpt", 0.5, data=data, scope="layer", keep=False,
                           offload=True, device="cpu")  # fmt: skip
    names = [f"model.layers.{i}" for i in range(3)]
    assert moves == [n for n in names for _ in (0, 1)] and not on
    ref, ref_masks, _ = _prune(model, data, "sparsegpt", {}, blocks=False)
    _assert_same((work, masks, None), (ref, ref_masks, None))


class _Killed(Exception):
    pass


def test_resume_after_a_kill_is_bit_identical(monkeypatch, tmp_path):
    model, data = _llama(), _padded()
    whole = _prune(model, data, "sparsegpt", {})
    real = blocks.Store.save_state

    def kill_after_block_1(self, done, inputs):
        real(self, done, inputs)
        if done == 2:
            raise _Killed

    monkeypatch.setattr(blocks.Store, "save_state", kill_after_block_1)
    with pytest.raises(_Killed):
        _prune(model, data, "sparsegpt", {}, checkpoint_dir=tmp_path)
    monkeypatch.setattr(blocks.Store, "save_state", real)
    resumed = _prune(model, data, "sparsegpt", {}, checkpoint_dir=tmp_path)
    _assert_same(resumed, whole)
    assert resumed[2] == {"prefix": 1, "block": 1 * (4 + 1) * 2}  # only block 2 ran
    with pytest.raises(ValueError, match="holds another run.*criterion"):
        _prune(model, data, "sparsegpt", {"damp": 0.1}, checkpoint_dir=tmp_path)


def test_block_settings_refused_where_they_cannot_apply():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    data = [(torch.randn(16, 4), torch.zeros(16, dtype=torch.long))]
    with pytest.raises(ValueError, match="not possible here: no block structure"):
        saliency.prune(model, "wanda", 0.5, data=data, scope="layer", offload=True)
    with pytest.raises(ValueError, match="blocks= names unknown modules \\['nope'\\]"):
        saliency.prune(model, "wanda", 0.5, data=data, scope="layer", blocks=["nope"])
    with pytest.raises(ValueError, match="blocks= takes a list of module names"):
        saliency.prune(model, "wanda", 0.5, data=data, scope="layer", blocks="0")
    with pytest.raises(ValueError, match="settings of the layer-wise solvers"):
        saliency.prune(model, "magnitude", 0.5, data=data, offload=True)


@pytest.mark.gpu
def test_offload_to_cuda_one_block_at_a_time():
    """On CUDA: the model stays on the CPU, each block visits the GPU alone, and the masks
    match a CPU run's up to round-off (Wanda: ties aside, the same)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model, data = _llama(), _padded()
    work, seen = copy.deepcopy(model), []

    def check(module, args, kwargs):
        on = [i for i, b in enumerate(work.model.layers) if next(b.parameters()).is_cuda]
        seen.append(on)

    hs = [b.register_forward_pre_hook(check, with_kwargs=True) for b in work.model.layers]
    masks = saliency.prune(work, "wanda", 0.5, data=data, scope="layer", keep=False, offload=True)
    for h in hs:
        h.remove()
    assert all(len(on) <= 1 for on in seen) and any(seen)
    assert all(not p.is_cuda for p in work.parameters())
    _, ref, _ = _prune(model, data, "wanda", {})
    agree = sum(int((masks[n] == ref[n]).sum()) for n in ref) / sum(m.numel() for m in ref.values())
    assert agree > 0.99


class _Scaled(torch.nn.Module):
    """Blocks with work between them: no chain, so no block stage."""

    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(6, 6) for _ in range(3))

    def forward(self, x):
        for b in self.blocks:
            x = torch.tanh(b(x)) * 2
        return x


def test_no_chain_falls_back_to_the_prefix_path_or_is_refused_when_asked():
    torch.manual_seed(0)
    model = _Scaled()
    data = [(torch.randn(32, 6), torch.zeros(32, dtype=torch.long))]
    auto = _prune(model, data, "sparsegpt", {})
    _assert_same(auto, _prune(model, data, "sparsegpt", {}, blocks=False))
    assert auto[2]["block"] == 0
    with pytest.raises(ValueError, match="block 1 is not fed block 0's output"):
        _prune(model, data, "sparsegpt", {}, blocks=[f"blocks.{i}" for i in range(3)])
