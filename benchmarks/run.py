#!/usr/bin/env python3
"""Sweep runner for the ckd_ext benchmarks: CSV + markdown table + PNG plots (+ docs/benchmarks.md).

    python benchmarks/run.py --smoke --out /tmp/bench-smoke           # tiny shapes, one repetition (CI)
    python benchmarks/run.py --device cpu --out benchmarks/results/cpu --docs docs/benchmarks.md
    python benchmarks/run.py --only loss=ckd --only shape=tokens,scale --only provider=ckd_ext,floor
    python benchmarks/run.py --from-csv benchmarks/results/cpu/results.csv --docs docs/benchmarks.md

Every case (loss, provider, shape, dtype) runs in its own worker subprocess with an address-space limit
(CPU) and a timeout, so an eager OOM or a hang is recorded ("OOM", "timeout") instead of taking the
machine down. Outputs in --out: results.csv, results.md, machine.json, targets.json, plots/*.png.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Dict, List

sys.path.append(str(Path(__file__).resolve().parents[1]))  # appended: an installed ckd_ext still wins
from benchmarks.cases import (EXTRA_LM_PROVIDERS, LM_GROUPS, MODES, PROVIDERS, make_case, parse_only,  # noqa: E402
                              select_shapes)
from benchmarks.measure import profile_full  # noqa: E402
from benchmarks.providers import package_version, provider_status  # noqa: E402
from benchmarks.report import LM_DOC_BEGIN, LM_DOC_END, fmt_time, make_plots, markdown, update_docs  # noqa: E402
from benchmarks.results import (  # noqa: E402
    Table, fnum, group_of, load_machine, own_machine_file, parse_shape, read_csv, write_csv)
from benchmarks.targets import compute_targets  # noqa: E402
from benchmarks.worker import DEFAULT_FUSED_MEM_LIMIT_GIB, DEFAULT_MEM_LIMIT_GIB, run_cases  # noqa: E402


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()


def profile_missed(targets: List[Dict], device: str, threads: int) -> str:
    """Profile ckd_ext (in this process: the fused ops' memory is bounded) where a target was missed."""
    import torch
    torch.set_num_threads(threads)
    seen, lines = set(), []
    for x in targets:
        if x["status"] != "missed" or x["target"].startswith("saved") or group_of(x["shape_name"]) in LM_GROUPS:
            continue
        key = (x["loss"], x["shape"], x["dtype"])
        if key in seen:
            continue
        seen.add(key)
        N, Cc = parse_shape(x["shape"])
        try:
            p = profile_full("ckd_ext", x["loss"], N, Cc, x["dtype"], device)
            lines.append(f"| {x['loss']} | {x['shape_name']} ({x['shape']}, {x['dtype']}) | {p['gemm']:.0%} | "
                         f"{p['ckd_ext']:.0%} | {p['other_ops']:.0%} | {p['overhead']:.0%} | "
                         f"{fmt_time(p['wall_ms_per_call'])} |")
        except Exception as e:  # noqa: BLE001
            lines.append(f"| {x['loss']} | {x['shape_name']} | profile failed: {type(e).__name__}: {e} | | | | |")
    if not lines:
        return ""
    return "\n".join(["", "### Where the time goes (ckd_ext full fwd+bwd, torch.profiler self time)", "",
                      "| loss | shape | GEMMs | ckd_ext kernels/loops | other aten ops | overhead | wall/call |",
                      "|---|---|---|---|---|---|---|"] + lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, one repetition, batched workers, "
                    "torch.compile backend aot_eager (CI: checks that CSV, table and plots are produced)")
    ap.add_argument("--out", default=None, help="output folder (default benchmarks/results/<device>)")
    ap.add_argument("--only", action="append", default=[], metavar="KEY=V1,V2",
                    help="filter; keys loss, provider, mode, shape (name, group or NxC), dtype; repeatable")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in every worker "
                    "(default: os.cpu_count())")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per case before it is killed "
                    "and recorded as 'timeout'")
    ap.add_argument("--mem-limit-gib", type=float, default=DEFAULT_MEM_LIMIT_GIB,
                    help="RLIMIT_AS of eager/compiled CPU workers (0: none)")
    ap.add_argument("--fused-mem-limit-gib", type=float, default=DEFAULT_FUSED_MEM_LIMIT_GIB,
                    help="RLIMIT_AS of ckd_ext/floor CPU workers (0: none)")
    ap.add_argument("--isolate", choices=("case", "batch"), default=None,
                    help="one worker process per case (default) or per batch (default with --smoke)")
    ap.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor; "
                    "aot_eager with --smoke)")
    ap.add_argument("--reps", type=int, default=25, help="max timed repetitions per mode")
    ap.add_argument("--min-reps", type=int, default=3)
    ap.add_argument("--max-seconds", type=float, default=5.0, help="stop timing a mode after this long")
    ap.add_argument("--warmup", type=int, default=2, help="warm-up calls per mode (>= 1)")
    ap.add_argument("--docs", default=None, help="also rewrite the generated part of this markdown file "
                    "(e.g. docs/benchmarks.md) and copy the plots next to it")
    ap.add_argument("--from-csv", default=None, help="skip measuring: rebuild table/plots/docs from a CSV")
    ap.add_argument("--profile", action="store_true", help="profile ckd_ext's full fwd+bwd (torch.profiler) "
                    "at every shape with a missed target and add a 'where the time goes' table")
    ap.add_argument("--deadline", type=float, default=None, help="seconds of measuring after which the running "
                    "case is stopped and every unfinished one recorded as 'deadline' (the tables are still written)")
    ap.add_argument("--no-plots", action="store_true", help="skip the PNG plots (no matplotlib needed)")
    ap.add_argument("--verbose", action="store_true")
    a = ap.parse_args(argv)
    # Stopped from outside (a `timeout`): unwind, so that run_cases takes its worker down with it.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    only = parse_only(a.only)
    if a.device == "auto":
        import torch
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    out = Path(a.out or (Path(__file__).resolve().parent / "results" / a.device))
    out.mkdir(parents=True, exist_ok=True)
    skipped: Dict[str, str] = {}

    if a.from_csv:
        rows = read_csv(Path(a.from_csv))
        info, skipped = load_machine(Path(a.from_csv), rows)
    else:
        threads = a.threads or os.cpu_count() or 1
        if a.smoke:
            a.reps, a.min_reps, a.warmup, a.max_seconds = 1, 1, 1, 0.0
        opts = dict(device=a.device, threads=threads, reps=a.reps, min_reps=a.min_reps,
                    max_seconds=a.max_seconds, warmup=a.warmup, warmup_seconds=0.0 if a.smoke else 1.0,
                    compile_backend=a.compile_backend or ("aot_eager" if a.smoke else "inductor"),
                    modes=[m for m in MODES if m in only.get("mode", MODES)], verbose=a.verbose)
        shapes = select_shapes(a.device, a.smoke, only)
        every_provider = PROVIDERS + EXTRA_LM_PROVIDERS
        providers = [p for p in every_provider if p in only.get("provider", every_provider)]
        cases = []
        for p in providers:
            ok, why = provider_status(p)
            if not ok:
                skipped[p] = why
                print(f"NOTE: provider {p} skipped: {why}")
        for s in shapes:
            for p in providers:
                if p in skipped or p not in s.providers:
                    continue
                ok, why = provider_status(p, s.loss)
                if not ok:
                    skipped[f"{p}/{s.loss}"] = why
                    continue
                cases.append(make_case(s, p))
        print(f"{len(cases)} cases on {a.device}, {threads} threads, output {out}")
        isolate = a.isolate or ("batch" if a.smoke else "case")
        deadline = time.monotonic() + a.deadline if a.deadline is not None else None
        rows, info = run_cases(cases, opts, a.timeout, a.mem_limit_gib or None, a.fused_mem_limit_gib or None,
                               isolate=isolate, deadline=deadline)
        meta = dict(device=a.device, threads=threads, torch_version=info.get("torch", ""),
                    package_version=info.get("package_version", package_version()), timestamp=now_iso())
        for r in rows:
            for k, v in meta.items():
                r.setdefault(k, v)
        info = dict(info, threads=threads, device=a.device)
        write_csv(rows, out / "results.csv")
        (out / "machine.json").write_text(json.dumps(dict(info, skipped=skipped), indent=1))
        rows = read_csv(out / "results.csv")  # one code path (strings) for tables, as with --from-csv

    t = Table(rows)
    targets = compute_targets(t, info)
    (out / "targets.json").write_text(json.dumps(targets, indent=1))
    plots = [] if a.no_plots else make_plots(t, out / "plots")
    prof_md = ""
    if a.profile:
        prof_md = profile_missed(targets, a.device, a.threads or os.cpu_count() or 1)
        (out / "profile.md").write_text(prof_md)
    body = markdown(t, info, targets, skipped, plots) + prof_md
    (out / "results.md").write_text(body + "\n")
    if a.docs:
        doc = Path(a.docs)
        lm_only = all(group_of(r["shape_name"]) in LM_GROUPS for r in rows)
        update_docs(doc, markdown(t, info, targets, skipped, plots, plot_prefix="img/benchmarks/") + prof_md, plots,
                    *((LM_DOC_BEGIN, LM_DOC_END) if lm_only else ()))
        if not a.from_csv:  # the run's data beside the doc, so that the doc can be re-rendered with its machine
            kept = doc.with_name(f"benchmarks-{'lm-' if lm_only else ''}{a.device}-{now_iso()[:10]}.csv")
            shutil.copy(out / "results.csv", kept)
            shutil.copy(out / "machine.json", own_machine_file(kept))
            print(f"kept {kept} and its machine file")
        print(f"updated {doc}")

    n_fail = sum(1 for r in rows if fnum(r["p50"]) is None)
    print(f"wrote {out / 'results.csv'} ({len(rows)} rows, {n_fail} without a value), {out / 'results.md'}, "
          f"{len(plots)} plots in {out / 'plots'}")
    counts = {s: sum(1 for x in targets if x["status"] == s) for s in ("met", "missed", "not measured")}
    if a.smoke:
        print("(smoke: tiny shapes, one repetition; the target ratios below are not meaningful)")
    print(f"targets: {counts['met']} met, {counts['missed']} missed, {counts['not measured']} not measured")
    for x in targets:
        if x["status"] == "missed":
            print(f"  MISSED {x['target']}: {x['loss']} {x['shape_name']} {x['value']} ({x['threshold']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
