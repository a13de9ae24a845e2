"""Markdown table of benchmark JSON files: ``python -m bench.summary results/*.json``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

CASES = ("reference", "engine", "engine_concurrent", "service")


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _ratio_texts(r: dict[str, Any]) -> list[str]:
    """b/a, c/b, d/b: median (min-max) over the rounds when recorded, else the single value."""
    out = []
    for short, name in (("b/a", "engine_over_reference"), ("c/b", "concurrent_over_engine"),
                        ("d/b", "service_over_engine")):  # fmt: skip
        spread = r.get("ratio_rounds", {}).get(name)
        if spread:
            out.append(
                f"{short} = {spread['median']:.2f} ({spread['min']:.2f}-{spread['max']:.2f})"
            )
        else:
            out.append(f"{short} = {_num(r['ratios'][name], '.2f')}")
    return out


def summarise(results: list[dict[str, Any]]) -> str:
    """One row per (file, case): samples/s and seconds per certificate, plus the ratios
    (median and range over the interleaved rounds)."""
    lines = [
        "| device | model | case | samples/s | s/cert n=10k | s/cert n=100k |",
        "|---|---|---|---:|---:|---:|",
    ]
    ratios = []
    for r in results:
        label = r["model"] + (" (compiled)" if r["settings"].get("compile") else "")
        for case in CASES:
            rate = r[f"{case}_samples_per_s"]
            per = r["seconds_per_certificate"][case]
            lines.append(
                f"| {r['device']} | {label} | {case} | {_num(rate, ',.0f')} "
                f"| {_num(per['10000'], '.2f')} | {_num(per['100000'], '.2f')} |"
            )
        ratios.append(f"- {label}: " + ", ".join(_ratio_texts(r)))
    return "\n".join([*lines, "", *ratios])


def main(argv: list[str] | None = None) -> int:
    paths = [Path(p) for p in (sys.argv[1:] if argv is None else argv)]
    if not paths:
        print("usage: python -m bench.summary RESULT.json [...]", file=sys.stderr)
        return 2
    print(summarise([json.loads(p.read_text()) for p in paths]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
