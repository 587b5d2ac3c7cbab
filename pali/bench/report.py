"""Targets, `results.json` and the markdown table `results.md` of a benchmark run."""

from __future__ import annotations

import json
from pathlib import Path

TARGETS = {
    "train": "train step >= 1.3x the HF-assembled model",
    "decode": "KV-cache greedy decoding >= 2x HF generate",
    "data": "data pipeline >= 3x the trainer's consumption, data wait < 5 % of step time",
    "serve": "dynamic batching >= 4x the throughput of batch size 1 at no worse p99",
    "parallel": "TP=2 halves per-rank parameter memory within 5 %",
}


def check_targets(suites: dict) -> list[dict]:
    """One row per target measured in this run: what, measured value, goal, met."""
    rows = []
    for r in suites.get("train", []):
        rows.append({"target": f"train step speed-up vs HF ({r['preset']})", "measured": f"{r['speedup']:.2f}x",
                     "goal": ">= 1.30x", "met": r["speedup"] >= 1.3, "ceiling": r.get("ceiling")})
        c = r.get("compiled")
        if c:
            for key, what in (("speedup_vs_hf_eager", "PaLI --compile vs HF eager"),
                              ("speedup_vs_hf_compiled", "both compiled")):
                rows.append({"target": f"train step speed-up vs HF ({r['preset']}, {what})",
                             "measured": f"{c[key]:.2f}x", "goal": ">= 1.30x", "met": c[key] >= 1.3})
    for r in suites.get("decode", []):
        if r["num_beams"] == 1:
            rows.append({"target": f"greedy decoding speed-up vs HF generate ({r['preset']})",
                         "measured": f"{r['speedup']:.2f}x", "goal": ">= 2.00x", "met": r["speedup"] >= 2.0,
                         "ceiling": r.get("ceiling")})
    if "data" in suites:
        d = suites["data"]
        rows.append({"target": "data pipeline / training consumption", "measured": f"{d['ratio']:.1f}x",
                     "goal": ">= 3.0x", "met": d["ratio"] is not None and d["ratio"] >= 3.0})
        rows.append({"target": "data wait fraction of step time", "measured": f"{100 * d['wait_frac']:.1f} %",
                     "goal": "< 5 %", "met": d["wait_frac"] < 0.05})
    if "serve" in suites:
        for ingress, s in suites["serve"]["ingress"].items():
            rows.append({"target": f"dynamic batching throughput / batch size 1 ({ingress})",
                         "measured": f"{s['throughput_ratio']:.2f}x", "goal": ">= 4.00x",
                         "met": s["throughput_ratio"] >= 4.0})
            rows.append({"target": f"dynamic batching p99 / batch size 1 p99 ({ingress})",
                         "measured": f"{s['p99_ratio_on_over_off']:.2f}", "goal": "<= 1.00",
                         "met": s["p99_ratio_on_over_off"] <= 1.0})
    if "parallel" in suites:
        r = suites["parallel"]["memory"]["TP=2"]["param_ratio"]
        rows.append({"target": "TP=2 per-rank parameter memory / TP=1", "measured": f"{r:.3f}",
                     "goal": "0.500 +- 5 % (0.475-0.525)", "met": abs(r / 0.5 - 1) <= 0.05})
    return rows


def _ceiling(c: float | None) -> str:
    return "-" if c is None else f"{c:.2f}x"


def _profile_table(rows: list[dict], what: str, unit: str, optimizer: bool, wall_key: str) -> list[str]:
    """Markdown lines of the `step_breakdown` profiles and `kernel_floor`s of both sides of every row that has
    them."""
    prof = [r for r in rows if r.get("profile")]
    if not prof:
        return []
    adamw = (" in AdamW |", "---|") if optimizer else ("", "")
    lines = [f"Where {what}'s CPU time goes: torch.profiler (one {unit} per side) and the kernel floor "
             f"(the {unit}'s own matrix-product, attention, convolution{' and fused AdamW' if optimizer else ''} "
             "kernel calls replayed alone, `pali.bench.profile.kernel_floor`); beyond = wall time - floor, "
             "the part an implementation controls:", "",
             f"| preset | side | wall s/{unit} | kernel floor s | beyond the kernels s | kernel calls | "
             f"self-CPU s/{unit} (profiled) | in GEMM kernels |{adamw[0]} aten calls/{unit} |",
             f"|---|---|---|---|---|---|---|---|{adamw[1]}---|"]
    for r in prof:
        for side in ("ours", "hf"):
            b = r["profile"][side]
            f = (r.get("kernel_floor") or {}).get(side)
            wall = r[f"{wall_key}_{side}"]
            floor = (f"{f['floor_s']:.4f} | {wall - f['floor_s']:.4f} | {f['kernel_calls']}" if f
                     else "- | - | -")
            opt = f" {100 * b['optimizer_frac']:.0f} % |" if optimizer else ""
            lines.append(f"| {r['preset']} | {'PaLI' if side == 'ours' else 'HF'} | {wall:.4f} | {floor} | "
                         f"{b['self_cpu_s']:.3f} | {100 * b['gemm_frac']:.0f} % |{opt} "
                         f"{b['aten_calls_per_step']:.0f} |")
    return lines + [""]


