"""The GPU record's Markdown (`to_markdown`): header, targets, checks, MFU / HFU table, profile, decoding,
side-by-side ratios and the run through Ray, from the JSON `pali.bench.gpu.run_gpu` writes."""

from __future__ import annotations


def _md_header(res: dict) -> list[str]:
    """Device, software and backend, then the measured matmul ceiling against the datasheet peak."""
    env = res.get("environment")
    lines = []
    if res.get("provenance"):  # a record assembled from several runs says which figure came from where
        lines += ["; ".join(f"{k}: {v}" for k, v in res["provenance"].items()), ""]
    if env:
        lines += [f"date {env['date']}, commit `{env['commit']}`, command `{res.get('command')}`; "
                  f"{env['gpu'] or 'no GPU'}, {env['cpu']} ({env['cores']} cores)", ""]
    lines += [f"device {res['device']}, torch {res['torch']}, CUDA {res['cuda']}, NCCL {res['nccl']}, "
              f"backend {res['backend']}", ""]
    c = res.get("ceiling", {})
    if "bf16_matmul_tflops" in c:
        lines += [f"{c['gpu']}: measured bf16 matmul {c['bf16_matmul_tflops']:.0f} TFLOP/s; MFU below is "
                  f"against the datasheet {c['peak_flops'] / 1e12:.0f} TFLOP/s", ""]
    return lines


def _md_checks(res: dict) -> list[str]:
    """One line per correctness check (`parity`, `train`) listing its figures."""
    lines = []
    for name in ("parity", "train"):
        r = res.get(name, {})
        if r:
            lines += [f"**{name}**: " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                                                  for k, v in r.items() if k != "traceback"), ""]
    return lines


def _md_mfu_table(rows: list[dict]) -> list[str]:
    """The MFU table, one row per preset and batch (a failed row shows its error). MFU counts model FLOPs
    (a frozen tower forward only), HFU adds recomputation (`hardware_flops_per_example`)."""
    lines = ["| preset | params | trainable | batch | act. ckpt | engine | step s | examples/s | tokens/s | MFU | "
             "HFU | peak GiB | planner GiB |", "|---" * 13 + "|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['preset']} | | | {r['batch_size'] or 'planner'} | {r['activation_checkpointing']} | | "
                         f"{r['error'][:60]} | | | | | | |")
            continue
        hfu = r.get("hfu", r.get("executed_utilization"))  # records before HFU named it executed_utilization
        engine = "/".join(x for x in ("compiled" if r.get("compiled") else "", r.get("attention", ""),
                                      "chunked loss" if r.get("chunked_loss") else "") if x) or "-"
        batch = f"{r['batch_size']}{' (planner)' if r.get('planner_batch') else ''}"
        lines.append(f"| {r['preset']} | {r['params'] / 1e9:.2f}B | {r['trainable'] / 1e9:.2f}B | "
                     f"{batch} | {'yes' if r['activation_checkpointing'] else 'no'} | {engine} | "
                     f"{r['step_s']:.3f} | {r['examples_per_s']:.1f} | {r['tokens_per_s']:.0f} | "
                     f"{100 * r['mfu']:.1f} % | {100 * hfu:.1f} % | "
                     f"{r.get('peak_memory_gib', float('nan')):.1f} | "
                     f"{r.get('planner_peak_gib', float('nan')):.1f} |")
    lines.append("")
    return lines


def _md_ratios(res: dict) -> list[str]:
    """The side-by-side comparisons: FlexAttention vs dense-bias SDPA, compiled vs eager train step."""
    lines = []
    for name, (a, b), what in (("attention", ("sdpa", "flex"), "FlexAttention vs dense-bias SDPA (eager)"),
                               ("compile", ("eager", "compiled"), "compiled vs eager train step")):
        r = res.get(name, {})
        if "speedup" not in r:
            continue
        if not lines:
            lines = ["| comparison | preset | batch | step s (base) | step s (new) | speed-up | loss rel. diff |",
                     "|---|---|---|---|---|---|---|"]
        lines.append(f"| {what} | {r['preset']} | {r['batch_size']} | {r['step_s'][a]:.4f} | "
                     f"{r['step_s'][b]:.4f} | {r['speedup']:.2f}x | {r['loss_rel_diff']:.1e} |")
    return lines + [""] if lines else []


