"""The README's ten-line Python example, run as written (it must stay true)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import saliency

README = Path(__file__).parent.parent / "README.md"


def test_readme_python_example_runs(capsys):
    pytest.importorskip("mlxtend")
    (block,) = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)[:1]
    env: dict = {}
    exec(compile(block, str(README), "exec"), env)
    model, masks = env["model"], env["masks"]
    assert abs(masks.sparsity - 0.9) < 1e-6
    params = dict(model.named_parameters())
    assert all(not params[n].detach()[~m].any() for n, m in masks.items())  # fine-tuned, still 0
    assert saliency.attached_masks(model) is None  # remove() left a plain model
    assert "total" in capsys.readouterr().out
