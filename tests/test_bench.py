"""bench.py's table functions at tiny sizes: every section produces well-formed rows. No timing is
asserted (the numbers live in bench.py's output and the README's efficiency section)."""

import math
import subprocess

import pytest
import torch

import bench
from conftest import REPO

CPU = torch.device("cpu")
TINY_CASES = [bench.LayerCase(n_expert=4, tokens=32, n_embd=16), bench.LayerCase(n_expert=8, tokens=64, n_embd=32)]
TINY_PRESET = {
    "tiny": [bench.QUICK_START, "n_layer=1", "n_embd=32", "n_head=2", "block_size=16", "batch_size=2", "n_expert=4"]
}


def positive(v):
    return isinstance(v, float) and math.isfinite(v) and v > 0


def test_time_interleaved_medians_every_variant():
    calls = []
    t = bench.time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3, warmup=1)
    assert set(t) == {"a", "b"} and all(v >= 0 for v in t.values())
    assert calls.count("a") == calls.count("b") == 4
    assert calls[:2] == ["a", "b"] and calls[2:4] == ["b", "a"]  # the order rotates every round


def test_layer_and_routing_rows():
    names = ["dense", "moe", "loop", "naive", "routing", "router"]
    measured = bench.measure_layers(TINY_CASES, names, repeats=1, device=CPU, log=lambda *a: None)
    rows = bench.layer_rows(measured)
    assert [(r["E"], r["T"], r["D"]) for r in rows] == [(4, 32, 16), (8, 64, 32)]
    for r in rows:
        for key in ("dense tok/s", "MoE tok/s", "MoE / dense", "loop / dense", "naive tok/s", "MoE / naive"):
            assert positive(r[key]), (key, r)
    for r in bench.routing_rows(measured):
        assert positive(r["layer ms"]) and positive(r["routing ms"]) and positive(r["of which router ms"])
        assert r["routing %"] > 0 and r["router %"] > 0
    table = bench.markdown_table(rows)
    assert table.count("\n") == len(rows) + 1 and table.startswith("| E | T | D | F |")


def test_naive_reference_equals_the_layer():
    fns, parts = bench.layer_variants(TINY_CASES[0], ["moe"], CPU)
    x = torch.randn(32, 16)
    y_naive, _ = bench.naive_moe(parts["moe"], x)
    y, _ = parts["moe"](x.view(1, 32, 16))
    torch.testing.assert_close(y_naive, y.view(32, 16), rtol=1e-5, atol=1e-6)


def test_memory_rows():
    rows = bench.memory_rows(TINY_CASES[:1], CPU)
    r = rows[0]
    for key in ("MoE peak MiB", "dense peak MiB", "MoE saved MiB", "dense saved MiB", "MoE weight grads MiB"):
        assert positive(r[key]), (key, r)
    # 4 experts of hidden F vs one FFN of hidden 2F: twice the weights, so twice the weight gradients
    assert r["MoE weight grads MiB"] == pytest.approx(2 * r["dense weight grads MiB"], rel=0.01)


def test_train_rows_with_a_baseline_module():
    baseline = bench.load_model_module_at("HEAD") if git_has_model_py() else None
    rows = bench.train_rows(TINY_PRESET, repeats=1, device=CPU, baseline=baseline, log=lambda *a: None)
    assert [r["code"] for r in rows] == ["current", "current, loop experts"] + (["baseline"] if baseline else [])
    for r in rows:
        assert r["tokens/step"] == 2 * 16
        assert positive(r["tok/s"]) and positive(r["MFU vs matmul %"]) and positive(r["matmul GFLOP/s"])
        assert "MFU %" not in r  # against a datasheet peak: GPUs only (a CPU has none we could trust)
    import model  # the baseline was imported beside, not over, this checkout's modules

    assert hasattr(model, "grouped_mm_dtype")


def git_has_model_py():
    try:
        return subprocess.run(["git", "show", "HEAD:model.py"], cwd=REPO, capture_output=True).returncode == 0
    except OSError:
        return False


