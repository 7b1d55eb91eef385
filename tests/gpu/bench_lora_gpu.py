"""Times the LoRA GPU kernels (tests/gpu/harness.cu.cc over core/kernels/lora_gpu.cu.cc) against PyTorch on
the same GPU, in one run, calls interleaved, and prints one table (no TensorFlow needed).

- merge and apply: as a fraction of the bandwidth a device copy reaches in the same run (their memory
  traffic: w read and written; x and y read, y written).
- batched apply (multi-adapter), bfloat16: decode (N = 1..64) and prefill (N = 4096), against a gather +
  bmm composition in PyTorch and beside the base GEMM `x @ w` (torch.matmul); decode also as a fraction of
  its own traffic bound (the distinct adapters' A and B, x, y read once, y written).

    python3 tests/gpu/bench_lora_gpu.py --lib /tmp/tf_lora_gpu/liblora_gpu_cuda.so
    (--device cpu --lib bazel-bin/tests/gpu/liblora_gpu_emulation.so --small: a dry run of this script)
"""

import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lora_gpu_lib  # noqa: E402

CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


class Timer:
    """Milliseconds per call: CUDA events on a GPU, the wall clock on the CPU dry run."""

    def __init__(self, device):
        self.cuda = device == "cuda"

    def __call__(self, fn, iters):
        fn()  # warm
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / iters
        t = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t) * 1e3 / iters


def interleaved(timer, fns, iters, rounds):
    """{name: median ms} over `rounds` rounds, each running every fn `iters` times in turn."""
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(timer(fn, iters))
    return {name: statistics.median(t) for name, t in times.items()}


def check(got, want, what):
    """The kernel's output against PyTorch's (bfloat16: one rounding of each, relative to the size)."""
    got, want = got.float(), want.float()
    err = float((got - want).abs().max() / want.abs().max().clamp(min=1.0))
    assert err < 3e-2, f"{what}: differs from PyTorch by {err:.3g}"


