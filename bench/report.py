#!/usr/bin/env python3
"""Summarise bench/run.sh's raw results: medians over the interleaved rounds, ratios, targets.

Prints Markdown tables (pasted as is into bench/README.md).
"""
import argparse
import csv
import datetime
import math
import platform
import os
import statistics


def med(xs):
    xs = [x for x in xs if x == x]  # drop NaN
    return statistics.median(xs) if xs else float("nan")


def fmt(x, nd=0):
    if x != x:
        return "–"
    return f"{x:,.{nd}f}"


def load_strace(d, n):
    """{label: {syscall: calls per request}} from strace -c files."""
    out = {}
    for label in ("nginx-ns", "sluice-ns", "nginx-st", "sluice-st"):
        path = os.path.join(d, f"strace-{label}.txt")
        calls = {}
        try:
            for line in open(path):
                f = line.split()
                if len(f) >= 5 and f[0][0].isdigit() and f[-1] != "total":
                    calls[f[-1]] = int(f[3])
        except OSError:
            continue
        out[label] = {k: v / n for k, v in calls.items()}
    return out


def headline(p, m, sys_tab, psys, rows_of):
    """The figure issue 10 asks to lead with: CPU per request, Sluice over nginx, same run."""
    cpu = {(st, t): m(st, t, "proxy_cpu_us_req") for st in ("ns", "st") for t in "BC"}
    rps = {(st, t): m(st, t, "rps") for st in ("ns", "st") for t in "BC"}

    def r(x, y):
        return x / y if y and y == y and x == x else float("nan")

    p("**Headline: proxy CPU µs per request, Sluice ÷ nginx, measured in the same run** "
      "(utime + stime of the proxy process over the wrk run ÷ requests)")
    p("")
    p("| | non-stream, 64 conns | 16-token stream, 64 conns | target |")
    p("|---|---:|---:|---|")
    ns, st = r(cpu["ns", "C"], cpu["ns", "B"]), r(cpu["st", "C"], cpu["st", "B"])
    ok = "**met**" if ns <= 2.0 and st <= 2.0 else "**missed**"
    p(f"| **Sluice ÷ nginx CPU per request** | **{fmt(ns, 2)}×** | **{fmt(st, 2)}×** | ≤ 2.0× {ok if ns == ns else ''} |")
    def per_round(st):  # Sluice ÷ nginx within each round: the two ran seconds apart
        rs = []
        for rnd in sorted({r["round"] for r in rows_of(st, "C")}):
            b = [float(r["proxy_cpu_us_req"]) for r in rows_of(st, "B") if r["round"] == rnd]
            c = [float(r["proxy_cpu_us_req"]) for r in rows_of(st, "C") if r["round"] == rnd]
            if b and c and b[0] > 0:
                rs.append(c[0] / b[0])
        return rs
    prn, prs = per_round("ns"), per_round("st")
    if prn and prs:
        p(f"| the same, median of the per-round ratios (min–max) | {fmt(med(prn), 2)}× ({fmt(min(prn), 2)}–{fmt(max(prn), 2)}) | "
          f"{fmt(med(prs), 2)}× ({fmt(min(prs), 2)}–{fmt(max(prs), 2)}) | |")
    p(f"| Sluice CPU µs/request | {fmt(cpu['ns', 'C'], 1)} | {fmt(cpu['st', 'C'], 1)} | |")
    p(f"| nginx CPU µs/request | {fmt(cpu['ns', 'B'], 1)} | {fmt(cpu['st', 'B'], 1)} | |")
    p(f"| per-core capacity (nginx CPU ÷ Sluice CPU) | {fmt(r(cpu['ns', 'B'], cpu['ns', 'C']), 2)} | "
      f"{fmt(r(cpu['st', 'B'], cpu['st', 'C']), 2)} | ≥ 0.5 |")
    p(f"| req/s, Sluice / nginx (proxy and mock share one core) | {fmt(rps['ns', 'C'])} / {fmt(rps['ns', 'B'])} = "
      f"{fmt(r(rps['ns', 'C'], rps['ns', 'B']), 2)} | {fmt(rps['st', 'C'])} / {fmt(rps['st', 'B'])} = "
      f"{fmt(r(rps['st', 'C'], rps['st', 'B']), 2)} | |")
    if sys_tab:
        tot = {k: sum(v.values()) for k, v in sys_tab.items()}
        p(f"| syscalls per request, Sluice / nginx (strace -c -f) | {fmt(tot.get('sluice-ns', float('nan')), 2)} / "
          f"{fmt(tot.get('nginx-ns', float('nan')), 2)} | {fmt(tot.get('sluice-st', float('nan')), 2)} / "
          f"{fmt(tot.get('nginx-st', float('nan')), 2)} | Sluice ≤ 7.5 |")
    if psys:
        p(f"| syscalls per request under load, Sluice / nginx (perf stat, 64 conns) | "
          f"{fmt(psys.get(('ns', 'C'), float('nan')), 2)} / {fmt(psys.get(('ns', 'B'), float('nan')), 2)} | "
          f"{fmt(psys.get(('st', 'C'), float('nan')), 2)} / {fmt(psys.get(('st', 'B'), float('nan')), 2)} | Sluice ≤ 7.5 |")
    p("")
    if sys_tab:
        p("**Syscalls per request** (strace -c -f on the whole proxy process, a fixed count of requests "
          "over 4 keep-alive connections, bench/nreq.py)")
        p("")
        p("| syscall | nginx non-stream | Sluice non-stream | nginx stream | Sluice stream |")
        p("|---|---:|---:|---:|---:|")
        cols = [sys_tab.get(l, {}) for l in ("nginx-ns", "sluice-ns", "nginx-st", "sluice-st")]
        names = sorted(set().union(*cols), key=lambda k: -max(c.get(k, 0) for c in cols))
        for k in names:
            if max(c.get(k, 0) for c in cols) >= 0.05:
                p(f"| {k} | " + " | ".join(f"{c.get(k, 0):.2f}" for c in cols) + " |")
        p("| **total** | " + " | ".join(f"**{sum(c.values()):.2f}**" for c in cols) + " |")
        p("")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--raw", required=True)
    ap.add_argument("--scale", default="")
    ap.add_argument("--commit", default="unknown")
    ap.add_argument("--rounds", default="?")
    ap.add_argument("--duration", default="?")
    ap.add_argument("--conns", default="64")
    ap.add_argument("--ns-tokens", default="?")
    ap.add_argument("--st-tokens", default="?")
    ap.add_argument("--server-cpus", default="?")
    ap.add_argument("--client-cpus", default="?")
    ap.add_argument("--nofile", default="?")
    ap.add_argument("--sluice-rss-after-load", type=int, default=0)
    ap.add_argument("--strace-dir", default="", help="strace-{nginx,sluice}-{ns,st}.txt from run.sh")
    ap.add_argument("--strace-n", type=int, default=0)
    ap.add_argument("--conditions", default="")
    ap.add_argument("--pairs", default="", help="round, target, PAIRS line (run.sh step 3b)")
    ap.add_argument("--perf-syscalls", default="", help="target, step, syscalls, requests (run.sh step 5)")
    a = ap.parse_args()

    rows = list(csv.DictReader(open(a.raw), delimiter="\t"))
    by = {}
    for r in rows:
        by.setdefault((r["step"], r["target"]), []).append(r)

    def m(step, t, key):
        return med([float(r[key]) for r in by.get((step, t), [])])

    def errs(step, t):
        return sum(int(r["errors"]) for r in by.get((step, t), []))

    def added(t, key):  # per-round difference against the mock, then the median
        a_ = {r["round"]: float(r[key]) for r in by.get(("c1", "A"), [])}
        return med([float(r[key]) - a_[r["round"]] for r in by.get(("c1", t), []) if r["round"] in a_])

    names = {"A": "mock direct", "B": "nginx → mock", "C": "Sluice → mock"}
    out = []
    p = out.append
    now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    p(f"Run {now}, commit {a.commit}, {platform.node()} ({platform.machine()}), "
      f"{a.rounds} interleaved rounds × {a.duration} s per run, medians; servers pinned to CPU {a.server_cpus}, "
      f"load generator to CPU {a.client_cpus}; non-stream reply {a.ns_tokens} tokens, stream {a.st_tokens} tokens.")
    if a.conditions:
        p(f"{a.conditions}.")
    p("")
    sys_tab = load_strace(a.strace_dir, a.strace_n) if a.strace_dir and a.strace_n else {}
    psys = {}
    if a.perf_syscalls:
        try:
            for l in open(a.perf_syscalls):
                f = l.rstrip("\n").split("\t")
                if len(f) == 4 and f[2] and int(f[3]) > 0:
                    psys[(f[1], f[0])] = int(f[2]) / int(f[3])
        except (OSError, ValueError):
            pass
    headline(p, m, sys_tab, psys, lambda st, t: by.get((st, t), []))
    for step, title in (("ns", f"1. Non-stream, {a.conns} connections"),
                        ("st", f"2. Stream, {a.conns} connections"),
                        ("c1", "3. Non-stream, 1 connection")):
        p(f"**{title}**")
        p("")
        p("| target | req/s | p50 µs | p90 µs | p99 µs | proxy CPU µs/req | of which kernel | mock CPU µs/req | server CPU busy | client CPU busy | errors |")
        p("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for t in "ABC":
            if (step, t) not in by:
                continue
            p(f"| {names[t]} | {fmt(m(step, t, 'rps'))} | {fmt(m(step, t, 'p50_us'))} | {fmt(m(step, t, 'p90_us'))} | {fmt(m(step, t, 'p99_us'))} | "
              f"{fmt(m(step, t, 'proxy_cpu_us_req'), 1)} | {fmt(m(step, t, 'proxy_sys_us_req'), 1)} | "
              f"{fmt(m(step, t, 'mock_cpu_us_req'), 1)} | "
              + (f"{fmt(100 * m(step, t, 'server_cpu_busy'))} % | {fmt(100 * m(step, t, 'client_cpu_busy'))} % | "
                 if step != "c1" else "– | – | ")  # step 3 runs with the keep-awake spinners
              + f"{errs(step, t)} |")
        p("")

    scale, scale_idle = {}, {}
    if a.scale:
        try:
            for l in open(a.scale):
                if l.startswith("SCALE "):
                    scale = dict(kv.split("=", 1) for kv in l.split()[1:])
                elif l.startswith("SCALE_IDLE "):
                    scale_idle = dict(kv.split("=", 1) for kv in l.split()[1:])
        except OSError:
            pass
    if scale:
        p("**4. Open streams through Sluice** (one worker, mock inter-token delay 2 s)")
        p("")
        p("| streams opened | first event received | failed | mock running | Sluice idle RSS | RSS with all open | after closing | fds open |")
        p("|---:|---:|---:|---:|---:|---:|---:|---:|")
        p(f"| {scale.get('n')} | {scale.get('ok')} in {scale.get('open_s')} s | {scale.get('failed')} | "
          f"{scale.get('mock_running')} | {fmt(int(scale.get('idle_rss_kib', 0)) / 1024, 1)} MiB | "
          f"{fmt(int(scale.get('loaded_rss_kib', 0)) / 1024, 1)} MiB | "
          f"{fmt(int(scale.get('after_close_rss_kib', 0)) / 1024, 1)} MiB | {scale.get('loaded_fds')} |")
        p("")
        if scale.get("probe_requests") and scale_idle.get("probe_requests"):
            p("A new request while the streams are open (8 connections of non-stream load for 5 s; "
              "Sluice CPU net of the open streams' own cost, which was "
              f"{scale.get('streams_cpu_pct')} % of a core):")
            p("")
            p("| open streams | req/s | p50 µs | p99 µs | Sluice CPU µs/request |")
            p("|---:|---:|---:|---:|---:|")
            for label, d in (("0", scale_idle), (scale.get("ok"), scale)):
                p(f"| {label} | {fmt(float(d['probe_rps']))} | {fmt(float(d['probe_p50_us']))} | "
                  f"{fmt(float(d['probe_p99_us']))} | {fmt(float(d['probe_cpu_us_req']), 1)} |")
            p("")

    def ratio(x, y):
        return x / y if y and y == y and x == x else float("nan")

    def verdict(ok):
        return "" if ok is None else ("**met**" if ok else "**missed**")

    ns_c, ns_b, ns_a = m("ns", "C", "rps"), m("ns", "B", "rps"), m("ns", "A", "rps")
    st_c, st_b, st_a = m("st", "C", "rps"), m("st", "B", "rps"), m("st", "A", "rps")
    cpu_ns_c, cpu_ns_b = m("ns", "C", "proxy_cpu_us_req"), m("ns", "B", "proxy_cpu_us_req")
    cpu_st_c, cpu_st_b = m("st", "C", "proxy_cpu_us_req"), m("st", "B", "proxy_cpu_us_req")
    add_p50_c, add_p99_c = added("C", "p50_us"), added("C", "p99_us")
    add_p50_b, add_p99_b = added("B", "p50_us"), added("B", "p99_us")
    add_p90_c, add_p90_b = added("C", "p90_us"), added("B", "p90_us")
    per_stream = float(scale.get("per_stream_kib", "nan")) if scale else float("nan")

    p("**Ratios and targets**")
    p("")
    p("| figure | non-stream | stream | target |")
    p("|---|---:|---:|---|")
    r1, r2 = ratio(ns_c, ns_b), ratio(st_c, st_b)
    p(f"| Sluice / nginx req/s | {fmt(r1, 2)} | {fmt(r2, 2)} | ≥ 0.5 {verdict(r1 >= 0.5 and r2 >= 0.5) if r1 == r1 else ''} |")
    p(f"| Sluice / mock-direct req/s | {fmt(ratio(ns_c, ns_a), 2)} | {fmt(ratio(st_c, st_a), 2)} | |")
    p(f"| nginx / mock-direct req/s | {fmt(ratio(ns_b, ns_a), 2)} | {fmt(ratio(st_b, st_a), 2)} | |")
    p(f"| proxy CPU µs/request, Sluice | {fmt(cpu_ns_c, 1)} | {fmt(cpu_st_c, 1)} | |")
    p(f"| proxy CPU µs/request, nginx | {fmt(cpu_ns_b, 1)} | {fmt(cpu_st_b, 1)} | |")
    p(f"| Sluice / nginx CPU per request | {fmt(ratio(cpu_ns_c, cpu_ns_b), 2)}× | {fmt(ratio(cpu_st_c, cpu_st_b), 2)}× | |")
    p(f"| per-worker capacity, Sluice / nginx (= nginx CPU ÷ Sluice CPU) | {fmt(ratio(cpu_ns_b, cpu_ns_c), 2)} | "
      f"{fmt(ratio(cpu_st_b, cpu_st_c), 2)} | ≥ 0.5 |")
    p("")
    p("| figure | Sluice | nginx | target |")
    p("|---|---:|---:|---|")
    p(f"| added p50 at concurrency 1 (vs mock direct) | {fmt(add_p50_c)} µs | {fmt(add_p50_b)} µs | |")
    p(f"| added p90 at concurrency 1 (vs mock direct) | {fmt(add_p90_c)} µs | {fmt(add_p90_b)} µs | |")
    pairs = {}
    if a.pairs:
        try:
            for l in open(a.pairs):
                f = l.rstrip("\n").split("\t")
                if len(f) == 3 and f[2].startswith("PAIRS"):
                    kv = dict(x.split("=", 1) for x in f[2].split()[1:] if "=" in x)
                    for k in ("added_p50", "added_p90", "added_p99", "pair_diff_p99"):
                        pairs.setdefault((f[1], k), []).append(float(kv[k]))
        except (OSError, ValueError, KeyError):
            pass
    pv = {k: med(v) for k, v in pairs.items()}
    if pv:
        p(f"| added p99 at concurrency 1, wrk runs (mock and proxy in separate runs) | {fmt(add_p99_c)} µs | "
          f"{fmt(add_p99_b)} µs | |")
        for q in ("50", "90"):
            p(f"| added p{q} at concurrency 1, interleaved pairs (c1_pairs.py) | {fmt(pv.get(('C', 'added_p' + q), float('nan')))} µs | "
              f"{fmt(pv.get(('B', 'added_p' + q), float('nan')))} µs | |")
        pc = pv.get(("C", "added_p99"), float("nan"))
        p(f"| **added p99 at concurrency 1, interleaved pairs** | **{fmt(pc)} µs** | "
          f"{fmt(pv.get(('B', 'added_p99'), float('nan')))} µs | ≤ 150 µs {verdict(pc <= 150) if pc == pc else ''} |")
    else:
        p(f"| added p99 at concurrency 1 (vs mock direct) | {fmt(add_p99_c)} µs | {fmt(add_p99_b)} µs | ≤ 150 µs "
          f"{verdict(add_p99_c <= 150) if add_p99_c == add_p99_c else ''} |")
    p(f"| KiB RSS per open stream ((loaded − idle) / streams) | {fmt(per_stream, 1)} | | < 32 "
      f"{verdict(per_stream < 32) if per_stream == per_stream else ''} |")
    if a.sluice_rss_after_load:
        p(f"| Sluice RSS after steps 1-3 | {fmt(a.sluice_rss_after_load / 1024, 1)} MiB | | |")
    p("")
    print("\n".join(out))


if __name__ == "__main__":
    main()
