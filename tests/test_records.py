"""Reading records defensively: bad lines, duplicates, units cut short; configurations kept apart."""

from __future__ import annotations

import json

import pytest

from saliency.sweep.records import (
    append_records,
    config_groups,
    done_run_ids,
    read_records,
)


def rec(run_id="a", phase="pruned", metric="accuracy", value=0.5, n=2, **kw):
    base = {
        "run_id": run_id,
        "sweep": "s",
        "criterion": "magnitude",
        "label": "magnitude",
        "mode": "oneshot",
        "seed": 0,
        "sparsity_target": 0.5,
        "phase": phase,
        "metric": metric,
        "value": value,
        "split": "test",
        "unit_records": n,
        "settings": {"train": {"epochs": 2}},
        "time": 1.0,
    }
    return {**base, **kw}


def unit(run_id="a", **kw):
    return [rec(run_id, metric="accuracy", **kw), rec(run_id, metric="loss", value=1.0, **kw)]


def test_garbage_lines_are_skipped_with_a_warning(tmp_path, caplog):
    append_records(tmp_path, unit("a"))
    with open(tmp_path / "records.jsonl", "ab") as f:
        f.write(b"\xff\xfe not utf-8 \x80\n")
        f.write(b"{}\n")
        f.write(json.dumps(rec("b", value="high")).encode() + b"\n")
        f.write(b"[1, 2]\n")
        f.write(b'{"run_id": "c", "pha')  # a torn last line
    append_records(tmp_path, unit("d"))
    records = read_records(tmp_path)
    assert sorted({r["run_id"] for r in records}) == ["a", "d"]
    for why in ("not UTF-8", "field 'metric'", "field 'value' is 'high'", "not a JSON object"):
        assert why in caplog.text
    assert done_run_ids(tmp_path) == {"a", "d"}


def test_exact_duplicates_count_once(tmp_path, caplog):
    append_records(tmp_path, unit("a"))
    append_records(tmp_path, unit("a"))  # a second run on the same directory wrote it again
    assert len(read_records(tmp_path)) == 2
    assert "duplicated" in caplog.text


def test_a_unit_cut_short_is_left_out_and_not_done(tmp_path, caplog):
    append_records(tmp_path, unit("a"))
    append_records(tmp_path, unit("b")[:1])  # the write of unit b stopped after one line
    assert {r["run_id"] for r in read_records(tmp_path)} == {"a"}
    assert done_run_ids(tmp_path) == {"a"}
    assert "only part of their records" in caplog.text
    append_records(tmp_path, unit("b"))  # the resume writes it whole
    assert len(read_records(tmp_path)) == 4 and done_run_ids(tmp_path) == {"a", "b"}


def test_config_groups_label_what_differs_and_share_what_fits():
    dense = rec("d", mode="dense", criterion="dense", label="dense", sparsity_target=0.0)
    one = unit("a", settings={"train": {"epochs": 2}, "scoring": {"n": 8}}, time=1.0)
    two = unit("b", settings={"train": {"epochs": 2}, "scoring": {"n": 16}}, time=2.0)
    groups = config_groups([dense, *one, *two])
    assert [label for label, _ in groups] == ["scoring.n=16", "scoring.n=8"]  # newest first
    for _, members in groups:
        assert dense in members and len(members) == 3  # the dense record fits both
    assert config_groups(one) == [("", one)]


def test_read_records_names_a_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no records at"):
        read_records(tmp_path / "nothing")
