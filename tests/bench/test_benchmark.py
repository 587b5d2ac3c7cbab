"""Smoke test of the benchmark harness at its smallest configuration, plus its pure parts."""

from __future__ import annotations

import json
import time

import pytest
import torch

from jobs.benchmark import main, parse_args
from pali.bench.common import synthetic_batch, time_side_by_side
from pali.bench.hf_reference import strip_hf
from pali.bench.profile import (
    KernelRecorder,
    kernel_floor,
    materialize,
    measured_ceiling,
    speedup_ceiling,
    step_breakdown,
)
from pali.bench.report import check_targets, to_markdown


def test_smallest_configuration_end_to_end(tmp_path):
    """train + decode on the tiny preset, 1 repeat: equal losses, identical tokens, a complete report."""
    assert main(["--suite", "train,decode", "--preset", "tiny", "--repeats", "1", "--min-time", "0",
                 "--compile", "none", "--batch-size", "4", "--max-new-tokens", "8", "--pipeline-batch", "8",
                 "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    env = res["environment"]
    for key in ("cpu", "cores", "torch", "ray", "transformers", "commit", "date"):
        assert env[key], key
    (train,) = res["suites"]["train"]
    assert train["preset"] == "tiny" and train["loss_rel_diff"] <= 1e-4
    assert train["examples_per_s_ours"] > 0 and train["examples_per_s_hf"] > 0
    assert train["speedup"] == pytest.approx(train["step_s_hf"] / train["step_s_ours"])
    assert 0 < train["mfu_as_trainer_reports"] < 1
    pipe = train["pipeline"]  # pipeline-padded batch: losses checked equal, the padding really cut
    assert pipe["batch_size"] == 8 and pipe["padded_lengths"] == [48, 24]
    assert pipe["longest"][0] < 48 and pipe["longest"][1] < 24 and pipe["trim_gain"] > 0
    assert pipe["losses"]["ours"] == pytest.approx(pipe["losses"]["hf"], rel=1e-4)
    modes = {r["mode"]: r for r in res["suites"]["decode"]}
    assert set(modes) == {"greedy", "beam 4"} and all(r["tokens_identical"] for r in modes.values())
    assert modes["greedy"]["new_tokens"] > 0
    names = [t["target"] for t in res["targets"]]
    assert "train step speed-up vs HF (tiny)" in names and "greedy decoding speed-up vs HF generate (tiny)" in names
    assert train["ceiling"] > 1 and modes["greedy"]["ceiling"] > 1  # HF spends some time outside its kernels
    for row in (train, modes["greedy"]):
        floor = row["kernel_floor"]
        assert floor["ours"]["floor_s"] > 0 and floor["hf"]["calls_by_op"]["mm"] > 0
        assert row["ceiling"] == pytest.approx(row.get("step_s_hf", row.get("call_s_hf")) / floor["hf"]["floor_s"])
    assert train["kernel_floor"]["hf"]["calls_by_op"]["_fused_adamw_"] == 1
    md = (tmp_path / "results.md").read_text()
    assert env["commit"] in md and "| tiny | greedy |" in md and "## Targets" in md
    assert "ceiling with the same kernels" in md and "Where a greedy call's CPU time goes" in md
    assert "| tiny | HF |" in md and "beyond the kernels" in md
    assert "| tiny | 8 | 48 / 24 |" in md and "PaLI --no-trim-padding ex/s" in md


def test_speedup_ceiling_bounds_what_the_same_matmuls_allow():
    """All-GEMM work has no headroom (ceiling 1); a loop of tiny element-wise ops has a large one."""
    a = torch.randn(256, 256)
    gemm_only = step_breakdown(lambda: a @ a, steps=3)
    assert speedup_ceiling(gemm_only) == pytest.approx(1.0, rel=0.05)
    mixed = step_breakdown(lambda: [(a[:4, :4] + 1).mul_(2) for _ in range(200)] and a @ a, steps=3)
    assert speedup_ceiling(mixed) > 1.2
    assert speedup_ceiling({"self_cpu_s": 1.0, "gemm_s": 0.5, "optimizer_s": 0.25}) == pytest.approx(4 / 3)


def test_kernel_floor_records_forward_backward_and_optimizer_kernels():
    """One training step of a Linear: its forward addmm, the weight-gradient mm (the input needs no gradient)
    and the fused AdamW, nothing else; under inference_mode a composite linear is decomposed and recorded."""
    lin = torch.nn.Linear(16, 8)
    opt = torch.optim.AdamW(lin.parameters(), fused=True)
    x = torch.randn(4, 16)

    def step():
        lin(x).sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    floor = kernel_floor(step, repeats=2)
    assert floor["calls_by_op"] == {"addmm": 1, "mm": 1, "_fused_adamw_": 1} and floor["floor_s"] > 0

    x3 = torch.randn(2, 3, 16)

    def infer():
        with torch.inference_mode():
            return lin(x3) @ torch.ones(8, 2)
    assert kernel_floor(infer, repeats=1)["calls_by_op"] == {"addmm": 1, "mm": 1}


def test_kernel_floor_replays_with_the_recorded_layout_and_sharing():
    """Replayed inputs keep shapes, strides and offsets, and tensors that shared memory share it again."""
    w = torch.randn(8, 16)
    a, b = torch.randn(4, 16), torch.randn(6, 16)
    rec = KernelRecorder()
    with rec:
        torch.mm(a, w.t())
        torch.mm(b[1:], w.t())
    (f1, args1, _), (f2, args2, _) = materialize(rec.calls)
    assert f1 is f2 is torch.ops.aten.mm.default
    assert args1[1].untyped_storage().data_ptr() == args2[1].untyped_storage().data_ptr()  # the same weight
    assert args1[1].stride() == (1, 16) and args1[1].shape == (16, 8)
    assert args2[0].shape == (5, 16) and args2[0].storage_offset() == 16
    assert args1[0].untyped_storage().data_ptr() != args2[0].untyped_storage().data_ptr()


def test_measured_ceiling_is_large_where_time_goes_outside_the_kernels():
    """A matmul alone sits near its floor; the same matmul after many tiny element-wise ops sits far above it."""
    a = torch.randn(256, 256)

    def mixed():
        for _ in range(300):
            (a[:4, :4] + 1).mul_(2)
        return a @ a
    floor = kernel_floor(mixed, repeats=3)
    assert floor["calls_by_op"] == {"mm": 1}
    wall = min(time_side_by_side({"m": mixed}, 3)["m"])
    assert measured_ceiling(wall, floor) > 1.5
    assert measured_ceiling(1.0, {"floor_s": 0.25}) == pytest.approx(4.0)


def test_targets_are_judged_from_the_numbers():
    suites = {"train": [{"preset": "tiny", "speedup": 1.29}],
              "decode": [{"preset": "tiny", "num_beams": 1, "speedup": 2.5}, {"preset": "tiny", "num_beams": 4,
                                                                                "speedup": 0.5}],
              "data": {"ratio": 3.5, "wait_frac": 0.06},
              "serve": {"ingress": {"proxy": {"throughput_ratio": 2.9, "p99_ratio_on_over_off": 0.4},
                                    "haproxy": {"throughput_ratio": 4.2, "p99_ratio_on_over_off": 1.1}}},
              "parallel": {"memory": {"TP=2": {"param_ratio": 0.53}}}}
    met = {t["target"]: t["met"] for t in check_targets(suites)}
    assert met == {"train step speed-up vs HF (tiny)": False,
                   "greedy decoding speed-up vs HF generate (tiny)": True,
                   "data pipeline / training consumption": True, "data wait fraction of step time": False,
                   "dynamic batching throughput / batch size 1 (proxy)": False,
                   "dynamic batching p99 / batch size 1 p99 (proxy)": True,
                   "dynamic batching throughput / batch size 1 (haproxy)": True,
                   "dynamic batching p99 / batch size 1 p99 (haproxy)": False,
                   "TP=2 per-rank parameter memory / TP=1": False}


def test_compiled_train_rows_are_judged_and_rendered():
    """The train suite's torch.compile figures: two more targets (vs HF eager, vs HF compiled) and a table."""
    compiled = {"step_s_ours": 0.04, "step_s_hf": 0.05, "examples_per_s_ours": 200.0, "examples_per_s_hf": 160.0,
                "compile_s_ours": 81.6, "compile_s_hf": 52.0, "speedup_vs_hf_eager": 1.5,
                "speedup_vs_hf_compiled": 1.25, "speedup_over_own_eager": 1.3}
    row = {"preset": "tiny", "speedup": 1.2, "params": 1.5e6, "batch_size": 8, "tokens_per_step": 264,
           "loss_ours": 8.0, "loss_hf": 8.0, "examples_per_s_ours": 150.0, "examples_per_s_hf": 125.0,
           "tokens_per_s_ours": 1.0, "tokens_per_s_hf": 1.0, "mfu_as_trainer_reports": 0.1,
           "mfu_of_used_threads": 0.2, "compiled": compiled}
    met = {t["target"]: t["met"] for t in check_targets({"train": [row]})}
    assert met == {"train step speed-up vs HF (tiny)": False,
                   "train step speed-up vs HF (tiny, PaLI --compile vs HF eager)": True,
                   "train step speed-up vs HF (tiny, both compiled)": False}
    md = to_markdown({"command": "c", "repeats": 1, "wall_s": 1.0, "targets": check_targets({"train": [row]}),
                      "environment": {"date": "d", "commit": "abc", "cpu": "cpu", "cores": 2, "gpu": None,
                                      "load_avg_at_start": [1, 1, 1], "python": "3", "torch": "t", "ray": "r",
                                      "transformers": "h", "torch_threads": 1},
                      "suites": {"train": [row]}})
    assert "| tiny | 200.0 | 160.0 | 82 / 52 | 1.50x | 1.25x | 1.30x |" in md
    assert "| train step speed-up vs HF (tiny, both compiled) | 1.25x | >= 1.30x | NO |" in md


def test_report_renders_every_suite_section():
    mem = {"param_bytes": 2 ** 20, "optimizer_bytes": 2 ** 21, "param_ratio": 1.0, "total_ratio": 1.0}
    result = {"command": "python -m jobs.benchmark --out x", "repeats": 3, "wall_s": 1.0, "targets": [],
              "environment": {"date": "d", "commit": "abc", "cpu": "cpu", "cores": 2, "gpu": None,
                              "load_avg_at_start": [1, 1, 1], "python": "3", "torch": "t", "ray": "r",
                              "transformers": "h", "torch_threads": 1},
              "suites": {"parallel": {"preset": "tiny", "backend": "gloo", "memory": {"TP=1": mem},
                                      "dp_scaling": {"DP=1": {"step_s": 0.5, "examples_per_s": 16.0}},
                                      "dp_speedup": 1.5, "dp_efficiency": 0.75},
                         "gpu": {"note": "skipped: no CUDA GPU"},
                         "serve": {"max_batch_size": 16, "concurrency": 32, "duration_s": 10, "rounds": 2,
                                   "max_new_tokens": 8, "ingress": {"haproxy": {
                                       "throughput_ratio": 4.25, "p99_ratio_on_over_off": 0.5,
                                       "batching_on": {"requests_per_s": 180.0, "p50_ms": 170, "p99_ms": 240,
                                                       "errors": 0, "cpu_ms_per_request": {"proxy": 0.1,
                                                                                           "replica": 4.9}},
                                       "batching_off": {"requests_per_s": 42.4, "p50_ms": 700, "p99_ms": 480,
                                                        "errors": 0}}}}}}
    md = to_markdown(result)
    assert "| TP=1 | 1.00 | 2.00 |" in md and "1.50x" in md and "skipped: no CUDA GPU" in md
    assert "| HAProxy + direct ingress | batching_on | 180.0 | 170 | 240 | 0 | 0.1 | 4.9 |" in md
    assert "throughput ratio **4.25x**" in md


def test_bad_options_name_the_value(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--suite", "train,warp", "--out", "x"])
    assert "warp" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--repeats", "0", "--out", "x"])
    assert "--repeats=0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--compile", "tiny,huge", "--out", "x"])
    assert "huge" in capsys.readouterr().err
    assert parse_args(["--out", "x"]).compile == ("tiny",)
    assert parse_args(["--compile", "none", "--out", "x"]).compile == ()
    assert parse_args(["--out", "x"]).pipeline_batch == 32
    with pytest.raises(SystemExit):
        parse_args(["--pipeline-batch", "-1", "--out", "x"])


def test_side_by_side_timing_and_helpers():
    calls = []
    times = time_side_by_side({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=2,
                              warmup=1)
    assert calls == ["a", "b", "a", "b", "b", "a"] and all(len(v) == 2 for v in times.values())
    # calibration: 1 repeat asked, but rounds of ~20 ms get enough of them to fill 0.1 s (capped)
    naps = {"a": lambda: time.sleep(0.01), "b": lambda: time.sleep(0.01)}
    assert 3 <= len(time_side_by_side(naps, repeats=1, min_time_s=0.1)["a"]) <= 6
    assert len(time_side_by_side(naps, repeats=1, min_time_s=10.0, max_repeats=7)["b"]) == 7
    assert len(time_side_by_side(naps, repeats=2, min_time_s=0.0)["a"]) == 2
    from pali.config import get_preset

    batch = synthetic_batch(get_preset("tiny"), 4, 8, 6)
    assert batch["attention_mask"][1, 4:].sum() == 0 and (batch["labels"][1, 3:] == 0).all()
    seqs = torch.tensor([[0, 5, 1, 7, 7], [0, 4, 4, 4, 4]])
    assert strip_hf(seqs).tolist() == [[5, 1, 0, 0], [4, 4, 4, 4]]


def test_gpu_suite_runs_its_checks_on_cpu(tmp_path):
    """`python -m pali.bench.gpu --device cpu --quick` runs every section of the GPU suite on gloo: the
    engine equals the float32 reference, DDP / FSDP2 equal the unwrapped engine, the tiny fixed-batch run
    learns and its checkpoint reads back exactly, and the MFU / decode rows are filled in."""
    from pali.bench import gpu

    assert gpu.main(["--device", "cpu", "--quick", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "gpu.json").read_text())
    assert res["backend"] == "gloo"
    assert res["parity"]["fp32_ok"] and res["parity"]["wrapped_ok"]
    assert res["train"]["loss_fell"] and res["train"]["checkpoint_roundtrip_exact"]
    rows = res["mfu"]["rows"]
    assert len(rows) == 2 and all(0 < r["mfu"] < 1 and r["examples_per_s"] > 0 for r in rows)
    plain, ckpt = rows  # checkpointing recomputes the blocks' forwards: HFU above MFU, MFU alone unchanged
    assert plain["hfu"] == pytest.approx(plain["mfu"]) and ckpt["hfu"] > ckpt["mfu"]
    assert ckpt["flops_per_example"] == plain["flops_per_example"]
    att = res["attention"]  # FlexAttention against the dense path, side by side, same loss
    assert att["loss_rel_diff"] < 1e-5 and att["speedup"] > 0 and set(att["step_s"]) == {"sdpa", "flex"}
    assert "compile" not in res and "ray" not in res
    graph = res["decode_graph"]  # static-shape decoding: the decode rows, tokens equal to today's decoding
    assert graph["tokens_equal"] and [r["batch_size"] for r in graph["rows"]] == [1, 4]
    assert all(r["ms_per_step"] > 0 for r in graph["rows"])
    ratio = res["static_decode"]  # static vs today's decoding side by side: same tokens, a ratio
    assert ratio["tokens_equal"] and ratio["speedup"] > 0 and set(ratio["call_s"]) == {"today", "static"}
    assert [t["measured"] for t in res["targets"]] == [None] * 5  # GPU targets: a CPU run measures none
    assert res["decode"]["cache_agreement"] == 1.0 and len(res["decode"]["rows"]) == 2
    prof = res["profile"]  # where a step's time goes, by kernel kind (CPU: self time of aten ops)
    assert prof["by_kind_s"]["gemm"] > 0 and 0 < sum(prof["by_kind_s"].values()) <= prof["wall_s"] * 1.5
    md = (tmp_path / "gpu.md").read_text()
    assert "| tiny |" in md and "| PaLI-3B MFU at the planner's batch | unmeasured |" in md
    assert "FlexAttention vs dense-bias SDPA" in md and res["environment"]["commit"] in md
    assert "decode, static shapes (tiny" in md and "static-shape decoding (eager) vs today's" in md


def test_committed_gpu_record_renders():
    """Rendering only: the committed H200 record (benchmarks/results/gpu/gpu.json, from before the one-command
    run) still renders through the suite's report, and its GPU targets read as unmeasured by today's rows."""
    from pathlib import Path

    from pali.bench.gpu import check_targets
    from pali.bench.gpu import to_markdown as gpu_markdown

    rec = json.loads((Path(__file__).parents[2] / "benchmarks/results/gpu/gpu.json").read_text())
    md = gpu_markdown(rec)
    assert "| pali-3b | 3.07B | 1.23B | 64 |" in md and "**Through Ray**" in md and "replica device cuda" in md
    assert len(check_targets(rec)) == 5
