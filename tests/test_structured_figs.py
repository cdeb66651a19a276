"""paper_figs.structured_lm: the figure comes from the records alone and refuses mixed protocols."""

import json

import pytest

from paper_figs import structured_lm


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _rec(crit, ratio, ppl, calib=8, **kw):
    return {"criterion": crit, "ratio": ratio, "calib_windows": calib, "test_windows": 16,
            "ppl_oneshot": ppl, "block_params_removed": ratio, "params": 1e8 * (1 - ratio),
            "macs_per_token": 1e8, **kw}  # fmt: skip


def test_figure_from_records(tmp_path):
    recs = _write(tmp_path / "r.jsonl", [_rec("dense", 0.0, 11.7), _rec("flap", 0.3, 40.0),
                                         _rec("flap", 0.5, 90.0, ppl_recovered=50.0),
                                         _rec("magnitude", 0.3, 1e5)])  # fmt: skip
    lat = _write(tmp_path / "l.jsonl", [{"criterion": "flap", "ratio": 0.3, "prefill_speedup_t2": 1.3,
                                         "prefill_speedup_t1": 1.25}])  # fmt: skip
    paths = structured_lm.plot(recs, lat, tmp_path / "figs")
    text = structured_lm.table(recs, None)
    assert "| flap | 50% | 50.0% | 90.00 | 50.00 |" in text
    assert {p.suffix for p in paths} == {".png", ".pdf", ".txt"}
    assert all(p.stat().st_size > 0 for p in paths)


def test_mixed_protocols_are_refused(tmp_path):
    recs = _write(
        tmp_path / "r.jsonl", [_rec("dense", 0.0, 11.7), _rec("flap", 0.3, 40.0, calib=32)]
    )
    with pytest.raises(ValueError, match="mix protocols"):
        structured_lm.plot(recs, None, tmp_path / "figs")
