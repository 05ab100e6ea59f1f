#!/usr/bin/env python3
"""Writes one scripts/bench.sh run into BENCHMARKS.md, and its chart.

    python3 scripts/bench_report.py RESULTS.jsonl BENCHMARKS.md

Reads RESULTS.jsonl: one JSON object a line, {"mode", "name", "run", "result"},
and optionally "date" (YYYY-MM-DD), as scripts/bench.sh writes them; mode
"floor" holds the floor scenarios. Writes:

- BENCHMARKS.md, between <!-- results:begin --> and <!-- results:end -->: one
  table per scenario, a row per mode (median of its runs, min–max in
  parentheses) and the row of the floor that bounds the scenario. The whole
  block is replaced: rows of another run are never kept beside these.
- docs/bench-p2p.svg, next to BENCHMARKS.md: CPU per message in p2p1k_r5000,
  a bar per mode, the relay floor marked. Only if p2p1k_r5000 was measured.

Standard library only. Prints the block it wrote.
"""
import html, json, os, statistics, sys

MODES = ["local-multi", "redis-pubsub", "redis-queue", "amqp-fanout", "amqp-routing", "nats-core", "nats-jetstream", "gateway"]
BASE = "local-multi"
# Each floor: the figure of its result that bounds a scenario, and how to read it.
FLOORS = {
    "floor_paced": ("cpu_us_per_write", "floor: kernel CPU µs per write"),
    "floor_batch16": ("cpu_us_per_delivery", "floor: kernel CPU µs per frame, 16 frames a write"),
    "floor_relay5000": ("cpu_us_per_delivery", "floor: event-loop CPU µs per relay hop"),
    "floor_accept": ("cpu_us_per_conn", "floor: event-loop CPU µs per accepted connection"),
}
# Each scenario: what it is, and its floor.
SCENARIOS = {
    "fanout2k_r0": ("2,000 members of one group over both nodes; 200 messages at once", "floor_batch16"),
    "fanout2k_r25": ("2,000 members; 200 messages paced at 25/s (50,000 deliveries/s)", "floor_paced"),
    "fanout10k_r0": ("10,000 members; 200 messages at once", "floor_batch16"),
    "fanout10k_r5": ("10,000 members; 200 messages paced at 5/s", "floor_paced"),
    "p2p1k_r0": ("1,000 sender → receiver pairs on different nodes; 100 messages each, at once", "floor_batch16"),
    "p2p1k_r5000": ("1,000 pairs on different nodes; 100 messages each, 5,000/s in all", "floor_relay5000"),
    "idle10k": ("10,000 idle connections", None),
    "idle19k": ("19,000 idle connections", None),
    "connect10k": ("10,000 connections opened, 200 in flight, each until its welcome", "floor_accept"),
}


def values(runs, key, sub=None):
    out = []
    for r in runs:
        v = r.get(key)
        if sub is not None:
            v = v.get(sub) if isinstance(v, dict) else None
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out.append(v)
    return out


def num(v):
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.1f}" if abs(v) >= 10 else f"{v:.2f}"


def median(runs, key, sub=None):
    vals = values(runs, key, sub)
    return statistics.median(vals) if vals else None


def spread(runs, key, sub=None, scale=1.0):
    """The median, with min–max when there are several runs."""
    vals = [v * scale for v in values(runs, key, sub)]
    if not vals:
        return "–"
    med = num(statistics.median(vals))
    return med if len(vals) == 1 else f"{med} ({num(min(vals))}–{num(max(vals))})"


def total(runs, key):
    return sum(values(runs, key))


def load(path):
    rows, dates, bad = {}, set(), 0
    for line in open(path):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            rows.setdefault(r["name"], {}).setdefault(r["mode"], []).append(r["result"])
        except (ValueError, KeyError, TypeError):
            bad += 1  # a run whose bench printed nothing
            continue
        if r.get("date"):
            dates.add(r["date"])
    if bad:
        print(f"skipped {bad} unreadable lines of {path}", file=sys.stderr)
    return rows, dates


def row(cells):
    return "| " + " | ".join(str(c) for c in cells) + " |"