def _mib(b: float) -> str:
    return f"{b / 2 ** 20:.2f}"


def _environment_lines(env: dict, result: dict) -> list[str]:
    """The title and the bullet list of date, commit, hardware, software, command and wall time."""
    return ["# PaLI benchmark results", "",
            f"- date: {env['date']}; commit `{env['commit']}`",
            f"- hardware: {env['cpu']}, {env['cores']} cores; GPU: {env['gpu'] or 'none'}; "
            f"load average at start {env['load_avg_at_start']}",
            f"- software: python {env['python']}, torch {env['torch']}, ray {env['ray']}, "
            f"transformers {env['transformers']}; torch threads {env['torch_threads']} (both sides)",
            f"- command: `{result['command']}`; every figure is a median over {result['repeats']} repeats"
            + (f" (train and decode: more rounds until a comparison times {result['min_time_s']:g} s)"
               if result.get("min_time_s") else "")
            + "; ratios are measured side by side in the same run (alternating order)",
            f"- wall time of the run: {result['wall_s']:.0f} s", ""]


def _errors_section(errors: dict) -> list[str]:
    """The list of suites that failed, with their errors."""
    return ["## Suites that failed", ""] + [f"- {k}: `{v}`" for k, v in errors.items()] + [""]


def _targets_section(targets: list[dict]) -> list[str]:
    """The targets table (`check_targets` rows) and what its ceiling column means."""
    lines = ["## Targets", "", "| target | measured | goal | met | ceiling with the same kernels |",
             "|---|---|---|---|---|"]
    lines += [f"| {t['target']} | {t['measured']} | {t['goal']} | {'yes' if t['met'] else 'NO'} | "
              f"{_ceiling(t.get('ceiling'))} |" for t in targets]
    lines += ["", "Ceiling: HF's wall time divided by its kernel floor, the time its own matrix-product, "
              "fused-attention, convolution (and fused AdamW) kernel calls take when replayed alone with the "
              "same shapes, strides and memory sharing (`pali.bench.profile.kernel_floor`): the speed-up an "
              "implementation with zero overhead besides those identical kernels would reach.", ""]
    return lines


def _train_table(rows: list[dict]) -> list[str]:
    """The eager train-step table, PaLI vs HF, one row per preset."""
    lines = ["## Train step (forward + backward + AdamW), PaLI vs HF-assembled (MT5 + SigLIP + linear)", "",
             "| preset | params | batch | tokens/step | loss ours / HF | PaLI ex/s | HF ex/s | PaLI tok/s | "
             "HF tok/s | speed-up | MFU (as trainer) | MFU (used threads) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['preset']} | {r['params'] / 1e6:.1f}M | {r['batch_size']} | {r['tokens_per_step']} | "
                     f"{r['loss_ours']:.5f} / {r['loss_hf']:.5f} | {r['examples_per_s_ours']:.1f} | "
                     f"{r['examples_per_s_hf']:.1f} | {r['tokens_per_s_ours']:.0f} | {r['tokens_per_s_hf']:.0f} | "
                     f"{r['speedup']:.2f}x | {100 * r['mfu_as_trainer_reports']:.2f} % | "
                     f"{100 * r['mfu_of_used_threads']:.2f} % |")
    return lines + [""]


def _compiled_table(rows: list[dict]) -> list[str]:
    """The `torch.compile` train-step table of the rows that have a `compiled` record (none: no lines)."""
    comp = [r for r in rows if r.get("compiled")]
    if not comp:
        return []
    lines = ["Under `torch.compile` (inductor): PaLI as the trainer's `--compile` runs it (`compile_stage` "
             "on the stage module), HF as `torch.compile(model)`; timed in the same alternation as the "
             "eager steps. Compile = the first step, cold.", "",
             "| preset | PaLI ex/s | HF ex/s | compile s PaLI / HF | vs HF eager | vs HF compiled | "
             "vs PaLI eager |", "|---|---|---|---|---|---|---|"]
    for r in comp:
        c = r["compiled"]
        lines.append(f"| {r['preset']} | {c['examples_per_s_ours']:.1f} | {c['examples_per_s_hf']:.1f} | "
                     f"{c['compile_s_ours']:.0f} / {c['compile_s_hf']:.0f} | {c['speedup_vs_hf_eager']:.2f}x | "
                     f"{c['speedup_vs_hf_compiled']:.2f}x | {c['speedup_over_own_eager']:.2f}x |")
    return lines + [""]


