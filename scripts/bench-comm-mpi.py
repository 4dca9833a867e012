#!/usr/bin/env python3
"""MPI collectives against the in-process backend and a previous binary, alternated (the
BENCHMARKS.md session 14 table). Usage: scripts/bench-comm-mpi.py [PREVIOUS_BINARY]."""
import sys
import json, subprocess, os, collections
PREV = sys.argv[1] if len(sys.argv) > 1 else "/tmp/deepscale-prev"
env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
def run(cmd):
    out = subprocess.run(cmd, capture_output=True, text=True, env=env).stdout
    line = [l for l in out.splitlines() if l.startswith("{")][-1]
    return {(r["op"], r["mib"]): r["busbw_gbps"] for r in json.loads(line)["results"]}
res = collections.defaultdict(list)
for rnd in range(2):
    for n in (2, 4):
        for name, cmd in [
            ("prev", ["mpirun","-np",str(n),"--oversubscribe","--bind-to","none",PREV,"bench","comm","--sizes-mib","4,16,64","--iters","10","--json"]),
            ("new", ["mpirun","-np",str(n),"--oversubscribe","--bind-to","none","./target/release/deepscale","bench","comm","--sizes-mib","4,16,64","--iters","10","--json"]),
            ("inproc", ["./target/release/deepscale","bench","comm","--world-size",str(n),"--sizes-mib","4,16,64","--iters","10","--json"]),
        ]:
            for k, v in run(cmd).items():
                res[(n, name) + k].append(v)
print("| ranks | collective | MiB | MPI before (2 runs) | MPI now (2 runs) | in-process (2 runs) | now / before | now / in-process |")
print("|---:|---|---:|---:|---:|---:|---:|---:|")
for n in (2, 4):
    for op in ("reduce_scatter", "all_reduce", "all_gather"):
        for mib in (4, 16, 64):
            p, w, i = (res[(n, s, op, mib)] for s in ("prev", "new", "inproc"))
            f = lambda v: " / ".join("%.2f" % x for x in v)
            print(f"| {n} | {op} | {mib} | {f(p)} | {f(w)} | {f(i)} | {sum(w)/sum(p):.2f}x | {sum(w)/sum(i):.2f}x |")
