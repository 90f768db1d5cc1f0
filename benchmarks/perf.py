"""Engine performance at real LLM shapes (random weights), stage by stage, against each stage's floor.

    python -m benchmarks.perf --shape llama-2-7b --blocks 32 --calib-samples 256 --calib-seqlen 2048   # GPU
    python -m benchmarks.perf --shape scaled --blocks 4,8,16 --calib-samples 8 --calib-seqlen 256       # CPU

For each block count it builds a Llama of the named shape with random weights in memory (no checkpoint
on disk), random calibration tokens, and runs the engine's own stages:

* ``capture``: block-0 inputs of the calibration windows (embeddings on the device);
* ``statistics``: the dense pass that stores one Gram per distinct input per block;
* ``allocation``: svd-llm's uniform allocation;
* ``factorization``: svd-llm compression read back from the store, block by block, on the device;
* ``fused``: statistics and compression in one pass (what the first cell of a run does);
* ``evaluation``: perplexity of the compressed model on random windows (resident, or block-streamed
  when the model does not fit on the device).

Per stage: wall time, peak host RSS (sampled every 5 ms), peak device memory (CUDA allocator), and a
floor: the stage's counted FLOPs over this device's matmul rate and its bytes over the copy and disk
bandwidths, all measured at the start of the same run (the floor is the larger of the two: perfect
overlap). The FLOP counts are written out below; eigendecomposition and Cholesky are counted at their
textbook operation counts, which no routine reaches at matmul speed, so the factorization floor is
optimistic by construction.

Results go to ``--out`` (JSON) and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from harness.cache import cache_root
from harness.engine.capture import capture_block_inputs
from harness.engine.compress import compress_model, restore
from harness.engine.models import count_params, discover
from harness.engine.offload import placement, resident, streamed_logits
from harness.engine.statistics import CalibrationStatistics
from harness.evaluations.perplexity import perplexity
from methods import parse_method
from methods.statistics import InputGram

log = logging.getLogger("benchmarks.perf")

SHAPES: dict[str, dict[str, int]] = {
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                       vocab_size=32000),
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                       vocab_size=128256),
    "llama-2-70b": dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8,
                        vocab_size=32000),
    # A 7B-like shape scaled down so that float64 factorization fits a small CPU budget.
    "scaled": dict(hidden_size=1024, intermediate_size=2816, num_attention_heads=16, num_key_value_heads=16,
                   vocab_size=32000),
}


# -- measurement helpers ---------------------------------------------------------------------------
class RssSampler:
    """Peak resident set size of this process between :meth:`reset` calls (sampled every 5 ms)."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def current() -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self.current())

    def reset(self) -> None:
        self.peak = self.current()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Any, device: torch.device, repeat: int = 3) -> float:
    fn()
    _sync(device)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def measure_rates(device: torch.device, dtype: torch.dtype, size: int) -> dict[str, float]:
    """Matmul FLOP/s in the model dtype, float32 and float64; host->device, device->host and disk bytes/s."""
    rates: dict[str, float] = {}
    for name, dt in (("matmul_model_dtype", dtype), ("matmul_float32", torch.float32), ("matmul_float64", torch.float64)):
        a = torch.randn(size, size, device=device, dtype=dt)
        rates[name] = 2 * size**3 / _timed(lambda a=a: a @ a, device)
    host = torch.randn(64 << 20 // 4)  # 64 MiB of float32
    if device.type == "cuda":
        dev = host.to(device)
        rates["host_to_device"] = host.numel() * 4 / _timed(lambda: host.to(device), device)
        rates["device_to_host"] = host.numel() * 4 / _timed(lambda: dev.cpu(), device)
    else:
        rates["host_to_device"] = rates["device_to_host"] = host.numel() * 4 / _timed(host.clone, device)
    scratch = cache_root()
    scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=scratch, delete=True) as fh:
        payload = host.numpy().tobytes()

        def write() -> None:  # buffered, like the store's writes (no fsync: the page cache absorbs them)
            fh.seek(0)
            fh.write(payload)
            fh.flush()

        rates["disk_write"] = len(payload) / _timed(write, torch.device("cpu"), repeat=2)
    return rates


