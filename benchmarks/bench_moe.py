"""Forward + backward time and peak memory of every brainfuse.moe preset, at the demo grid (3 mm MNI,
67x79x64) and at 2 mm MNI (99x117x95), batch 4, all six modalities present (the most expensive case).

    python benchmarks/bench_moe.py                       # CPU, all presets, both sizes, no input pooling
                                                         # (neuromoe's ViT at 2 mm alone: ~150 CPU-s, 2.4 GB)
    python benchmarks/bench_moe.py --input-pool 1 2      # also with volumes average-pooled 2x per axis
    python benchmarks/bench_moe.py --device cuda         # bf16 autocast, torch.cuda.max_memory_allocated
    python benchmarks/bench_moe.py --presets neuromoe late --sizes demo --iters 5

The "epoch cpu s" column extrapolates one training epoch over --subjects subjects (default 30) from the
timed step's CPU time: subjects / batch steps, plus an eval forward pass of the same subjects at 1/3 step.
On an idle machine with --threads 1, wall time equals CPU time; with more threads wall time is lower.

Each (preset, size) runs in its own subprocess so that peak memory is its own: on CPU the figure is the
process's peak RSS (getrusage ru_maxrss) minus its RSS after the model and inputs were built, i.e. what
forward + backward (activations, gradients) add; on CUDA it is max_memory_allocated minus the memory
allocated before the first step. The baseline is the late-fusion preset in the same run (ratio column).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

SIZES = {"demo": (67, 79, 64), "2mm": (99, 117, 95)}   # MNI152 2009a grids at 3 mm and 2 mm
CHANNELS = {"aMRI": 3, "DTI": 4, "fMRI": 3}             # T1/GM/log-Jacobian; FA/MD/AD/RD; ALFF/fALFF/ReHo
TABULAR = {"connectivity": 4950, "clinical": 16, "serum": 8}  # 4950 = upper triangle of a 100-ROI matrix


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(args) -> dict:
    import torch

    from brainfuse.moe import ModalitySpec, build_model

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    shape = SIZES[args.size]
    mods = [ModalitySpec(n, "volume", (c, *shape)) for n, c in CHANNELS.items()]
    mods += [ModalitySpec(n, "tabular", (f,)) for n, f in TABULAR.items()]
    overrides = {"input_pool": args.input_pool, **({"grad_checkpoint": True} if args.grad_checkpoint else {})}
    model = build_model(args.preset, mods, 2, **overrides).to(dev).train()
    B = args.batch
    inputs = {m.name: torch.randn(B, *m.shape, device=dev) for m in mods}
    present = torch.ones(B, len(mods), dtype=torch.bool, device=dev)
    targets = torch.arange(B, device=dev) % 2
    n_params = sum(p.numel() for p in model.parameters())

    def step():
        model.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            out = model(inputs, present, targets)
        out.loss.backward()
        if dev.type == "cuda":
            torch.cuda.synchronize()

    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss_bytes()
    for _ in range(args.warmup):
        step()
    times, cpu = [], []
    for _ in range(args.iters):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base  # ru_maxrss: KiB on Linux
    return {"preset": args.preset, "size": args.size, "pool": args.input_pool, "params": n_params,
            "time_s": min(times), "cpu_s": min(cpu),
            "mean_s": sum(times) / len(times), "iters": len(times), "peak_bytes": peak}


def main(argv=None) -> int:
    from brainfuse.moe import PRESETS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--input-pool", type=int, nargs="+", default=[1],
                    help="MoEConfig.input_pool values: average-pool volumes by this factor per axis first")
    ap.add_argument("--subjects", type=int, default=30, help="cohort size for the per-epoch estimate")
    ap.add_argument("--iters", type=int, default=None, help="timed steps (default: CUDA 10; CPU 2 demo, 1 at 2 mm)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="untimed steps first (default: CUDA 3; CPU 1 demo, 0 at 2 mm)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--grad-checkpoint", action="store_true", help="ViT blocks recompute activations in backward")
    ap.add_argument("--child", nargs=2, metavar=("PRESET", "SIZE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:
        args.preset, args.size = args.child
        args.input_pool = args.input_pool[0]
        print(json.dumps(child(args)))
        return 0

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_moe: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    where = (f"CUDA {torch.cuda.get_device_name(0)}, bf16 autocast, peak = torch.cuda.max_memory_allocated"
             if args.device == "cuda" else
             f"CPU only ({args.threads} threads; CUDA with bf16 autocast not measured in this run), "
             "fp32, peak = RSS added by forward+backward")
    print(f"brainfuse.moe benchmark: torch {torch.__version__}; {where}; batch {args.batch}; "
          "all 6 modalities present (aMRI 3ch, DTI 4ch, fMRI 3ch volumes; connectivity 4950, clinical 16, serum 8)")
    rows = []
    for size in args.sizes:
        cpu2mm = args.device == "cpu" and size == "2mm"
        iters = args.iters or (10 if args.device == "cuda" else 1 if cpu2mm else 2)
        warmup = args.warmup if args.warmup is not None else (3 if args.device == "cuda" else 0 if cpu2mm else 1)
        for pool in args.input_pool:
            for preset in args.presets:
                cmd = [sys.executable, os.path.abspath(__file__), "--child", preset, size, "--device", args.device,
                       "--batch", str(args.batch), "--iters", str(iters), "--warmup", str(warmup),
                       "--threads", str(args.threads), "--input-pool", str(pool)]
                cmd += ["--grad-checkpoint"] if args.grad_checkpoint else []
                r = subprocess.run(cmd, capture_output=True, text=True)
                if r.returncode:
                    print(f"{preset} @ {size}, input_pool {pool}: failed\n{r.stderr[-2000:]}", file=sys.stderr)
                    return 1
                rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
                rows[-1]["warmup"] = warmup
                print(f"  done {preset} @ {size}, input_pool {pool}: {rows[-1]['time_s']:.2f} s", file=sys.stderr)
    base = {(r["size"], r["pool"]): r["time_s"] for r in rows if r["preset"] == "late"}
    steps = -(-args.subjects // args.batch)
    print(f"{'size':<6}{'grid':>13}{'pool':>5} {'preset':<10}{'params':>10}{'fwd+bwd s':>11}{'cpu s':>8}"
          f"{'vs late':>9}{'peak MiB':>10}{'epoch cpu s':>12}  timed/warmup")
    for r in rows:
        key = (r["size"], r["pool"])
        ratio = f"{r['time_s'] / base[key]:.2f}x" if key in base else "-"
        print(f"{r['size']:<6}{'x'.join(map(str, SIZES[r['size']])):>13}{r['pool']:>5} {r['preset']:<10}"
              f"{r['params']:>10,}{r['time_s']:>11.3f}{r['cpu_s']:>8.2f}{ratio:>9}{r['peak_bytes'] / 2 ** 20:>10.0f}"
              f"{steps * r['cpu_s'] * 4 / 3:>12.1f}  {r['iters']}/{r['warmup']}")
    print(f"fwd+bwd s: fastest timed step (forward, task + auxiliary loss, backward), batch {args.batch}; cpu s: "
          f"the process CPU time of that step (all threads; steadier than wall time on a shared machine). "
          f"epoch cpu s: {steps} steps for {args.subjects} subjects + eval forward (1/3 step each), in CPU seconds. "
          "Compare presets within one run.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