def nbytes(*tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lib", required=True)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--small", action="store_true", help="small shapes (the CPU dry run)")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    lib = lora_gpu_lib.load(args.lib)
    dev = torch.device(args.device)
    stream = torch.cuda.current_stream().cuda_stream if args.device == "cuda" else None
    timer = Timer(args.device)
    size = 256 if args.small else 4096
    iters, rounds = (2, 2) if args.small else (args.iters, args.rounds)
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape, dtype=torch.float32, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(dev)

    def workspace(nbytes_):
        return torch.empty(max(int(nbytes_), 16), dtype=torch.uint8, device=dev)

    rows = []
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU emulation (dry run)"
    print(f"{name}; torch {torch.__version__}; median of {rounds} interleaved rounds of {iters} calls")

    # -- the copy bandwidth all fractions refer to
    src = rand(size, size)
    dst = torch.empty_like(src)
    copy_ms = interleaved(timer, {"copy": lambda: dst.copy_(src)}, iters, rounds)["copy"]
    copy_gbs = 2 * nbytes(src) / copy_ms / 1e6
    rows.append(("device copy", f"{size}x{size} f32", f"{copy_ms:.4f}", "", f"{copy_gbs:.0f} GB/s"))

    for dtype in (torch.float32, torch.bfloat16):
        tag = "f32" if dtype == torch.float32 else "bf16"
        # -- merge: w + s * a @ b
        w, a, b = rand(size, size, dtype=dtype), rand(size, 16, dtype=dtype), rand(16, size, dtype=dtype)
        out = torch.empty_like(w)

        def merge(w=w, a=a, b=b, out=out, dtype=dtype):
            lib.tfl_lora_merge(
                CODES[dtype],
                stream,
                size,
                size,
                16,
                w.data_ptr(),
                a.data_ptr(),
                b.data_ptr(),
                0.5,
                out.data_ptr(),
            )

        def torch_merge(w=w, a=a, b=b):
            return w + 0.5 * (a @ b)

        t = interleaved(timer, {"ours": merge, "torch": torch_merge}, iters, rounds)
        check(out, torch_merge(), f"merge {tag}")
        frac = 2 * nbytes(w) / t["ours"] / 1e6 / copy_gbs
        rows.append(
            (
                f"merge r=16 {tag}",
                f"{size}x{size}",
                f"{t['ours']:.4f}",
                f"torch {t['torch']:.4f}",
                f"{frac:.0%} of copy",
            )
        )

        # -- apply: y + s * (x @ a) @ b, N = size
        x, y = rand(size, size, dtype=dtype), rand(size, size, dtype=dtype)
        y_out, xa = torch.empty_like(y), torch.empty(size, 16, dtype=dtype, device=dev)
        work = workspace(lib.tfl_lora_apply_workspace(size, size, 16))

        def apply(x=x, y=y, a=a, b=b, y_out=y_out, xa=xa, work=work, dtype=dtype):
            lib.tfl_lora_apply(
                CODES[dtype],
                stream,
                size,
                size,
                size,
                16,
                y.data_ptr(),
                x.data_ptr(),
                a.data_ptr(),
                b.data_ptr(),
                1.5,
                y_out.data_ptr(),
                xa.data_ptr(),
                work.data_ptr(),
            )

        def torch_apply(x=x, y=y, a=a, b=b):
            return y + 1.5 * ((x @ a) @ b)

        t = interleaved(timer, {"ours": apply, "torch": torch_apply}, iters, rounds)
        check(y_out, torch_apply(), f"apply {tag}")
        frac = 3 * nbytes(x) / t["ours"] / 1e6 / copy_gbs
        rows.append(
            (
                f"apply r=16 {tag}",
                f"N={size}",
                f"{t['ours']:.4f}",
                f"torch {t['torch']:.4f}",
                f"{frac:.0%} of copy",
            )
        )

        # -- apply's gradients: dx, da, db, dscale from g (the upstream gradient), given apply's x @ a and
        # a zero gradient for it, as TensorFlow's gradient of LoraApply calls it
        g, grad_xa = rand(size, size, dtype=dtype), torch.zeros_like(xa)
        dx, da, db = torch.empty_like(x), torch.empty_like(a), torch.empty_like(b)
        dscale = torch.empty(1, dtype=dtype, device=dev)
        grad_work = workspace(lib.tfl_lora_apply_grad_workspace(size, size, size, 16))

        def grad(
            g=g,
            x=x,
            a=a,
            b=b,
            dx=dx,
            da=da,
            db=db,
            dscale=dscale,
            work=grad_work,
            dtype=dtype,
            xa=xa,
            grad_xa=grad_xa,
        ):
            lib.tfl_lora_apply_grad(
                CODES[dtype],
                stream,
                size,
                size,
                size,
                16,
                g.data_ptr(),
                x.data_ptr(),
                a.data_ptr(),
                b.data_ptr(),
                1.5,
                dx.data_ptr(),
                da.data_ptr(),
                db.data_ptr(),
                dscale.data_ptr(),
                work.data_ptr(),
                xa.data_ptr(),
                grad_xa.data_ptr(),
            )

        def torch_grad(g=g, x=x, a=a, b=b, xa=xa):  # autodiff keeps the forward's x @ a too
            gbt = g @ b.T
            return 1.5 * (gbt @ a.T), 1.5 * (x.T @ gbt), 1.5 * (xa.T @ g)

        t = interleaved(timer, {"ours": grad, "torch": torch_grad}, iters, rounds)
        want = torch_grad()
        for name, got, expected in zip(["dx", "da", "db"], [dx, da, db], want, strict=True):
            check(got, expected, f"grad {name} {tag}")
        frac = 3 * nbytes(x) / t["ours"] / 1e6 / copy_gbs  # g and x read, dx written
        ratio = t["torch"] / t["ours"]
        rows.append(
            (
                f"apply grad r=16 {tag}",
                f"N={size}",
                f"{t['ours']:.4f}",
                f"torch {t['torch']:.4f} ({ratio:.2f}x)",
                f"{frac:.0%} of copy",
            )
        )

    # -- batched apply, bfloat16
    dtype, d = torch.bfloat16, size
    w = rand(d, d, dtype=dtype)
    cases = [
        (n, k, r) for r in (16, 64) for k in (8, 64) for n in (1, 8, 32, 64, 4096 if not args.small else 512)
    ]
    cases += [(32, 32, 16), (256, 32, 16)]
    for n, k, r in cases:
        a_stack, b_stack = rand(k, d, r, dtype=dtype, scale=0.1), rand(k, r, d, dtype=dtype, scale=0.1)
        scales = rand(k, dtype=dtype)
        if (n, k) in ((32, 32), (256, 32)):
            ids = torch.arange(n, dtype=torch.int32) % k  # every adapter used
        else:
            ids = torch.randint(-1, k, (n,), generator=gen, dtype=torch.int32)
        ids = ids.to(dev)
        x, y = rand(n, d, dtype=dtype), rand(n, d, dtype=dtype)
        y_out, xa = torch.empty_like(y), torch.empty(n, r, dtype=dtype, device=dev)
        bad = torch.zeros(1, dtype=torch.int32, device=dev)
        work = workspace(lib.tfl_batched_lora_apply_workspace(n, d, r, k))

        def batched(
            x=x,
            y=y,
            a_stack=a_stack,
            b_stack=b_stack,
            ids=ids,
            scales=scales,
            y_out=y_out,
            xa=xa,
            work=work,
            bad=bad,
            n=n,
            k=k,
            r=r,
        ):
            lib.tfl_batched_lora_apply(
                CODES[dtype],
                stream,
                n,
                d,
                d,
                r,
                k,
                y.data_ptr(),
                x.data_ptr(),
                a_stack.data_ptr(),
                b_stack.data_ptr(),
                ids.data_ptr(),
                scales.data_ptr(),
                y_out.data_ptr(),
                xa.data_ptr(),
                work.data_ptr(),
                bad.data_ptr(),
            )

        def gather_bmm(x=x, y=y, a_stack=a_stack, b_stack=b_stack, ids=ids, scales=scales):
            idx = ids.clamp(min=0).long()
            xa = torch.bmm(x.unsqueeze(1), a_stack[idx])
            delta = torch.bmm(xa, b_stack[idx]).squeeze(1)
            return y + delta * (scales[idx] * (ids >= 0))[:, None]

        def base_gemm(x=x, w=w):
            return x @ w

        t = interleaved(timer, {"ours": batched, "bmm": gather_bmm, "gemm": base_gemm}, iters, rounds)
        check(y_out, gather_bmm(), f"batched N={n} {k} adapters r={r}")
        used = torch.unique(ids[ids >= 0]).numel()
        traffic = used * (nbytes(a_stack) + nbytes(b_stack)) / k + 3 * nbytes(x)
        bound_ms = traffic / copy_gbs / 1e6
        rows.append(
            (
                f"batched r={r} {k} adapters",
                f"N={n} ({used} used)",
                f"{t['ours']:.4f}",
                f"gather+bmm {t['bmm']:.4f} ({t['bmm'] / t['ours']:.1f}x); x@w {t['gemm']:.4f}",
                f"{bound_ms / t['ours']:.0%} of traffic bound",
            )
        )
        assert int(bad.cpu()[0]) == lib.tfl_no_bad_row()

    widths = [max(len(str(row[i])) for row in rows) for i in range(5)]
    header = ("case", "shape", "ms", "baselines (ms)", "")
    for row in [header, *rows]:
        print("  ".join(str(v).ljust(widths[i]) for i, v in enumerate(row)))


if __name__ == "__main__":
    np.random.seed(0)
    main()