@dataclass
class Stage:
    name: str
    seconds: float = 0.0
    peak_rss: int = 0
    rss_before: int = 0
    peak_device: int | None = None
    high_water: int = 0  # the process's RSS high-water mark (ru_maxrss) at the end of the stage
    flops: float = 0.0
    flop_rate_key: str = "matmul_model_dtype"
    bytes_moved: dict[str, float] = field(default_factory=dict)  # rate key -> bytes

    def floor(self, rates: dict[str, float]) -> dict[str, float]:
        compute = self.flops / rates[self.flop_rate_key] if self.flops else 0.0
        transfer = sum(b / rates[k] for k, b in self.bytes_moved.items())
        return {"compute_s": compute, "transfer_s": transfer, "floor_s": max(compute, transfer)}


@contextmanager
def stage(name: str, sampler: RssSampler, device: torch.device, out: list[Stage]) -> Iterator[Stage]:
    st = Stage(name)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sampler.reset()
    st.rss_before = sampler.current()
    t0 = time.perf_counter()
    yield st
    _sync(device)
    st.seconds = time.perf_counter() - t0
    st.peak_rss = sampler.peak
    st.high_water = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    st.peak_device = int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None
    out.append(st)
    log.info("%s: %.2f s, peak RSS %.2f GB", name, st.seconds, st.peak_rss / 1e9)


# -- FLOP and byte counts --------------------------------------------------------------------------
def forward_flops(cfg: dict[str, int], blocks: int, tokens: int, seqlen: int) -> float:
    """Decoder blocks only: 2 * params * tokens for the linears plus causal attention
    (QK^T and AV, 4 * tokens * seqlen * hidden, halved by the causal mask)."""
    d, f = cfg["hidden_size"], cfg["intermediate_size"]
    kv = d * cfg["num_key_value_heads"] // cfg["num_attention_heads"]
    linear = 2 * d * d + 2 * d * kv + 3 * d * f
    return blocks * (2 * linear * tokens + 2 * tokens * seqlen * d)


def gram_flops(cfg: dict[str, int], blocks: int, tokens: int) -> float:
    """One Gram per distinct input of a Llama block (q/k/v, o, gate/up: width d; down: width f)."""
    d, f = cfg["hidden_size"], cfg["intermediate_size"]
    return blocks * 2 * tokens * (3 * d * d + f * f)


def factorization_flops(cfg: dict[str, int], blocks: int, ratio: float) -> float:
    """svd-llm per matrix W (m x n), rank k, s = min(m, n): Cholesky n^3/3 (once per distinct input),
    W T 2 m n^2, the Gram of W T 2 m n s, its eigendecomposition ~ (4/3 + 2) s^3, U = M V 2 m n k,
    B = (S V^T) T^-1 k n^2, the calibration error terms 4 m n^2 (record only)."""
    d, f = cfg["hidden_size"], cfg["intermediate_size"]
    kv = d * cfg["num_key_value_heads"] // cfg["num_attention_heads"]
    mats = [(d, d), (kv, d), (kv, d), (d, d), (f, d), (f, d), (d, f)]
    total = 0.0
    for m, n in mats:
        s, k = min(m, n), int((1 - ratio) * m * n / (m + n))
        total += 2 * m * n * n + 2 * m * n * s + (10 / 3) * s**3 + 2 * m * n * k + k * n * n + 4 * m * n * n
    total += 3 * d**3 / 3 + f**3 / 3  # Choleskys of the distinct inputs (q/k/v, o, gate/up: d; down: f)
    return blocks * total


def block_param_bytes(cfg: dict[str, int], dtype_bytes: int) -> float:
    d, f = cfg["hidden_size"], cfg["intermediate_size"]
    kv = d * cfg["num_key_value_heads"] // cfg["num_attention_heads"]
    return (2 * d * d + 2 * d * kv + 3 * d * f) * dtype_bytes


def gram_bytes(cfg: dict[str, int]) -> float:
    d, f = cfg["hidden_size"], cfg["intermediate_size"]
    return (3 * d * d + f * f) * 8.0


