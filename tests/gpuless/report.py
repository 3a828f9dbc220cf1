"""Merge the GPU-less result rows, apply the rules, write the table and the README summary.

``python tests/gpuless/report.py ROWS.csv ... [--out bench/results/gpuless_resources.csv] [--readme README.md]``

Exit status 1, with one line per violation, when any row shows:

* a compile error (the ``error`` column);
* local-memory spills: ``STL``/``LDL`` in the SASS (``spills`` > 0) or a ``LOCAL`` size;
* a multi-tensor kernel (``vector_path``: the ALIGN=16 variants of the Triton kernels, the csrc
  bodies) without a 128-bit global load, or without a 128-bit store where it writes a list (the
  norms write one partial sum per block, not a list);
* a streaming kernel above :data:`MAX_STREAMING_REGISTERS` registers (on any toolchain).
"""

from __future__ import annotations

import argparse
import collections
import csv
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MAX_STREAMING_REGISTERS = 128
BEGIN, END = "<!-- gpuless:begin -->", "<!-- gpuless:end -->"


def _int(row, key):
    value = row.get(key)
    return int(value) if value not in (None, "") else 0


def writes_a_list(row) -> bool:
    return "norm" not in row["kernel"].lower() and "NormChunk" not in row["variant"]


def violations(rows: list[dict]) -> list[str]:
    found = []
    for r in rows:
        where = f"{r['kernel']} [{r['variant']}] {r['target']} {r['toolchain']}"
        if r.get("error"):
            found.append(f"{where}: compile error: {r['error']}")
            continue
        if _int(r, "spills") or _int(r, "local"):
            found.append(f"{where}: local-memory spills ({_int(r, 'spills')} STL/LDL, {_int(r, 'local')} B local)")
        if _int(r, "vector_path"):
            if not _int(r, "ldg128"):
                found.append(f"{where}: aligned multi-tensor path without a 128-bit load (LDG.E.128)")
            if writes_a_list(r) and not _int(r, "stg128"):
                found.append(f"{where}: aligned multi-tensor path without a 128-bit store (STG.E.128)")
        if _int(r, "streaming") and _int(r, "registers") > MAX_STREAMING_REGISTERS:
            found.append(f"{where}: {_int(r, 'registers')} registers > {MAX_STREAMING_REGISTERS} for a streaming kernel")
    return found


def summary(rows: list[dict]) -> str:
    """Markdown: per kernel x target x toolchain, the variant count and the worst figures."""
    groups = collections.OrderedDict()
    for r in rows:
        groups.setdefault((r["kernel"], r["toolchain"]), []).append(r)
    targets = sorted({r["target"] for r in rows}, reverse=True)
    toolchains = sorted({r["toolchain"] for r in rows})
    lines = ["| kernel | toolchain | variants | " + " | ".join(f"registers {t} (max)" for t in targets) +
             " | spills | shared (B, max) | widest load / store (bits) |",
             "| --- | --- | ---: | " + " | ".join("---:" for _ in targets) + " | ---: | ---: | --- |"]
    for (kernel, tool), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], toolchains.index(kv[0][1]))):
        ok = [r for r in rs if not r.get("error")]
        regs = []
        for t in targets:
            vals = [_int(r, "registers") for r in ok if r["target"] == t]
            regs.append(f"{min(vals)}-{max(vals)}" if vals and min(vals) != max(vals) else (str(vals[0]) if vals else "-"))
        n_variants = len({r["variant"] for r in rs})
        spills = sum(_int(r, "spills") for r in ok)
        shared = max((_int(r, "shared") for r in ok), default=0)
        load = max((_int(r, "widest_load") for r in ok), default=0)
        store = max((_int(r, "widest_store") for r in ok), default=0)
        errors = len(rs) - len(ok)
        lines.append(f"| `{kernel}` | {tool} | {n_variants}{f' ({errors} failed)' if errors else ''} | "
                     + " | ".join(regs) + f" | {spills} | {shared} | {load} / {store} |")
    return "\n".join(lines)


def update_readme(readme: Path, block: str) -> bool:
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        return False
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{BEGIN}\n{block}\n{END}{tail}")
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rows", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gpuless_resources.csv")
    parser.add_argument("--readme", type=Path, default=None)
    parser.add_argument("--header", default="", help="a line above the README table (versions, date)")
    args = parser.parse_args(argv)
    rows, fields = [], None
    for path in args.rows:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            fields = fields or reader.fieldnames
            rows.extend(reader)
    expected_toolchains = {r["toolchain"] for r in rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    table = summary(rows)
    print(table)
    if args.readme is not None:
        block = (f"{args.header}\n\n" if args.header else "") + table
        if not update_readme(args.readme, block):
            print(f"gpuless: {args.readme} has no {BEGIN} ... {END} block to update", file=sys.stderr)
    bad = violations(rows)
    for line in bad:
        print(f"gpuless: FAIL {line}")
    print(f"gpuless: {len(rows)} rows ({', '.join(sorted(expected_toolchains))}) -> {args.out}; "
          f"{len(bad)} violation(s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
