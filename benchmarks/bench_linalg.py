"""Time the per-matrix work of svd and svd-llm (float64, as the engine runs it) on this machine.

    python -m benchmarks.bench_linalg [--sizes 512x512,1024x2752,4096x4096] [--repeat 3] [--device cpu]

For each (m, n): Gram whitening (Cholesky), whitened truncation at ratio 0.4 with each top-k routine
of :func:`methods._linalg.top_svd` (``svd``: full SVD; ``gram-eigh``: eigendecomposition of the smaller
Gram), and plain truncated SVD; median wall time over ``--repeat`` runs. This is the measurement behind
the per-device default routine (``methods._linalg.default_svd_driver``). LLaMA-7B has 224 target
matrices (4096x4096 and 11008x4096), so the per-matrix time at those sizes times 224 is the compression
cost of one ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from methods._linalg import rank_from_ratio, truncated_svd, whitened_truncate, whitening


def _time(fn, repeat: int, device: torch.device) -> float:
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench(m: int, n: int, repeat: int, device: torch.device) -> dict[str, float]:
    g = torch.Generator(device="cpu").manual_seed(0)
    w = torch.randn(m, n, generator=g, dtype=torch.float64).to(device)
    x = torch.randn(4 * n, n, generator=g, dtype=torch.float64).to(device)
    h = x.T @ x
    k = rank_from_ratio(m, n, 0.4)
    white = whitening(h)
    return {
        "whitening_s": _time(lambda: whitening(h), repeat, device),
        "whitened_truncate_svd_s": _time(lambda: whitened_truncate(w, white, k, driver="svd"), repeat, device),
        "whitened_truncate_gram_eigh_s": _time(lambda: whitened_truncate(w, white, k, driver="gram-eigh"), repeat, device),
        "plain_svd_s": _time(lambda: truncated_svd(w, k, driver="svd"), repeat, device),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="256x256,688x256,1024x1024,2048x2048")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    print(f"device={device} threads={torch.get_num_threads()} torch={torch.__version__}")
    print("| m x n | whitening (s) | whitened truncation, svd (s) | whitened truncation, gram-eigh (s) | plain SVD (s) |")
    print("|---|---|---|---|---|")
    for size in args.sizes.split(","):
        m, n = (int(v) for v in size.split("x"))
        r = bench(m, n, args.repeat, device)
        print(f"| {m}x{n} | {r['whitening_s']:.4f} | {r['whitened_truncate_svd_s']:.4f} | "
              f"{r['whitened_truncate_gram_eigh_s']:.4f} | {r['plain_svd_s']:.4f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
