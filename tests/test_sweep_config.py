"""Sweep configs: validation before any work, overrides, criteria specs, run ids."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import sweep_fixtures  # noqa: E402
from sweep_fixtures import clean_zoo  # noqa: E402, F401  (autouse)

from saliency.sweep.config import (  # noqa: E402
    ConfigError,
    apply_overrides,
    canonical_json,
    digest,
    load_config,
    parse_config,
    tomllib,
)
from saliency.sweep.jobs import unit_run_id  # noqa: E402
from saliency.sweep.runner import plan  # noqa: E402


def raw(**changes):
    r = tomllib.loads(sweep_fixtures.TINY)
    r.update(changes)
    return r


def test_valid_config_defaults_and_normalisation():
    cfg = parse_config(raw(sparsities=[0.9, 0.5, 0.5], seeds=[1, 0, 1]))
    assert cfg.sparsities == (0.5, 0.9) and cfg.seeds == (1, 0)
    assert [c.label for c in cfg.criteria] == ["magnitude", "random"]
    assert cfg.train["epochs"] == 2 and cfg.train["optimizer"] == "sgd"
    assert cfg.finetune["lr"] == cfg.train["lr"]  # finetune inherits unset keys from train
    assert cfg.scoring == {"n_samples": 64, "batch_size": 32}


@pytest.mark.parametrize(
    "change, key",
    [
        ({"epoch": 3}, "'epoch'"),
        ({"train": {"epoch": 3}}, "'train.epoch'"),
        ({"scoring": {"samples": 3}}, "'scoring.samples'"),
    ],
)
def test_unknown_key_names_the_key_and_the_accepted_ones(change, key):
    with pytest.raises(ConfigError, match=key) as e:
        parse_config(raw(**change))
    assert "accepted" in str(e.value)
    if "train" in change:
        assert "epochs" in str(e.value) and "batch_size" in str(e.value)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"criteria": ["magnitude", "nope"]}, "unknown criterion 'nope'.*magnitude"),
        ({"criteria": [{"name": "magnitude", "alpha": 1}]}, "magnitude.*alpha"),
        ({"criteria": ["magnitude", "magnitude"]}, "label 'magnitude' appears twice"),
        ({"model": "resnet9000"}, "unknown model 'resnet9000'.*tiny_mlp"),
        ({"dataset": "imagenet"}, "unknown dataset 'imagenet'.*tiny_blobs"),
        ({"modes": ["oneshot", "magic"]}, "modes.*oneshot, finetune, gradual, iterative, init"),
        ({"sparsities": [0.5, 1.0]}, r"sparsities: 1\.0 is outside \[0, 1\)"),
        ({"sparsities": [-0.1]}, r"-0\.1 is outside"),
        ({"seeds": [0.5]}, "seeds"),
        ({"scope": "local"}, "unknown scope 'local'"),
        ({"data_root": "/nonexistent/mnist"}, "data_root '/nonexistent/mnist' is not a directory"),
        ({"criteria": []}, "criteria"),
        ({"imports": ["no_such_module_xyz"]}, "no_such_module_xyz"),
    ],
)
def test_bad_configs_fail_naming_the_problem(change, match):
    with pytest.raises(ConfigError, match=match):
        parse_config(raw(**change))


def test_repeated_criterion_with_labels_and_hparams():
    cfg = parse_config(
        raw(
            criteria=[
                {"name": "random"},
                {"name": "random", "label": "random-s1", "seed": 1},
            ]
        )
    )
    assert [(c.label, c.hparams) for c in cfg.criteria] == [
        ("random", {}),
        ("random-s1", {"seed": 1}),
    ]
    runs = {u.run_id for j in plan(cfg) for u in j.units}
    # criteria x sparsities x seeds x modes + dense + the dense fine-tune baseline, per seed
    assert len(runs) == 2 * 2 * 2 * 2 + 2 + 2


def test_all_criteria_with_filtered_defaults():
    import saliency

    cfg = parse_config(
        raw(
            criteria="all",
            exclude_criteria=["random"],
            criterion_defaults={"magnitude": {"not_a_field": 1}},
        )
    )
    names = [c.name for c in cfg.criteria]
    assert names == [n for n in saliency.available_criteria("element") if n != "random"]
    assert cfg.criteria[names.index("magnitude")].hparams == {}


def test_overrides_use_toml_values_and_dotted_keys():
    r = apply_overrides(
        raw(),
        [
            "train.epochs=5",
            "seeds=[3, 4]",
            "model=tiny_mlp",
            "allocate.block=[2, 3]",
            "save_scores=true",
        ],
    )
    assert r["train"]["epochs"] == 5 and r["seeds"] == [3, 4] and r["model"] == "tiny_mlp"
    assert r["allocate"]["block"] == [2, 3] and r["save_scores"] is True
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides(raw(), ["epochs"])


def test_load_config_file_name_and_errors(tmp_path):
    p = sweep_fixtures.write_config(tmp_path)
    cfg = load_config(p, ["name=renamed"])
    assert cfg.name == "renamed"
    p.write_text(p.read_text().replace('name = "tiny"\n', ""))
    assert load_config(p).name == "tiny"  # the file's stem
    with pytest.raises(ConfigError, match="no sweep config"):
        load_config(tmp_path / "missing.toml")
    (tmp_path / "bad.toml").write_text("model = ")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(tmp_path / "bad.toml")


def test_run_ids_are_sha256_of_canonical_json_and_track_the_config():
    cfg = parse_config(raw())
    spec = cfg.criteria[0]
    rid = unit_run_id(cfg, 0, "oneshot", spec, 0.5)
    assert len(rid) == 12 and int(rid, 16) >= 0
    assert (
        digest({"b": 1, "a": [1, 2]})
        == hashlib.sha256(
            json.dumps({"a": [1, 2], "b": 1}, separators=(",", ":")).encode()
        ).hexdigest()[:12]
    )
    assert canonical_json({"b": 1, "a": 2}) == '{"a":2,"b":1}'
    assert rid == unit_run_id(parse_config(raw()), 0, "oneshot", spec, 0.5)  # deterministic
    others = {
        unit_run_id(cfg, 1, "oneshot", spec, 0.5),
        unit_run_id(cfg, 0, "finetune", spec, 0.5),
        unit_run_id(cfg, 0, "oneshot", cfg.criteria[1], 0.5),
        unit_run_id(cfg, 0, "oneshot", spec, 0.9),
        unit_run_id(parse_config(raw(train={"epochs": 3})), 0, "oneshot", spec, 0.5),
    }
    assert rid not in others and len(others) == 5
    # the sweep's name and the finetune settings do not change a oneshot unit's id
    assert rid == unit_run_id(
        parse_config(raw(name="other", finetune={"epochs": 4})), 0, "oneshot", spec, 0.5
    )


def test_run_ids_are_stable_across_processes():
    import subprocess

    code = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import sweep_fixtures, tomllib;"
        "from saliency.sweep.config import parse_config;"
        "from saliency.sweep.jobs import unit_run_id;"
        "c = parse_config(tomllib.loads(sweep_fixtures.TINY));"
        "print(unit_run_id(c, 0, 'oneshot', c.criteria[0], 0.5))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    cfg = parse_config(raw())
    assert out.stdout.strip() == unit_run_id(cfg, 0, "oneshot", cfg.criteria[0], 0.5)


@pytest.mark.parametrize(
    "section, key, value",
    [
        ("train", "optimizer", "rmsprop"),
        ("train", "lr", "fast"),
        ("finetune", "epochs", -1),
        ("iterative", "rounds", 0),
        ("gradual", "power", 0),
        ("scoring", "n_samples", 0),
    ],
)
def test_bad_training_settings_fail_at_parse_time(section, key, value):
    with pytest.raises(ConfigError, match=f"{section}.{key} must be"):
        parse_config(raw(**{section: {key: value}}))


def test_every_config_key_is_documented():
    from saliency.sweep.config import SECTIONS, TOP

    doc = (Path(__file__).parent.parent / "docs" / "config.md").read_text()
    for key in set(TOP) - set(SECTIONS):
        assert f"`{key}`" in doc, key
    for section, keys in SECTIONS.items():
        assert f"`[{section}]`" in doc, section
        for key in keys:
            assert f"`{key}`" in doc, f"{section}.{key}"


@pytest.mark.parametrize("missing", ["model", "dataset"])
def test_a_config_without_model_or_dataset_says_what_to_add(missing):
    from saliency.sweep.config import ConfigError, parse_config

    raw = {"name": "x", "model": "lenet300", "dataset": "mnist5k", "criteria": ["magnitude"]}
    raw.pop(missing)
    with pytest.raises(ConfigError, match=f"names no {missing}: add {missing} ="):
        parse_config(raw)
