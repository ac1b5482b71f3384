#!/usr/bin/env python3
"""Puts a "before" relay run beside an "after" run of wakewire-loadtest compare.

    merge_reports.py AFTER/report.md BEFORE/report.md

Both runs use the same parameters (the before one with --target relay
--relay-bin <old binary>). Prints the after run's header and one table:
metric | floor | relay before | relay after | after/floor | target | verdict,
the verdict being the after run's. Rows only one run has show "-" for the other.
"""
import sys


def table(path):
    head, rows = [], {}
    order = []
    for line in open(path):
        line = line.rstrip("\n")
        if line.startswith("| metric") or line.startswith("|---"):
            continue
        if line.startswith("| "):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells
            order.append(cells[0])
        elif not rows:
            head.append(line)
    return head, rows, order


after_head, after, order = table(sys.argv[1])
_, before, border = table(sys.argv[2])
print("\n".join(after_head).rstrip())
print(f"- before: the same command with `--target relay --relay-bin <the relay before the change>` ({sys.argv[2]})")
# scripts/bench.sh notes which of the two ran first.
for line in open(sys.argv[2]):
    if line.startswith("- order:"):
        print(line.rstrip("\n"))
print()
print("| metric | floor (raw quinn) | relay before | relay after | after/floor | target | verdict |")
print("|---|---|---|---|---|---|---|")
for name in order + [n for n in border if n not in after]:
    a = after.get(name)
    b = before.get(name)
    floor = a[1] if a else "-"
    prev = b[2] if b else "-"
    now = a[2] if a else "-"
    ratio = a[3] if a else "-"
    target = a[4] if a and len(a) > 4 else ""
    verdict = a[5] if a and len(a) > 5 else ""
    print(f"| {name} | {floor} | {prev} | {now} | {ratio} | {target} | {verdict} |")
