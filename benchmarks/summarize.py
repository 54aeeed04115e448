"""Turn pytest-benchmark JSON files into the Markdown tables of benchmarks/README.md.

Usage: ``python benchmarks/summarize.py results/cpu-*.json``. For each benchmark group it prints the
median, min and max of every implementation and the ratio of each other implementation's median to the
first ``ours``-like implementation's median (ratios > 1 mean ours is faster), all measured in the same
process.
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict

OURS = ("ours", "concept_ext", "ours_op", "sparse", "batched")


def _impl(bench: dict) -> str:
    params = bench.get("params") or {}
    for key in ("impl", "implementation", "variant", "method"):
        if key in params:
            return str(params[key])
    name = bench["name"]
    return name[name.find("[") + 1:name.rfind("]")] if "[" in name else name


def summarize(paths: list[str]) -> str:
    groups: dict[str, list[tuple[str, dict]]] = defaultdict(list)
    machine = ""
    for path in paths:
        data = json.load(open(path))
        mi = data.get("machine_info", {})
        machine = f"{mi.get('cpu', {}).get('brand_raw', '?')}, {mi.get('cpu', {}).get('count', '?')} cores"
        for b in data["benchmarks"]:
            stats = dict(b["stats"], extra=b.get("extra_info", {}))
            groups[b.get("group") or b["name"]].append((_impl(b), stats))
    out = [f"machine: {machine}", ""]
    for group, rows in sorted(groups.items()):
        ours = next((s for i, s in rows if i.split("-")[0] in OURS), rows[0][1])
        out.append(f"**{group}**")
        out.append("")
        out.append("| implementation | median ms | min ms | max ms | rounds | median / ours |")
        out.append("|---|--:|--:|--:|--:|--:|")
        for impl, s in rows:
            ratio = s["median"] / ours["median"] if ours["median"] else float("nan")
            out.append(f"| {impl} | {s['median'] * 1e3:.2f} | {s['min'] * 1e3:.2f} | {s['max'] * 1e3:.2f} "
                       f"| {s['rounds']} | {ratio:.2f}× |")
        # Load-robust ratios from call-by-call alternation in the same test (bench_peers.py).
        for impl, s in rows:
            inter = {k: v for k, v in s["extra"].items() if k.startswith("interleaved_")}
            if inter:
                out.append("")
                out.append(f"interleaved with `{impl}`: " + ", ".join(
                    f"{k[len('interleaved_'):]} {v:.2f}×" for k, v in sorted(inter.items())))
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    print(summarize(sys.argv[1:]))
