"""
What a Race-DiT step costs next to a dense DiT with the same activated parameters.

    python benchmarks/bench.py                                   # CPU-sized default (S/2 at 32x32 latents)
    python benchmarks/bench.py --batch-size 256 --models B/2:dense,B/2:race:2in8,B/2:token:2in8   # a GPU

All models are built in one process and measured alternately (round-robin), after warm-up, so that
clock or thermal drift hits every model alike. Times are medians over rounds. Training step =
forward + backward + AdamW step with the full loss (PLR, RSL); inference = one forward in eval mode
with the calibrated threshold routing. Memory: peak allocated on CUDA; on CPU the bytes of tensors
saved for backward (the activation memory), since CPU allocations are not tracked per model.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import race_dit as R  # noqa: E402
from utils import atomic_write, use_bf16  # noqa: E402

DEFAULT = "S/2:dense,S/2:race:2in8,S/2:race:4in16,S/2:race:8in32,S/2:token:2in8,S/2:expert:2in8"


def build(spec, args, device):
    name, routing, *experts = spec.split(":")
    cfg = R.make_config(name, experts[0] if experts else None, routing=routing, input_size=args.image_size,
                        in_channels=args.channels, num_classes=args.num_classes)
    return R.RaceDiT(cfg).to(device)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=DEFAULT,
                   help="comma list of SIZE/PATCH:ROUTING[:KinE]; the first is the baseline")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--channels", type=int, default=4)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"], help="auto: bf16 on CUDA")
    p.add_argument("--json", help="also write the results here (e.g. benchmarks/bench.json)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    bf16 = use_bf16(args.precision, device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(0)
    specs = args.models.split(",")
    models = {s: build(s, args, device) for s in specs}
    opts = {s: torch.optim.AdamW(m.parameters(), lr=1e-4) for s, m in models.items()}
    diffusion = R.Diffusion()
    B, C, S = args.batch_size, args.channels, args.image_size
    x0, y = torch.randn(B, C, S, S, device=device), torch.randint(0, args.num_classes, (B,), device=device)
    autocast = lambda: torch.autocast(device.type, torch.bfloat16, enabled=bf16)

    def train_step(s):
        saved = [0]
        def pack(t):
            saved[0] += t.numel() * t.element_size()
            return t
        models[s].train()
        with autocast(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            losses, _ = diffusion.training_losses(models[s], x0, y)
        opts[s].zero_grad(set_to_none=True)
        losses["loss"].backward()
        opts[s].step()
        return saved[0]

    @torch.no_grad()
    def infer(s):
        models[s].eval()
        with autocast():
            return models[s](x0, torch.full((B,), 500, device=device), y, return_aux=True)[1]

    times = {s: dict(train=[], infer=[]) for s in specs}
    mem = {}
    for r in range(args.warmup + args.rounds):
        for s in specs:                                                   # alternate the models
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            sync(device)
            t0 = time.perf_counter()
            saved = train_step(s)
            sync(device)
            t1 = time.perf_counter()
            aux = infer(s)
            sync(device)
            t2 = time.perf_counter()
            if r >= args.warmup:
                times[s]["train"].append(t1 - t0)
                times[s]["infer"].append(t2 - t1)
                mem[s] = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else saved
                times[s]["experts"] = R.routing_stats(aux)["experts_per_token"] if aux else None

    base = specs[0]
    med = {s: {k: statistics.median(v) for k, v in times[s].items() if k != "experts"} for s in specs}
    rows = []
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
          f"{'bf16' if bf16 else 'fp32'}, batch {B} of {C}x{S}x{S}, torch {torch.__version__}, "
          f"median of {args.rounds} rounds")
    print(f"{'model':26s} {'params':>9s} {'active':>9s} {'train ms':>9s} {'x base':>7s} {'infer ms':>9s} "
          f"{'x base':>7s} {'img/s tr':>9s} {'mem MB':>8s} {'exp/tok':>8s}")
    for s in specs:
        total, active = R.count_params(models[s])
        row = dict(model=s, params=total, activated=active, train_ms=1e3 * med[s]["train"],
                   infer_ms=1e3 * med[s]["infer"], train_ratio=med[s]["train"] / med[base]["train"],
                   infer_ratio=med[s]["infer"] / med[base]["infer"], train_images_per_s=B / med[s]["train"],
                   infer_images_per_s=B / med[s]["infer"], memory_mb=mem[s] / 2**20,
                   experts_per_token_infer=times[s]["experts"])
        rows.append(row)
        ept = f"{row['experts_per_token_infer']:.2f}" if row["experts_per_token_infer"] is not None else "-"
        print(f"{s:26s} {total / 1e6:8.1f}M {active / 1e6:8.1f}M "
              f"{row['train_ms']:9.1f} {row['train_ratio']:7.2f} "
              f"{row['infer_ms']:9.1f} {row['infer_ratio']:7.2f} {row['train_images_per_s']:9.1f} "
              f"{row['memory_mb']:8.0f} {ept:>8s}")
    if args.json:
        result = dict(device=str(device), precision="bf16" if bf16 else "fp32", batch_size=B, image_size=S,
                      channels=C, torch=torch.__version__, rows=rows)
        atomic_write(Path(args.json), lambda tmp: tmp.write_text(json.dumps(result, indent=1)))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
