"""The benchmark harness runs and writes what it promises; the README's results are generated."""
import csv
import json

import pytest

from bench import bench, convergence, report


def test_harness_writes_table_json_csv_and_plots(tmp_path):
    pytest.importorskip("matplotlib")
    results = bench.main(["--device", "cpu", "--sections", "sweep", "small", "--sizes", "10", "11",
                          "--budget", "0.01", "--out", str(tmp_path)])
    rows = results["rows"]
    assert {r["case"] for r in rows} == {"2^10", "2^11", "1000 x 1-4K", "24 groups, 1000 x 1-4K"}
    providers = {r["provider"] for r in rows}
    assert {"torch for-loop", "torch foreach", "torch fused", "device copy",
            "fused_adam[torch]"} <= providers
    for r in rows:
        assert r["reps"] >= 11 and r["median_ms"] > 0
        assert r["bytes_per_param"] == (8 if r["provider"] == "device copy" else 28)
        if r["provider"] == "torch fused":
            assert r["vs_fused"] == 1.0
    small = [r for r in rows if r["section"] == "small"]
    assert small and all(r["tensors"] == 1000 and r["host_time"] for r in small)
    saved = json.loads((tmp_path / "bench-cpu.json").read_text())
    assert saved["commit"] is not None and saved["device"] and saved["torch"] and saved["date"]
    with (tmp_path / "bench-cpu.csv").open() as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    for name in ("sweep", "models"):
        png = tmp_path / f"bench-cpu-{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_llama_and_vit_shapes_have_the_real_tensor_counts():
    assert len(bench.llama_1b()) == 146 and len(bench.llama_1b(4)) == 146
    assert abs(sum(bench.math.prod(s) for s in bench.llama_1b()) - 1.236e9) < 0.01e9
    assert len(bench.vit_b16()) == 152
    assert abs(sum(bench.math.prod(s) for s in bench.vit_b16()) - 86.6e6) < 0.1e6
    assert abs(sum(bench.math.prod(s) for s in bench.gpt2_124m()) - 124.4e6) < 0.1e6


def test_readme_results_are_generated_from_the_results_files():
    text = (report.ROOT / "README.md").read_text()
    section = text[text.index(report.BEGIN):text.index(report.END) + len(report.END)]
    assert section == report.render(), "README results differ: run `python bench/report.py`"


def test_convergence_demo_fp32_follows_torch():
    names = ("torch AdamW fp32", "fused_adam fp32", "fused_adam fp32, torch backend")
    results = convergence.run(20, names)
    ref = results["torch AdamW fp32"][0]
    assert ref[-1] < ref[0] - 0.5  # it learns
    assert results["fused_adam fp32, torch backend"][0] == ref
    assert max(abs(a - b) for a, b in zip(results["fused_adam fp32"][0], ref)) < 1e-4


def test_fresh_grads_case_steps_from_grads_made_anew():
    import torch
    device = torch.device("cpu")
    table = {k: v for k, v in bench.providers(device, torch.float32, ["torch", "fused"]).items()
             if k != bench.COPY}
    rows = bench.measure("models", "tiny, zero_grad()", [(100,), (7, 3)], device, table, 0.01,
                         fresh=True)
    assert {r["provider"] for r in rows} == set(table) and all(r["median_ms"] > 0 for r in rows)
    param = torch.nn.Parameter(torch.ones(5))
    param.grad = torch.full((5,), 2.0)
    loop = bench.FreshGrads(torch.optim.AdamW([param]))
    before = param.grad
    loop.refresh()
    assert param.grad is not before and torch.equal(param.grad, before)
