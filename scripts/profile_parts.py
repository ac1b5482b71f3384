#!/usr/bin/env python3
"""Splits a relay profile (folded stacks from scripts/profile.sh with
PERF_CALLGRAPH="--call-graph dwarf,32768") into the parts docs/perf.md names.

    profile_parts.py BEFORE/stacks.folded AFTER/stacks.folded

A sample on the store thread is the store's; on a tokio worker it goes to the
task it ran in (the first frame of ours, quinn's, hyper's, h2's or tonic's
below the task's poll); the rest is scheduling and other.
"""
import collections
import sys

PARTS = [
    ("store thread (redb commit, fsync, B-tree)", None),
    ("gRPC (tonic connection, h2 streams, the publish handler)", ["tonic", "hyper", "h2::", "publish::"]),
    ("QUIC connection and endpoint drivers (quinn)", ["quinn"]),
    ("device connection tasks (ours)", ["device_conn", "wakewire_proto", "wakewire_server"]),
]
OTHER = "scheduling, allocator, other"


def shares(path):
    counts = collections.Counter()
    total = 0
    for line in open(path):
        stack, _, n = line.rstrip().rpartition(" ")
        n = int(n)
        total += n
        frames = stack.split(";")
        if frames[0] == "wakewire-store":
            counts[PARTS[0][0]] += n
            continue
        polls = [i for i, f in enumerate(frames) if "Core<T,S>::poll" in f or "poll_future" in f]
        rest = frames[polls[-1] + 1:] if polls else []
        part = OTHER
        for f in rest:
            hit = next((name for name, keys in PARTS[1:] if any(k in f for k in keys)), None)
            if hit:
                part = hit
                break
        counts[part] += n
    return {k: 100.0 * v / total for k, v in counts.items()}


before, after = shares(sys.argv[1]), shares(sys.argv[2])
print("| part | share of relay CPU, before | after |")
print("|---|---|---|")
for name in [p[0] for p in PARTS] + [OTHER]:
    print(f"| {name} | {before.get(name, 0):.0f}% | {after.get(name, 0):.0f}% |")
