#!/usr/bin/env python3
"""MPI collectives against the in-process backend, alternated (BENCHMARKS.md): this binary under
mpirun through MPI's messages (DEEPSCALE_MPI_SHM=0, or PREVIOUS_BINARY when given), this binary
under mpirun (shared memory for one-node groups), and its in-process ranks.
Usage: scripts/bench-comm-mpi.py [PREVIOUS_BINARY] (built with the `mpi` feature)."""
import sys
import json, subprocess, os, collections
PREV = sys.argv[1] if len(sys.argv) > 1 else None
NEW = "./target/release/deepscale"
env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
def run(cmd, extra={}):
    p = subprocess.run(cmd, capture_output=True, text=True, env=dict(env, **extra))
    lines = [l for l in p.stdout.splitlines() if l.startswith("{")]
    if not lines:
        sys.exit(f"{' '.join(cmd)} failed:\n{p.stderr}")
    return {(r["op"], r["mib"]): r["busbw_gbps"] for r in json.loads(lines[-1])["results"]}
args = ["bench", "comm", "--sizes-mib", "4,16,64", "--iters", "10", "--json"]
mpirun = lambda n, b: ["mpirun", "-np", str(n), "--oversubscribe", "--bind-to", "none", b] + args
res = collections.defaultdict(list)
for rnd in range(2):
    for n in (2, 4):
        for name, cmd, extra in [
            ("before", mpirun(n, PREV or NEW), {} if PREV else {"DEEPSCALE_MPI_SHM": "0"}),
            ("new", mpirun(n, NEW), {}),
            ("inproc", [NEW] + args + ["--world-size", str(n)], {}),
        ]:
            for k, v in run(cmd, extra).items():
                res[(n, name) + k].append(v)
before = f"MPI {PREV}" if PREV else "MPI messages"
print(f"| ranks | collective | MiB | {before} (2 runs) | MPI now (2 runs) | in-process (2 runs) | now / before | now / in-process |")
print("|---:|---|---:|---:|---:|---:|---:|---:|")
for n in (2, 4):
    for op in ("reduce_scatter", "all_reduce", "all_gather", "broadcast"):
        for mib in (4, 16, 64):
            p, w, i = (res[(n, s, op, mib)] for s in ("before", "new", "inproc"))
            f = lambda v: " / ".join("%.2f" % x for x in v)
            print(f"| {n} | {op} | {mib} | {f(p)} | {f(w)} | {f(i)} | {sum(w)/sum(p):.2f}x | {sum(w)/sum(i):.2f}x |")
