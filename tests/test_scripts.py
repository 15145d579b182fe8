"""The evaluation script runs end to end on a labelled folder (its metric code is tested in test_metrics)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

from conftest import REPO, sample_photos


def test_eval_retrieval_on_labels_layout(tmp_path, tiny_model):
    ds = tmp_path / "ds"
    (ds / "images").mkdir(parents=True)
    lines = ["filename,label"]
    for p in sample_photos(3)[:18]:
        shutil.copy(p, ds / "images" / p.name)
        lines.append(f"{p.name},{p.name.split('__')[0]}")
    (ds / "labels.csv").write_text("\n".join(lines) + "\n")
    p = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "eval_retrieval.py"), str(ds), "--model", str(tiny_model), "--index", str(tmp_path / "idx")],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600,
    )
    assert p.returncode == 0, p.stderr
    assert "18 queries over 18 photos" in p.stdout.replace("global search, ", "")
    m = re.search(r"mAP ([\d.]+)\s+recall@1 ([\d.]+)", p.stdout)
    assert m and 0 < float(m[1]) <= 1
    assert re.search(r"Flat\s+1\.000", p.stdout)


def script(*args: str) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, str(REPO / "scripts" / args[0]), *args[1:]], capture_output=True, text=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    assert p.returncode == 0, p.stderr
    return p


def test_bench_filters_names_the_engines_plan_and_is_exact_where_it_scans(tmp_path):
    out = script("bench_filters.py", "--size", "10000", "--queries", "5", "--kind", "IVF16,Flat", "--nprobe", "1",
                 "--seal-kind", "HNSW32", "--work", str(tmp_path)).stdout
    def table(out):
        return {(m[1], m[2]): (m[3], float(m[4])) for m in re.finditer(
            r"^(fresh|sealed|found)\s+([\d.]+%)\s+\d+\s+(\w+)\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+([\d.]+)$", out, re.M)}

    rows = table(out)
    assert {p for _, p in rows} == {"100.0%", "50.0%", "5.0%", "1.0%", "0.1%"} and len(rows) == 10, out
    assert rows["fresh", "50.0%"][0] == "ivf" and rows["fresh", "0.1%"] == ("scan", 1.0)  # 10 photos pass: scored exactly
    assert rows["sealed", "100.0%"][0] == "hnsw"  # the unfiltered baseline
    assert "sealed: 1 global segment(s) of HNSWFlat" in out and "huge pages: " in out  # compaction's kind, after refresh
    assert all(r[1] == 1.0 for r in rows.values() if r[0] == "scan"), out  # a scan is exact
    for how in ((), ("--mapped",)):  # the index left in --work, measured again as found (resident, then mapped)
        again = table(script("bench_filters.py", "--size", "10000", "--queries", "5", "--nprobe", "1", "--work",
                             str(tmp_path), "--reuse", *how).stdout)
        assert {p: r[0] for (_, p), r in again.items()} == {p: r[0] for (s, p), r in rows.items() if s == "sealed"}
        assert all(r[1] == 1.0 for r in again.values() if r[0] == "scan")


def test_bench_write_prints_commit_cost_per_size(tmp_path):
    out = script("bench_write.py", "--sizes", "20,60", "--dim", "16", "--grid", "2", "--batch", "2", "--repeat", "1",
                 "--fill-commit", "20", "--work", str(tmp_path)).stdout
    rows = [line.split() for line in out.splitlines() if line.startswith("this")]
    assert [int(r[1]) for r in rows] == [20, 60] and float(rows[0][3]) == 1.0 and all(float(r[4]) > 0 for r in rows)


def test_bench_pauses_runs_the_cli_and_reports_its_longest_pause(tmp_path):
    out = script("bench_pauses.py", "--n", "40", "--arch", "tiny", "--commit-every", "16", "--out", str(tmp_path)).stdout
    assert re.search(r"^indexed 40 photos in \d+ s .*, 3 segments, commits every 16 photos$", out, re.M), out
    m = re.search(r"longest pause between two photos: ([\d.]+) s \((commit|embedding|decoding|other)\)", out)
    assert m and float(m[1]) >= 0, out