def _md_targets(targets: list[dict]) -> list[str]:
    """The GPU targets, measured or unmeasured."""
    lines = ["| GPU target | measured | goal | met |", "|---|---|---|---|"]
    for t in targets:
        v = t["measured"]
        shown = "unmeasured" if v is None else (f"{100 * v:.1f} %" if v < 1.5 and "ms" not in t["target"]
                                                else f"{v:.2f}")
        goal = t["goal"]
        if "ms" not in t["target"]:
            op, g = goal.split()
            goal = f"{op} {100 * float(g):.0f} %"
        lines.append(f"| {t['target']} | {shown} | {goal} | "
                     f"{'-' if t['met'] is None else ('yes' if t['met'] else 'NO')} |")
    return lines + [""]


def _md_profile(pr: dict) -> list[str]:
    """Where one step's time goes: kernel time by kind, then the top kernels."""
    busy = "" if pr["busy_fraction"] is None else f", GPU busy {100 * pr['busy_fraction']:.0f} % of the wall time"
    lines = [f"profile of one step ({pr['preset']}, batch {pr['batch_size']}): {pr['wall_s'] * 1e3:.0f} ms "
             f"wall, {pr['timed_s'] * 1e3:.0f} ms in kernels{busy}", "",
             "| kind | ms | share |", "|---|---|---|"]
    lines += [f"| {k} | {v * 1e3:.1f} | {100 * v / max(pr['timed_s'], 1e-12):.0f} % |"
              for k, v in pr["by_kind_s"].items()]
    lines += ["", "| top kernel | ms |", "|---|---|"]
    lines += [f"| `{t['name'][:90]}` | {t['s'] * 1e3:.2f} |" for t in pr["top"][:8]]
    lines.append("")
    return lines


def _md_decode(d: dict, graph: bool = False) -> list[str]:
    """A greedy decode table, one row per batch size: today's growing KV cache (`decode`), or the static-shape
    path with its tokens checked against it (`decode_graph`, graph=True)."""
    if graph:
        how = "CUDA graphs" if d.get("cuda_graphs") else "eager"
        head = f"decode, static shapes ({d['preset']}, greedy, `generate_static`, {how})"
    else:
        head = (f"decode ({d['preset']}, greedy, KV cache; cache = no-cache on "
                f"{100 * d['cache_agreement']:.1f} % of tiny-preset tokens)")
    extra = " tokens = today's |" if graph else ""
    lines = [head, "", "| batch | seconds | new tokens | tokens/s | ms/step |" + extra,
             "|---|---|---|---|---|" + ("---|" if graph else "")]
    for r in d["rows"]:
        same = (f" {'yes' if r['tokens_equal'] else 'NO'} ({100 * r['token_agreement']:.1f} %) |"
                if graph else "")
        lines.append(f"| {r['batch_size']} | {r['seconds']:.3f} | {r['new_tokens']} | {r['tokens_per_s']:.0f} | "
                     f"{r['ms_per_step']:.1f} |" + same)
    lines.append("")
    return lines


def _md_static_decode(r: dict) -> list[str]:
    """The static-shape vs growing-cache decoding ratio (`static_decode`)."""
    how = "CUDA graphs" if r["cuda_graphs"] else "eager"
    return [f"static-shape decoding ({how}) vs today's growing cache: {r['preset']}, batch {r['batch_size']}, "
            f"{r['steps']} greedy steps, {r['call_s']['today']:.3f} s vs {r['call_s']['static']:.3f} s per call "
            f"(median of {r['repeats']}, alternating): {r['speedup']:.2f}x; tokens equal: "
            f"{'yes' if r['tokens_equal'] else 'NO'}", ""]


