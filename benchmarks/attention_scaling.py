"""Forward + backward time and peak memory of each attention kind as the sequence grows, in one run.

One multi-head attention layer (`models/attention.py`, bidirectional so every kind applies) at fixed
width d, batch 1, for n = 256 ... 8192. Printed: a table of milliseconds and peak MB per kind and n, the
growth ratio time(n) / time(n/2) (about 2 for linear cost, about 4 for quadratic), and each kind's
speed-up over full attention at the same n (the baseline, measured in the same run). `sliding` and
`bigbird` are computed blockwise (`blocked_attention`); `sliding-masked` and `bigbird-masked` are the same
patterns as a mask over the full n x n scores, the reference they are tested against.

Peak memory: on CUDA the allocator's peak; on CPU the process's peak resident set (VmHWM), reset before
each measurement through /proc/self/clear_refs, less the resident set before it. glibc is told to map
every block over 64 kB on its own (mallopt), so freed tensors leave the resident set at once and one
measurement does not reuse another's pages.

    python benchmarks/attention_scaling.py [--sizes 256 512 1024 2048 4096 8192 --d 64 --heads 1 --device cpu]
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import time
from pathlib import Path

import torch

from raycraft.models.attention import Attention

KINDS = ("full", "sliding", "bigbird", "performer", "linformer", "sliding-masked", "bigbird-masked")


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    raise KeyError(field)


def measure(kind: str, n: int, d: int, heads: int, device: torch.device, repeats: int) -> tuple[float, float]:
    """(median seconds of forward + backward, peak MB above the starting point)."""
    torch.manual_seed(0)
    layer = Attention(d, heads, kind.removesuffix("-masked"), causal=False, max_len=n, window=64, n_global=2,
                      n_random=2, n_features=64, proj_len=64, blockwise=not kind.endswith("-masked")).to(device)
    x = torch.randn(1, n, d, device=device, requires_grad=True)

    def run() -> None:
        layer(x).sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()

    run()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        base = _status_kb("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
        run()
        peak = (_status_kb("VmHWM") - base) / 1024
    return statistics.median(times), peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096, 8192])
    ap.add_argument("--d", type=int, default=64, help="model width (fixed)")
    ap.add_argument("--heads", type=int, default=1)
    ap.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cpu":
        ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD

    res: dict[tuple[str, int], tuple[float, float]] = {}
    for n in args.sizes:
        for kind in args.kinds:
            res[kind, n] = measure(kind, n, args.d, args.heads, device, args.repeats)
            print(f"  measured {kind:<10} n={n:<5} {res[kind, n][0] * 1e3:9.1f} ms {res[kind, n][1]:8.1f} MB",
                  flush=True)

    print(f"\nforward+backward, d={args.d}, heads={args.heads}, batch 1, {device}, {args.threads} thread(s)")
    print("ms / peak MB".ljust(12) + "".join(f"{k:>22}" for k in args.kinds))
    for n in args.sizes:
        print(f"n={n:<10}" + "".join(f"{res[k, n][0] * 1e3:>13.1f} {res[k, n][1]:>7.1f}MB" for k in args.kinds))
    print("\ngrowth time(n)/time(n/2): ~2 linear, ~4 quadratic")
    for a, b in zip(args.sizes, args.sizes[1:], strict=False):
        print(f"n={b:<10}" + "".join(f"{res[k, b][0] / res[k, a][0]:>22.2f}" for k in args.kinds))
    if "full" in args.kinds:
        print("\nspeed-up over full attention: time(full)/time(kind)")
        for n in args.sizes:
            print(f"n={n:<10}" + "".join(f"{res['full', n][0] / res[k, n][0]:>22.2f}" for k in args.kinds))


if __name__ == "__main__":
    main()
