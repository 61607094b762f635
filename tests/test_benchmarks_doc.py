"""BENCHMARKS.md and benchmarks/results/ agree: every generated table is what the JSON gives, every
result file is used by a table, and result file names describe what they hold."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_summarize():
    spec = importlib.util.spec_from_file_location("benchmarks_summarize", ROOT / "benchmarks" / "summarize.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


summarize = _load_summarize()


def _case(**extra_baselines: float) -> dict:
    """One ``bench kernels`` case; ``extra_baselines`` adds copy baselines (name -> ms) as older runs had."""
    impls = {"torch": 20.0, "dropkit_seed": 1.2, "dropkit_bits": 1.3}
    case = {"dtype": "float32", "numel": 2**20, "p": 0.5,
            "ms": {"copy": 1.0, **extra_baselines, **{f"{k}_fwd": v for k, v in impls.items()},
                   **{f"{k}_fwd_bwd": 2 * v for k, v in impls.items()}},
            "fwd_over_copy": impls, "fwd_bwd_over_copy": {k: 2 * v for k, v in impls.items()},
            "speedup_vs_torch": {"fwd": {"dropkit_seed": 16.7, "dropkit_bits": 15.4},
                                 "fwd_bwd": {"dropkit_seed": 16.7, "dropkit_bits": 15.4}},
            "saved_bytes_per_element": {"torch": 4.0, "dropkit_seed": 0.0, "dropkit_bits": 0.125}}
    for name, ms in extra_baselines.items():
        case[f"fwd_over_{name}"] = {k: v / ms for k, v in impls.items()}
        case[f"fwd_bwd_over_{name}"] = {k: 2 * v / ms for k, v in impls.items()}
    return case


def test_document_matches_the_results():
    text = (ROOT / "BENCHMARKS.md").read_text(encoding="utf-8")
    assert summarize.stale_tables(text) == []
    assert summarize.render(text) == text


def test_every_table_in_the_document_and_every_result_file_in_a_table():
    text = (ROOT / "BENCHMARKS.md").read_text(encoding="utf-8")
    named = set(re.findall(r"<!-- generated: ([a-z0-9_]+) -->", text))
    assert named == set(summarize.TABLES)
    sources = [line for line in summarize.render(text).splitlines() if line.startswith("Source: ")]
    used = {name for line in sources for name in re.findall(r"`benchmarks/results/([^`]+)`", line)}
    on_disk = {p.name for p in summarize.RESULTS.glob("*") if p.is_file()}
    assert used == on_disk


def test_result_files_parse_and_have_descriptive_names():
    for path in summarize.RESULTS.glob("*.json"):
        json.loads(path.read_text(encoding="utf-8"))
        assert re.fullmatch(r"[a-z0-9]+(_[a-z0-9]+)*\.json", path.name), path.name


def test_a_changed_figure_is_reported_as_stale():
    text = (ROOT / "BENCHMARKS.md").read_text(encoding="utf-8")
    start = text.index("<!-- generated: step_mlp_cpu -->")
    row = re.compile(r"\| no dropout \| ([0-9.]+) \|")
    changed = text[:start] + row.sub("| no dropout | 1.00 |", text[start:], count=1)
    assert changed != text
    assert summarize.stale_tables(changed) == ["step_mlp_cpu"]
    assert summarize.render(changed) == text


def test_unknown_table_name_raises_naming_it():
    with pytest.raises(KeyError, match="no_such_table"):
        summarize.render("<!-- generated: no_such_table -->\n<!-- end generated -->")


def test_kernels_table_reads_runs_with_and_without_the_extra_copy_baselines():
    plain = summarize.kernels_table({"cases": [_case()]})
    assert "reused block" not in plain and "huge-page" not in plain
    assert "| float32 | 2^20 | 0.5 | 1 | 20 / 1.2 / 1.3 | 1.20 / 1.30 | 2.40 / 2.60 |" in plain
    older = summarize.kernels_table({"cases": [_case(copy_cached=0.5, copy_huge=0.8)]})
    assert "fwd, fwd+bwd over a copy into a reused block: seed / bits" in older
    assert "2.40 / 2.60, 4.80 / 5.20" in older  # over the 0.5 ms copy into a reused block
    assert len(older.splitlines()[0].split("|")) == len(plain.splitlines()[0].split("|")) + 2
    # a baseline that only some cases have gets no column
    mixed = summarize.kernels_table({"cases": [_case(copy_cached=0.5), _case()]})
    assert "reused block" not in mixed


def test_stamp_records_the_date_and_keeps_the_data(tmp_path):
    path = tmp_path / "kernels_cpu.json"
    path.write_text(json.dumps({"benchmark": "kernels", "cases": []}), encoding="utf-8")
    summarize.stamp(path, "2030-01-02")
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data == {"recorded": {"date": "2030-01-02"}, "benchmark": "kernels", "cases": []}
    assert "2030-01-02" in summarize.provenance(["kernels_cpu.json"], [data])


def test_a_broken_result_file_is_named(tmp_path, monkeypatch):
    (tmp_path / "broken.json").write_text("{", encoding="utf-8")
    monkeypatch.setattr(summarize, "RESULTS", tmp_path)
    with pytest.raises(ValueError, match="broken.json"):
        summarize.load("broken.json")