def _md_ray(ray: dict) -> list[str]:
    """The run through Ray Train and Serve (`run_ray`; older records in `_md_ray_legacy`'s form)."""
    t, s = ray["train"], ray.get("serve", {})
    if "job" in t:
        return _md_ray_legacy(ray)
    last, ev = t.get("last_record") or {}, (t.get("eval") or {}).get("mean", {})
    lines = [f"**Through Ray** ({ray['command']})", "",
             f"- train: `{t['command']}`: exit {t['returncode']} after {t['seconds']:.0f} s; loss "
             f"{t.get('first_loss') or float('nan'):.2f} -> {last.get('loss', float('nan')):.2f}, "
             f"{last.get('examples_per_s', float('nan')):.0f} examples/s, MFU {100 * last.get('mfu', 0):.2f} %, "
             f"HFU {100 * last.get('hfu', 0):.2f} %"]
    if ev:
        lines.append(f"- held-out: CIDEr {ev.get('caption_cider', float('nan')):.1f}, OCR ANLS "
                     f"{ev.get('ocr_anls', float('nan')):.1f}, VQA {ev.get('vqa_accuracy', float('nan')):.1f} %")
    if "burst" in s:
        b = s["burst"]
        lines.append(f"- serve (`python -m serve` on the checkpoint, replica device "
                     f"{s.get('stats', {}).get('device')}): {b['ok']}/{b['requests']} concurrent requests at "
                     f"{b['requests_per_s']:.0f} requests/s (p50 {b['p50_s']:.2f} s, p99 {b['p99_s']:.2f} s); "
                     f"a bad image got {s.get('bad_request_status')}")
    return lines + [""]


def _md_ray_legacy(ray: dict) -> list[str]:
    """The run through Ray as the 2026-11-28 record stores it (assembled by hand from gpu_ray_check)."""
    t, s = ray["train"], ray["serve"]
    ev, last = t["eval"]["mean"], t["last_100_steps"]
    return [f"**Through Ray** ({ray['command']})", "",
            f"- train: `{t['job']}`: trained in {t['train_seconds']} s (Ray start to consolidated "
            f"checkpoint), loss {t['first_loss']:.2f} -> {t['last_loss']:.2f}; last 100 steps "
            f"{last['step_time_s'] * 1e3:.0f} ms/step, {last['examples_per_s']:.0f} examples/s, data wait "
            f"{100 * last['data_wait_frac']:.1f} %",
            f"- held-out: loss {t['heldout_loss']:.3f}; CIDEr {ev['caption_cider']:.1f}, OCR ANLS "
            f"{ev['ocr_anls']:.1f}, VQA {ev['vqa_accuracy']:.1f} %",
            f"- serve (`python -m serve` on the checkpoint, replica device {s['stats']['device']}): "
            f"{s['burst']['ok']}/{s['burst']['requests']} concurrent requests answered at "
            f"{s['burst']['requests_per_s']:.0f} requests/s (p50 {s['burst']['p50_s']:.2f} s, p99 "
            f"{s['burst']['p99_s']:.2f} s, batches up to {s['burst']['max_batch_seen']}); a bad image got "
            f"{s['bad_request_status']}; ready {s['startup_s']:.0f} s after start", ""]


def _md_errors(res: dict) -> list[str]:
    """The errors of every section that failed (none: no lines)."""
    errors = [f"- {k}: {v['error']}" for k, v in res.items() if isinstance(v, dict) and "error" in v]
    return ["errors:", *errors, ""] if errors else []


def to_markdown(res: dict, title: str | None = None) -> str:
    """The suite's tables (under a `# title` when given: `main` writes gpu.md so)."""
    if "note" in res:
        return res["note"]
    lines = ([f"# {title}", ""] if title else []) + _md_header(res)
    if res.get("targets"):
        lines += _md_targets(res["targets"])
    lines += _md_checks(res)
    rows = res.get("mfu", {}).get("rows", [])
    if rows:
        lines += _md_mfu_table(rows)
    pr = res.get("profile", {})
    if pr.get("by_kind_s"):
        lines += _md_profile(pr)
    d = res.get("decode", {})
    if d.get("rows"):
        lines += _md_decode(d)
    g = res.get("decode_graph", {})
    if g.get("rows"):
        lines += _md_decode(g, graph=True)
    elif g.get("note"):  # records from before generate_static
        lines += [f"graph-captured decoding: {g['note']}", ""]
    if "speedup" in res.get("static_decode", {}):
        lines += _md_static_decode(res["static_decode"])
    lines += _md_ratios(res)
    ray = res.get("ray")
    if ray:  # recorded from pali/bench/gpu_ray_check.py (the same GPU path through Ray Train and Serve)
        lines += _md_ray(ray)
    return "\n".join(lines + _md_errors(res))