def test_peer_comparison_agrees_and_times_every_implementation():
    # transformers' Mixtral block with our weights computes our function (checked inside, 1e-4), then
    # the five variants are timed round-robin
    case = bench.LayerCase(n_expert=4, tokens=64, n_embd=32)
    rows = bench.peer_rows([case], repeats=1, device=CPU, log=lambda *a: None)
    r = rows[0]
    for key in (
        "ours / dense",
        "ours / transformers eager",
        "ours / transformers grouped_mm",
        "ours / faster transformers",
        "transformers eager ms",
        "transformers grouped_mm ms",
        "expert matmuls ms",
        "matmuls / ours",
    ):
        assert positive(r[key]), (key, r)
    assert r["ours / faster transformers"] == pytest.approx(
        min(r["transformers eager ms"], r["transformers grouped_mm ms"]) / r["ours ms"]
    )


def test_peer_check_catches_a_different_function():
    fns = bench.peer_variants(bench.LayerCase(n_expert=4, tokens=64, n_embd=32), CPU)
    assert set(fns) == {
        "dense",
        "ours",
        "ours, loop",
        "transformers eager",
        "transformers grouped_mm",
        "expert matmuls",
    }
    torch.manual_seed(0)
    moe = bench.MoE(bench.ModelConfig(n_embd=32, n_head=1, n_expert=4, capacity_factor=0, gate_norm=False))
    torch.nn.init.normal_(moe.router.weight)
    for w in moe.experts.parameters():
        torch.nn.init.normal_(w, std=0.1)
    blocks = bench.peer_blocks(moe)
    with torch.no_grad():
        blocks["eager"].experts.down_proj.mul_(2)  # a wrong weight must show
        x = torch.randn(1, 8, 32)
        y_ours = moe(x)[0]
        assert not torch.allclose(blocks["eager"](x), y_ours)
        torch.testing.assert_close(blocks["grouped_mm"](x), y_ours, rtol=1e-4, atol=1e-6)


def test_gpu_check_dry_run_on_cpu():
    # the GPU check's CPU path: every line runs at toy sizes (torch.compile left out here: minutes on CPU)
    precision, training = bench.gpu_check(CPU, steps=1, compile_modes=(False,), log=lambda *a: None)
    assert precision[0]["ok"] and precision[0]["max rel. error"] < bench.GPU_CHECK_TOL
    (row,) = training
    assert row["check"] == "train_step, compile off" and positive(row["tok/s"]) and positive(row["MFU vs matmul %"])
    assert row["active"] < row["params"]  # a MoE model: top-2 of 16 experts active


def test_datasheet_peak_by_device_name():
    assert bench.datasheet_peak_flops(CPU) is None
    assert bench.datasheet_peak_flops(None, "NVIDIA H100 80GB HBM3") == 989.4e12
    assert bench.datasheet_peak_flops(None, "NVIDIA H100 PCIe") == 756e12
    assert bench.datasheet_peak_flops(None, "NVIDIA H200") == 989.4e12
    assert bench.datasheet_peak_flops(None, "NVIDIA GH200 480GB") == 989.4e12
    assert bench.datasheet_peak_flops(None, "NVIDIA A100-SXM4-80GB") == 312e12
    assert bench.datasheet_peak_flops(None, "NVIDIA L40S") == 362.1e12
    assert bench.datasheet_peak_flops(None, "Some Future GPU") is None


def test_ep_bench_uses_the_project_sharding_and_reports_phases():
    cfg = bench.EPBenchConfig(tokens=64, n_embd=32, expert_hidden=48, n_expert=4, iters=1, warmup=0)
    res = bench.bench_ep(cfg)
    low, high = res["phases_min_s"], res["phases_max_s"]
    assert set(low) == set(high) == set(bench.EP_PHASES)
    assert low["token exchange, forward"] > 0 and low["token exchange, backward"] > 0
    assert all(low[k] <= high[k] for k in low)
    assert positive(res["ep_s"]) and positive(res["exchange_s"])
    assert sum(res["rows_for_local_experts_ep"]) == sum(res["kept_slots_per_rank"])  # every kept slot arrives once