def table(name, rows):
    what, floor = SCENARIOS[name]
    by_mode = rows[name]
    modes = [m for m in MODES if m in by_mode] + [m for m in by_mode if m not in MODES]
    if name.startswith(("fanout", "p2p")):
        unit = "message" if name.startswith("p2p") else "delivery"
        head = ["mode", "runs", f"CPU µs per {unit}", "× memory:2", "latency p50 / p99 / max (ms)", "lost", "dup"]
        base = median(by_mode.get(BASE, []), "cpu_us_per_delivery")

        def cells(runs):
            med = median(runs, "cpu_us_per_delivery")
            lat = [median(runs, "latency_us", p) for p in ("p50", "p99", "max")]
            return [spread(runs, "cpu_us_per_delivery"), f"{med / base:.2f}" if med is not None and base else "–",
                    " / ".join("–" if v is None else num(v / 1000) for v in lat),
                    total(runs, "lost"), total(runs, "duplicates")]
    elif name.startswith("idle"):
        head = ["mode", "runs", "RSS bytes per connection", "failed connections"]

        def cells(runs):
            return [spread(runs, "rss_bytes_per_conn"), total(runs, "failed")]
    else:
        head = ["mode", "runs", "CPU µs per connection", "connect p99 (ms)", "failed connections"]

        def cells(runs):
            return [spread(runs, "cpu_us_per_conn"), spread(runs, "connect_us", "p99", 1 / 1000),
                    total(runs, "failed")]
    out = [f"### {name}", "", what + ".", "", row(head), row(["---"] * len(head))]
    out += [row([m, len(by_mode[m])] + cells(by_mode[m])) for m in modes]
    floor_runs = rows.get(floor, {}).get("floor") if floor else None
    if floor_runs:
        key, label = FLOORS[floor]
        out.append(row([label, len(floor_runs), spread(floor_runs, key)] + [""] * (len(head) - 3)))
    failed = [f"{m} {total(by_mode[m], 'failed')}" for m in modes if total(by_mode[m], "failed")]
    if failed and "failed connections" not in head:
        out += ["", f"Connections that failed to open: {', '.join(failed)}."]
    return out + [""]


def chart(rows, path):
    """Horizontal bars: CPU µs per message in p2p1k_r5000, the relay floor marked."""
    by_mode = rows["p2p1k_r5000"]
    bars = [(m, median(by_mode[m], "cpu_us_per_delivery"))
            for m in MODES + [m for m in by_mode if m not in MODES] if m in by_mode]
    bars = [(m, v) for m, v in bars if v is not None]
    if not bars:
        return False
    floor = median(rows.get("floor_relay5000", {}).get("floor", []), "cpu_us_per_delivery")
    left, width, bar, gap, top = 100, 360, 18, 8, 44
    scale = width / (max([v for _, v in bars] + [floor or 0]) * 1.15)
    height = top + len(bars) * (bar + gap) + 10
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 70}" height="{height}" '
           f'font-family="sans-serif" font-size="12">',
           f'<rect width="100%" height="100%" fill="white"/>',
           f'<text x="{left}" y="16" font-weight="bold">p2p1k_r5000: server CPU µs per message (median)</text>']
    for i, (m, v) in enumerate(bars):
        y = top + i * (bar + gap)
        svg += [f'<text x="{left - 6}" y="{y + 13}" text-anchor="end">{html.escape(m)}</text>',
                f'<rect x="{left}" y="{y}" width="{v * scale:.1f}" height="{bar}" fill="#4a7ab5"/>',
                f'<text x="{left + v * scale + 4:.1f}" y="{y + 13}">{num(v)}</text>']
    if floor:
        x = left + floor * scale
        svg += [f'<line x1="{x:.1f}" y1="{top - 6}" x2="{x:.1f}" y2="{height - 6}" stroke="#c0392b" '
                f'stroke-width="1.5" stroke-dasharray="4 3"/>',
                f'<text x="{x:.1f}" y="{top - 10}" fill="#c0392b" text-anchor="middle">'
                f'floor: one relay hop, {num(floor)} µs</text>']
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(svg + ["</svg>", ""]))
    return True


def main(results, target):
    rows, dates = load(results)
    block = []
    if dates:
        lo, hi = min(dates), max(dates)
        when = f"on {lo}" if lo == hi else f"from {lo} to {hi}"
        block.append(f"Measured {when} by one `scripts/bench.sh` run.")
    block += ["Medians of each mode's runs, min–max in parentheses; lost and dup are totals over the runs. "
              "Each table ends with the floor measured in the same run (see \"The floor\"). "
              "× memory:2 is a mode's median CPU over local-multi's (two nodes in one process, `memory:2`).", ""]
    names = [n for n in SCENARIOS if n in rows]
    for name in names:
        block += table(name, rows)
    text = open(target).read()
    begin, end = "<!-- results:begin -->", "<!-- results:end -->"
    i, j = text.index(begin) + len(begin), text.index(end)
    with open(target, "w") as f:
        f.write(text[:i] + "\n" + "\n".join(block) + "\n" + text[j:])
    print("\n".join(block))
    print(f"wrote {len(names)} scenario tables into {target}")
    if "p2p1k_r5000" in rows:
        svg = os.path.join(os.path.dirname(os.path.abspath(target)), "docs", "bench-p2p.svg")
        if chart(rows, svg):
            print(f"wrote {svg}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