# -- the run ---------------------------------------------------------------------------------------
def build_model(shape: str, blocks: int, dtype: torch.dtype) -> torch.nn.Module:
    """Random-weight Llama of the named shape (weights drawn N(0, 0.02), no checkpoint)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(num_hidden_layers=blocks, max_position_embeddings=4096, **SHAPES[shape])
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are created in the model dtype: no float32 copy of a 70B model
    try:
        model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def _stored_path(args: argparse.Namespace, model: torch.nn.Module, layout: Any, method: Any, source: CalibrationStatistics,
                 sampler: RssSampler, device: torch.device, stages: list[Stage], cfg: dict[str, int], blocks: int,
                 tokens: int, dtype_bytes: int) -> float:
    """The statistics pass, then compression read back from the store; returns the allocation time."""
    with stage("statistics", sampler, device, stages) as st:
        source.compute([InputGram()])
        st.flops = forward_flops(cfg, blocks, tokens, args.calib_seqlen) + gram_flops(cfg, blocks, tokens)
        st.flop_rate_key = "matmul_float32" if source.product and source.product.mode == "float32" else "matmul_model_dtype"
        st.bytes_moved = {"host_to_device": blocks * block_param_bytes(cfg, dtype_bytes),
                          "device_to_host": blocks * gram_bytes(cfg), "disk_write": blocks * gram_bytes(cfg)}
    with stage("allocation+factorization", sampler, device, stages) as st:
        result = compress_model(model, layout, method, args.ratio, source)
        st.flops = factorization_flops(cfg, blocks, args.ratio)
        st.flop_rate_key = "matmul_float64"
        st.bytes_moved = {"host_to_device": blocks * (gram_bytes(cfg) + block_param_bytes(cfg, dtype_bytes))}
    restore(model, result)
    return result.timings_s.get("allocation", 0.0)


def run_one(args: argparse.Namespace, blocks: int, device: torch.device, dtype: torch.dtype,
            rates: dict[str, float], sampler: RssSampler) -> dict[str, Any]:
    cfg = SHAPES[args.shape]
    dtype_bytes = torch.tensor([], dtype=dtype).element_size()
    stages: list[Stage] = []
    sampler.reset()
    rss0 = sampler.current()
    model = build_model(args.shape, blocks, dtype)
    layout = discover(model)
    weights_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    g = torch.Generator().manual_seed(0)
    calib = torch.randint(0, cfg["vocab_size"], (args.calib_samples, args.calib_seqlen), generator=g)
    tokens = calib.numel()
    method = parse_method("svd-llm")
    cache_root().mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="perf-stats-", dir=cache_root()))

    def batches():
        return capture_block_inputs(model, layout, calib, device, batch_size=args.batch_size)

    with stage("capture", sampler, device, stages) as st:
        captured = batches()
        st.bytes_moved = {"host_to_device": tokens * cfg["hidden_size"] * dtype_bytes}
    del captured
    alloc_s = 0.0
    source = CalibrationStatistics.in_directory(model, layout, batches, device, root / "warm")
    if args.stages == "all":
        alloc_s = _stored_path(args, model, layout, method, source, sampler, device, stages, cfg, blocks, tokens, dtype_bytes)
    fused_source = CalibrationStatistics.in_directory(model, layout, batches, device, root / "fused")
    with stage("fused statistics+compression", sampler, device, stages) as st:
        result = compress_model(model, layout, method, args.ratio, fused_source)
        st.flops = (forward_flops(cfg, blocks, tokens, args.calib_seqlen) + gram_flops(cfg, blocks, tokens)
                    + factorization_flops(cfg, blocks, args.ratio))
        st.flop_rate_key = "matmul_float64"
        st.bytes_moved = {"host_to_device": blocks * block_param_bytes(cfg, dtype_bytes),
                          "device_to_host": blocks * gram_bytes(cfg), "disk_write": blocks * gram_bytes(cfg)}
    compressed_params = count_params(model)
    eval_ids = torch.randint(0, cfg["vocab_size"], (args.eval_windows * args.eval_seqlen,), generator=g)
    where = placement(model, device, args.eval_offload)
    with stage(f"evaluation ({where})", sampler, device, stages) as st:
        if where == "resident":
            with resident(model, device):
                ppl = perplexity(model, eval_ids, args.eval_seqlen, device, args.eval_batch_size)
        else:
            ppl = perplexity(model, eval_ids, args.eval_seqlen, device, args.eval_batch_size,
                             forward=streamed_logits(model, layout, device))
        ev_tokens = args.eval_windows * args.eval_seqlen
        st.flops = (forward_flops(cfg, blocks, ev_tokens, args.eval_seqlen) * (1 - args.ratio)
                    + 2 * ev_tokens * cfg["hidden_size"] * cfg["vocab_size"])
        st.bytes_moved = {"host_to_device": compressed_params * dtype_bytes}
    restore(model, result)
    return {
        "blocks": blocks,
        "weights_bytes": weights_bytes,
        "compressed_factor_bytes": result.params_compressed * dtype_bytes,
        "gram_bytes_per_block": gram_bytes(cfg),
        "rss_before_model": rss0,
        "calibration_tokens": tokens,
        "allocation_s": alloc_s,
        "gram_product": fused_source.product_mode(),
        "perplexity_random_tokens": ppl["ppl"],
        "stages": [
            {"stage": s.name, "seconds": s.seconds, "peak_rss": s.peak_rss, "rss_before": s.rss_before,
             "peak_device": s.peak_device, "high_water_rss": s.high_water, "flops": s.flops, "rate": s.flop_rate_key, "bytes": s.bytes_moved,
             **s.floor(rates)}
            for s in stages
        ],
    }


def markdown(report: dict[str, Any]) -> str:
    lines = ["| blocks | stage | wall (s) | floor (s) | wall / floor | peak RSS (GB) | peak device (GB) |",
             "|---|---|---|---|---|---|---|"]
    for run in report["runs"]:
        for s in run["stages"]:
            ratio = s["seconds"] / s["floor_s"] if s["floor_s"] else float("nan")
            dev = "-" if s["peak_device"] is None else f"{s['peak_device'] / 1e9:.2f}"
            lines.append(f"| {run['blocks']} | {s['stage']} | {s['seconds']:.2f} | {s['floor_s']:.3f} | {ratio:.1f} | "
                         f"{s['peak_rss'] / 1e9:.2f} | {dev} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="scaled", choices=sorted(SHAPES))
    p.add_argument("--blocks", default="4", help="comma-separated block counts, e.g. 4,8,16")
    p.add_argument("--calib-samples", type=int, default=8)
    p.add_argument("--calib-seqlen", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--ratio", type=float, default=0.4)
    p.add_argument("--eval-windows", type=int, default=4)
    p.add_argument("--eval-seqlen", type=int, default=256)
    p.add_argument("--eval-batch-size", type=int, default=4)
    p.add_argument("--eval-offload", default="auto", choices=("auto", "never", "always"))
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", help="float16, bfloat16 or float32 (auto: float16 on cuda, float32 on cpu)")
    p.add_argument("--rate-size", type=int, default=2048, help="matrix size of the matmul-rate measurement")
    p.add_argument("--stages", default="all", choices=("all", "fused"),
                   help="fused: only capture, the fused statistics+compression pass and evaluation (memory scaling runs)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    dtype = getattr(torch, args.dtype) if args.dtype != "auto" else (torch.float16 if device.type == "cuda" else torch.float32)
    rates = measure_rates(device, dtype, args.rate_size)
    log.info("rates: %s", {k: f"{v:.3g}" for k, v in rates.items()})
    sampler = RssSampler()
    runs = [run_one(args, int(b), device, dtype, rates, sampler) for b in args.blocks.split(",")]
    sampler.stop()
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()}, "
                  f"{torch.get_num_threads()} threads, {os.cpu_count()} cores)",
        "torch": torch.__version__, "dtype": str(dtype).removeprefix("torch."), "shape": args.shape,
        "config": SHAPES[args.shape], "args": {k: str(v) for k, v in vars(args).items()}, "rates": rates, "runs": runs,
    }
    print(markdown(report))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
