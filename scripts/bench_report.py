#!/usr/bin/env python3
"""Renders results.jsonl (from scripts/bench.sh) as the tables of BENCHMARKS.md:
the median of the runs of each (mode, scenario), with the spread (min-max)."""
import json, statistics, sys

results, target = sys.argv[1], sys.argv[2]
rows = {}
for line in open(results):
    r = json.loads(line)
    rows.setdefault((r["mode"], r["name"]), []).append(r["result"])

def stat(runs, key, sub=None, fmt="{:.2f}"):
    vals = []
    for r in runs:
        v = r.get(key)
        if sub is not None and isinstance(v, dict):
            v = v.get(sub)
        if isinstance(v, (int, float)):
            vals.append(v)
    if not vals:
        return "-"
    med = statistics.median(vals)
    if len(vals) == 1:
        return fmt.format(med)
    return f"{fmt.format(med)} ({fmt.format(min(vals))}–{fmt.format(max(vals))})"

def ms(runs, sub):
    """A latency percentile in milliseconds."""
    as_ms = [{"latency_ms": {k: v / 1000 for k, v in (r.get("latency_us") or {}).items()}} for r in runs]
    return stat(as_ms, "latency_ms", sub, "{:.2f}")

order = ["floor_paced", "floor_burst", "floor_batch16", "floor_relay5000", "floor_accept",
         "fanout2k_r0", "fanout2k_r25", "fanout10k_r0", "fanout10k_r5", "p2p1k_r0", "p2p1k_r5000",
         "idle10k", "idle19k", "connect10k"]
modes = []
for (m, _) in rows:
    if m not in modes:
        modes.append(m)
out = []
for mode in modes:
    out.append(f"### {mode}\n")
    out.append("| scenario | runs | deliveries | lost | dup | deliveries/s | CPU µs per delivery | latency p50 / p99 / max (ms) | other |")
    out.append("|---|---|---|---|---|---|---|---|---|")
    for name in order:
        runs = rows.get((mode, name))
        if not runs:
            continue
        lost = sum(r.get("lost", 0) or 0 for r in runs)
        dup = sum(r.get("duplicates", 0) or 0 for r in runs)
        failed = sum(r.get("failed", 0) or 0 for r in runs)
        other = ""
        if name.startswith("idle"):
            other = f"RSS bytes/conn {stat(runs, 'rss_bytes_per_conn', fmt='{:.0f}')}"
        if name.startswith("connect"):
            other = f"CPU µs/conn {stat(runs, 'cpu_us_per_conn')}; connect p99 {stat(runs, 'connect_us', 'p99', '{:.0f}')} µs"
        if failed:
            other += f"; {failed} connections failed"
        if name == "floor_accept":
            other = f"event-loop CPU µs per accepted connection {stat(runs, 'cpu_us_per_conn')}"
            out.append(f"| {name} | {len(runs)} | - | - | - | - | - | - | {other} |")
        elif name == "floor_relay5000":
            other = f"event-loop CPU µs per relayed message {stat(runs, 'cpu_us_per_delivery')}"
            out.append(f"| {name} | {len(runs)} | {stat(runs, 'deliveries', fmt='{:.0f}')} | - | - | - | "
                       f"{stat(runs, 'cpu_us_per_delivery')} | - | {other} |")
        elif name.startswith("floor"):
            other = f"kernel CPU µs per write {stat(runs, 'cpu_us_per_write')}"
            out.append(f"| {name} | {len(runs)} | {stat(runs, 'deliveries', fmt='{:.0f}')} | - | - | - | "
                       f"{stat(runs, 'cpu_us_per_delivery')} | - | {other} |")
        elif name.startswith(("fanout", "p2p")):
            lat = f"{ms(runs, 'p50')} / {ms(runs, 'p99')} / {ms(runs, 'max')}"
            out.append(f"| {name} | {len(runs)} | {stat(runs, 'deliveries', fmt='{:.0f}')} | {lost} | {dup} | "
                       f"{stat(runs, 'deliveries_per_s', fmt='{:.0f}')} | {stat(runs, 'cpu_us_per_delivery')} | {lat} | {other} |")
        else:
            out.append(f"| {name} | {len(runs)} | - | - | - | - | - | - | {other} |")
    out.append("")

text = open(target).read()
begin, end = "<!-- results:begin -->", "<!-- results:end -->"
i, j = text.index(begin) + len(begin), text.index(end)
# Scenarios measured now replace their rows; the rows of scenarios (and the
# tables of modes) not measured this time stay as they were, so one mode or
# one scenario can be re-run on its own.
HEAD = ["| scenario | runs | deliveries | lost | dup | deliveries/s | CPU µs per delivery | latency p50 / p99 / max (ms) | other |",
        "|---|---|---|---|---|---|---|---|---|"]

def parse(lines):
    tables, mode = {}, None
    for line in lines:
        if line.startswith("### "):
            mode = line[4:].strip()
            tables[mode] = {}
        elif mode and line.startswith("| ") and not line.startswith("| scenario"):
            tables[mode][line.split("|")[1].strip()] = line
    return tables

old, new = parse(text[i:j].split("\n")), parse(out)
merged = []
for mode in list(old) + [m for m in new if m not in old]:
    rows_ = {**old.get(mode, {}), **new.get(mode, {})}
    names = [n for n in order if n in rows_] + [n for n in rows_ if n not in order]
    merged += [f"### {mode}", ""] + HEAD + [rows_[n] for n in names] + [""]
open(target, "w").write(text[:i] + "\n" + "\n".join(merged) + "\n" + text[j:])
print(f"wrote {sum(len(v) for v in rows.values())} runs into {target}")
