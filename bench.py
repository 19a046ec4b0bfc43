"""
Benchmark the delta-rule scan: chunkwise-parallel vs the token loop, forward + backward.

    python bench.py                 # T = 256, 1024, 4096; batch 8, 4 state heads, d_k = r = 8
    python bench.py --T=1024 --repeats=5

Prints a table and writes bench.json (with the machine it ran on).
"""
import json
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F

from nanodeltamem import delta_rule_scan


def machine():
    info = dict(platform=platform.platform(), processor=platform.processor() or platform.machine(),
                cpu_cores=os.cpu_count(), torch_threads=torch.get_num_threads(), torch=torch.__version__)
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def inputs(B, H, T, dk, r, gates, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, H, T, dk, generator=g), dim=-1)
    k = F.normalize(torch.randn(B, H, T, dk, generator=g), dim=-1)
    v = torch.randn(B, H, T, r, generator=g)
    beta = torch.sigmoid(torch.randn(B, H, T, r if gates == "rowwise" else 1, generator=g) - 1.5)
    return [x.to(device).requires_grad_(True) for x in (q, k, v, beta)]


def time_fwd_bwd(xs, chunk_size, repeats, device):
    def once():
        read, S = delta_rule_scan(*xs, chunk_size=chunk_size)
        (read.square().mean() + S.square().mean()).backward()
        if device == "cuda":
            torch.cuda.synchronize()
    once()                                                               # warm up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        once()
        best = min(best, time.perf_counter() - t)
    return best


def scan_bench(Ts=(256, 1024, 4096), B=8, H=4, dk=8, r=8, chunk_size=8, repeats=3, device="cpu"):
    rows = []
    for gates in ("rowwise", "scalar"):
        for T in Ts:
            xs = inputs(B, H, T, dk, r, gates, device)
            rec = time_fwd_bwd(xs, None, max(1, repeats - 1), device)
            chk = time_fwd_bwd(xs, chunk_size, repeats, device)
            rows.append(dict(gates=gates, T=T, recurrent_ms=1000 * rec, chunkwise_ms=1000 * chk, speedup=rec / chk))
            print(f"  {gates:8s} T={T:5d}: token loop {1000 * rec:8.1f} ms | chunkwise (C={chunk_size}) "
                  f"{1000 * chk:7.1f} ms | {rec / chk:5.1f}x", flush=True)
    return rows


def main(argv):
    args = dict(T="256,1024,4096", repeats=3, chunk_size=8, device="cuda" if torch.cuda.is_available() else "cpu")
    for a in argv:
        key, _, val = a.lstrip("-").partition("=")
        if key not in args:
            print(f"error: unknown option --{key}; valid: {', '.join('--' + k for k in args)}", file=sys.stderr)
            sys.exit(2)
        args[key] = val
    try:
        Ts = tuple(int(t) for t in str(args["T"]).split(","))
        repeats, chunk = int(args["repeats"]), int(args["chunk_size"])
        if min(Ts) < 1 or repeats < 1 or chunk < 1:
            raise ValueError
    except ValueError:
        print("error: --T takes positive ints (e.g. 256,1024), --repeats and --chunk_size positive ints",
              file=sys.stderr)
        sys.exit(2)
    info = machine()
    print(f"delta-rule scan, forward + backward, batch 8, 4 state heads, d_k = r = 8 on "
          f"{info.get('gpu', str(info['cpu_cores']) + ' CPU cores')} (torch {info['torch']})")
    rows = scan_bench(Ts, chunk_size=chunk, repeats=repeats, device=args["device"])
    out = dict(machine=info, scan=rows)
    for row in rows:
        if row["T"] == 1024:
            out["scan_speedup_T1024" if row["gates"] == "rowwise" else "scan_speedup_T1024_scalar"] = row["speedup"]
    with open("bench.json", "w") as f:
        json.dump(out, f, indent=1)
    print("wrote bench.json")


if __name__ == "__main__":
    main(sys.argv[1:])