def _pipeline_table(rows: list[dict]) -> list[str]:
    """The train-step table on data-pipeline batches, of the rows that have a `pipeline` record (none: no lines)."""
    pipe = [r for r in rows if r.get("pipeline")]
    if not pipe:
        return []
    lines = ["On batches as the data pipeline delivers them (generated mixture, image-text examples, "
             "padded to the preset's fixed lengths): PaLI as the trainer runs it (all-padding tail "
             "columns cut, output head at real targets), the same with `--no-trim-padding`, and the HF "
             "twin on the batch padded to its longest prompt and target (`DataCollatorForSeq2Seq`'s "
             "default). Same examples, same weights, equal losses.", "",
             "| preset | batch | padded prompt / target | longest | real prompt / target tokens | "
             "PaLI ex/s | PaLI --no-trim-padding ex/s | HF (padded to longest) ex/s | vs HF | "
             "vs --no-trim-padding |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in pipe:
        p = r["pipeline"]
        e = p["examples_per_s"]
        lines.append(f"| {r['preset']} | {p['batch_size']} | {p['padded_lengths'][0]} / "
                     f"{p['padded_lengths'][1]} | {p['longest'][0]} / {p['longest'][1]} | "
                     f"{p['real_prompt_tokens']} / {p['real_target_tokens']} | {e['ours']:.1f} | "
                     f"{e['ours_padded']:.1f} | {e['hf']:.1f} | {p['speedup_vs_hf']:.2f}x | "
                     f"{p['trim_gain']:.2f}x |")
    return lines + [""]


def _train_section(rows: list[dict]) -> list[str]:
    """The train suite: eager, compiled and data-pipeline tables, then the step profiles."""
    return (_train_table(rows) + _compiled_table(rows) + _pipeline_table(rows)
            + _profile_table(rows, "a step", "step", optimizer=True, wall_key="step_s"))


def _decode_section(rows: list[dict]) -> list[str]:
    """The decode suite: KV-cache decoding vs HF `generate`, then the greedy-call profiles."""
    lines = ["## Decoding, KV cache vs HF `generate` (same weights, identical tokens checked)", "",
             "| preset | mode | batch | new tokens | PaLI s/call | HF s/call | PaLI tok/s | HF tok/s | "
             "speed-up | tokens identical |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['preset']} | {r['mode']} | {r['batch_size']} | {r['new_tokens']} | "
                     f"{r['call_s_ours']:.3f} | {r['call_s_hf']:.3f} | {r['tokens_per_s_ours']:.0f} | "
                     f"{r['tokens_per_s_hf']:.0f} | {r['speedup']:.2f}x | "
                     f"{'yes' if r['tokens_identical'] else 'NO'} |")
    lines.append("")
    return lines + _profile_table(rows, "a greedy call", "call", optimizer=False, wall_key="call_s")


def _data_section(d: dict) -> list[str]:
    """The data suite: the replica streams' throughput vs what training consumes, and the data wait."""
    lines = ["## Data: Ray Data pipeline vs a training worker's consumption", "",
             "| measure | examples/s | images/s |", "|---|---|---|",
             f"| pipeline, consumer side (incl. {d['pipeline_first_batch_s']:.1f} s to first batch) | "
             f"{d['pipeline_examples_per_s']:.0f} | {d['pipeline_images_per_s']:.0f} |",
             f"| pipeline, producer side | {d['producer_examples_per_s']:.0f} | "
             f"{d['producer_images_per_s']:.0f} |",
             f"| {d['preset']} training steps of {d.get('replicas', 1)} replica(s), one process each (consumption) | "
             f"{d['consumption_examples_per_s']:.1f} | - |"]
    ratio = f"**{d['ratio']:.1f}x**"
    if "group_consumption_examples_per_s" in d:
        lines.append(f"| the same replicas as one gloo group (consumption) | "
                     f"{d['group_consumption_examples_per_s']:.1f} | - |")
        ratio += f" (**{d['ratio_to_group']:.1f}x** the group's)"
    return lines + [f"| training fed by the pipeline | {d['fed_examples_per_s']:.1f} | - |", "",
                    f"Pipeline / consumption: {ratio}; data wait: **{100 * d['wait_frac']:.1f} %** of step time "
                    f"(batch {d['batch_size']}, {d['image_size']} px, first batch excluded).", ""]


def _serve_section(s: dict) -> list[str]:
    """The serve suite: batching on vs off per ingress, the ratios, and the in-process decode path."""
    from pali.bench.serve import INGRESS_NAMES

    lines = [f"## Serving: dynamic batching (max {s['max_batch_size']}) vs batch size 1", "",
             f"{s['concurrency']} closed-loop clients, {s['duration_s']:.0f} s per mode and round, "
             f"{s['rounds']} round(s), {s['max_new_tokens']} new tokens, one replica, tiny preset; each "
             "ingress in its own Ray session.", "",
             "| ingress | mode | requests/s | p50 ms | p99 ms | errors | CPU ms/request: ingress | replica |",
             "|---|---|---|---|---|---|---|---|"]
    for ingress, r in s["ingress"].items():
        for mode in ("batching_on", "batching_off"):
            m = r[mode]
            cpu = m.get("cpu_ms_per_request", {})
            lines.append(f"| {INGRESS_NAMES.get(ingress, ingress)} | {mode} | {m['requests_per_s']:.1f} | "
                         f"{m['p50_ms']:.0f} | {m['p99_ms']:.0f} | {m['errors']} | {cpu.get('proxy', '-')} | "
                         f"{cpu.get('replica', '-')} |")
    lines.append("")
    for ingress, r in s["ingress"].items():
        lines.append(f"- {INGRESS_NAMES.get(ingress, ingress)}: throughput ratio "
                     f"**{r['throughput_ratio']:.2f}x**, p99 on/off **{r['p99_ratio_on_over_off']:.2f}**.")
    lines.append("")
    if "in_process" in s:
        ip = s["in_process"]
        lines += [f"Replica decode path without HTTP (`serve.engine.decode_items`, {ip['batch_size']} requests): "
                  f"{ip['requests_per_s_batched']:.1f} req/s batched vs {ip['requests_per_s_one_by_one']:.1f} "
                  f"req/s one by one = **{ip['ratio']:.2f}x**.", ""]
    if "poisson" in s:  # pali.bench.serve_poisson: iteration vs whole-call batching vs batch size 1
        lines += ["## Serving: open-loop Poisson arrivals, max_new_tokens 2..32", "", s["poisson"]["markdown"], ""]
    return lines


def _parallel_section(p: dict) -> list[str]:
    """The parallel suite: per-rank memory by layout and data-parallel scaling."""
    lines = [f"## Parallel ({p['preset']} preset, {p['backend']})", "",
             "| layout | params MiB / rank | AdamW state MiB / rank | params vs TP=1 | total vs TP=1 |",
             "|---|---|---|---|---|"]
    for name, m in p["memory"].items():
        lines.append(f"| {name} | {_mib(m['param_bytes'])} | {_mib(m['optimizer_bytes'])} | "
                     f"{m['param_ratio']:.3f} | {m['total_ratio']:.3f} |")
    sc = p["dp_scaling"]
    lines += ["", "| data parallel | step s | examples/s |", "|---|---|---|"]
    lines += [f"| {k} | {v['step_s']:.3f} | {v['examples_per_s']:.1f} |" for k, v in sc.items()]
    lines += ["", f"DP=1 -> 2 throughput: **{p['dp_speedup']:.2f}x** "
              f"(efficiency {100 * p['dp_efficiency']:.0f} %).", ""]
    return lines


def _gpu_section(g: dict) -> list[str]:
    """The GPU suite, rendered by its own report (`pali.bench.gpu_report.to_markdown`)."""
    from pali.bench.gpu import to_markdown as gpu_markdown

    return ["## GPU (training and decoding on CUDA, bf16)", "", gpu_markdown(g), ""]


_SUITE_SECTIONS = (("train", _train_section), ("decode", _decode_section), ("data", _data_section),
                   ("serve", _serve_section), ("parallel", _parallel_section), ("gpu", _gpu_section))
"""Suite name -> its markdown section, in the order the report shows them."""


def to_markdown(result: dict) -> str:
    """The human-readable report: environment, targets, then one table per suite."""
    env, suites = result["environment"], result["suites"]
    lines = _environment_lines(env, result)
    if result.get("errors"):
        lines += _errors_section(result["errors"])
    if result.get("targets"):
        lines += _targets_section(result["targets"])
    for name, section in _SUITE_SECTIONS:
        if name in suites:
            lines += section(suites[name])
    return "\n".join(lines)


def write(result: dict, out_dir: str | Path) -> tuple[Path, Path]:
    """Write `results.json` and `results.md` into out_dir; returns both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    j, m = out / "results.json", out / "results.md"
    j.write_text(json.dumps(result, indent=2, default=str))
    m.write_text(to_markdown(result))
    return j, m
