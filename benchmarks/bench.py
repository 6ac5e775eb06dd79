"""
What a Race-DiT step costs next to a dense DiT with the same activated parameters.

    # CPU-sized default (S/2 at 32x32 latents)
    python benchmarks/bench.py
    # a GPU
    python benchmarks/bench.py --batch-size 256 --models B/2:dense,B/2:race:2in8,B/2:token:2in8
    # GPU memory, any machine
    python benchmarks/bench.py --memory --models B/2:race:2in8,XL/2:race:4in32

All models are built in one process and measured alternately (round-robin), after warm-up, so that
clock or thermal drift hits every model alike. Times are medians over rounds. Training step =
forward + backward + AdamW step with the full loss (PLR, RSL); inference = one forward in eval mode
with the calibrated threshold routing. Memory: peak allocated on CUDA; on CPU the bytes of the
distinct tensors saved for backward (the activation memory), since CPU allocations are not tracked
per model.
"""
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import race_dit as R  # noqa: E402
from runs import Parser, atomic_write, autocast_for, use_bf16  # noqa: E402

DEFAULT = "S/2:dense,S/2:race:2in8,S/2:race:4in16,S/2:race:8in32,S/2:token:2in8,S/2:expert:2in8"


def build(spec, args, device, **kw):
    name, routing, *experts = spec.split(":")
    cfg = R.make_config(name, experts[0] if experts else None, routing=routing,
                        input_size=args.image_size, in_channels=args.channels,
                        num_classes=args.num_classes, **kw)
    return R.RaceDiT(cfg).to(device)


@contextlib.contextmanager
def saved_for_backward():
    """Yields a dict that fills with the distinct storages autograd saves for backward inside the
    block (data pointer -> bytes): the activations and, under autocast, the bf16 weight copies."""
    seen = {}
    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield seen


def saved_bytes(model, args, batch, device):
    """Bytes saved for backward by one bf16 training forward at this batch size."""
    S = args.image_size
    x0 = torch.randn(batch, args.channels, S, S, device=device)
    y = torch.randint(0, args.num_classes, (batch,), device=device)
    with torch.autocast(device.type, torch.bfloat16), saved_for_backward() as seen:
        R.Diffusion.of(model.cfg).training_losses(model, x0, y)
    return sum(seen.values())


def saved_bytes_model(spec, args, device, recompute):
    """Blocks are identical and activations grow linearly with the batch, so the bytes saved at
    depth d and batch b are a + b*x + d*(w + b*z); four small forwards (d, b in {1, 2}) fit it
    exactly. Returns the full depth's (fixed bytes, bytes per image) and one block's (w, z)."""
    m = {}
    for d in (1, 2):
        model = build(spec, args, device, learn_sigma=True, depth=d)
        model.recompute = recompute
        m[d] = [saved_bytes(model, args, b, device) for b in (1, 2)]
    z = m[2][1] - m[2][0] - m[1][1] + m[1][0]                            # per block and image
    x, w = m[1][1] - m[1][0] - z, m[2][0] - m[1][0] - z               # per image outside; per block
    depth = R.make_config(spec.split(":")[0]).depth
    return m[1][0] - x - w - z + depth * w, x + depth * z, (w, z)


def memory(specs, args, device, gpus=(80, 141), batch=256):
    """GPU training memory in bf16, estimated on any device without building the full model:
    20 bytes per parameter (fp32 weight, gradient, AdamW's two moments and the EMA copy, all on the
    GPU) plus the bytes saved for backward. With activation recomputation the blocks keep only their
    inputs and backward holds one recomputed block. Allocator slack and backward's transient
    gradients come on top: lower bounds."""
    print(f"bf16 training memory (learned sigma, "
          f"{args.channels}x{args.image_size}x{args.image_size}) from "
          f"bytes saved for backward on {device}; 'recomp': with --recompute")
    print(f"{'model':18s} {'params':>7s} {'state GiB':>9s} {'MiB/img':>8s} {'recomp':>6s} "
          f"{f'b={batch} GiB':>10s} {'recomp':>6s} " + " ".join(f"{f'max b {g}G':>9s} {'recmp':>5s}"
                                                             for g in gpus))
    rows = []
    for spec in specs:
        with torch.device("meta"):
            model = build(spec, args, "meta", learn_sigma=True)
            params = sum(p.numel() for p in model.parameters())
        plain, recomp = (saved_bytes_model(spec, args, device, c) for c in (False, True))
        w, z = plain[2]                                              # the block backward recomputes
        lines = {False: plain[:2], True: (recomp[0] + w, recomp[1] + z)}  # (fixed, per image) bytes
        powers = [2**i for i in range(14)]
        gib = {(b, c): (20 * params + lines[c][0] + b * lines[c][1]) / 2**30
               for b in [batch] + powers for c in (False, True)}
        largest = {(g, c): max([b for b in powers if gib[b, c] <= 0.9 * g] or [0])
                   for g in gpus for c in (False, True)}
        row = dict(model=spec, params=params, state_gib=20 * params / 2**30,
                   mib_per_image=plain[1] / 2**20, mib_per_image_recompute=recomp[1] / 2**20,
                   batch_gib=gib[batch, False], batch_gib_recompute=gib[batch, True],
                   largest_micro_batch={f"{g}GiB{'_recompute' if c else ''}": v
                                        for (g, c), v in largest.items()})
        rows.append(row)
        print(f"{spec:18s} {params / 1e9:6.2f}B {row['state_gib']:9.1f} "
              f"{row['mib_per_image']:8.1f} {row['mib_per_image_recompute']:6.1f} "
              f"{row['batch_gib']:10.1f} {row['batch_gib_recompute']:6.1f} "
              + " ".join(f"{largest[g, False]:9d} {largest[g, True]:5d}" for g in gpus))
    print("max b: the largest power-of-two micro-batch within 90% of an 80 / 141 GiB GPU")
    return rows


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None):
    p = Parser(prog="bench.py", description=__doc__)
    p.add_argument("--models", default=DEFAULT,
                   help="comma list of SIZE/PATCH:ROUTING[:KinE]; the first is the baseline")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--channels", type=int, default=4)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="auto: bf16 on CUDA")
    p.add_argument("--memory", action="store_true",
                   help="estimate GPU training memory instead of timing")
    p.add_argument("--json", help="also write the results here (e.g. benchmarks/bench.json)")
    args = p.parse_args(argv)
    for spec in args.models.split(","):
        if ":" not in spec:
            p.error(f"--models {spec!r}: expected SIZE/PATCH:ROUTING[:KinE], e.g. B/2:race:2in8")
        try:
            build(spec, args, "meta")
        except ValueError as e:
            p.error(f"--models {spec!r}: {e}")
    if min(args.batch_size, args.rounds, args.image_size) < 1 or args.warmup < 0:
        p.error("--batch-size, --rounds and --image-size must be positive, "
                "--warmup zero or positive")
    device = torch.device(args.device)
    if args.memory:
        rows = memory(args.models.split(","), args, device)
        if args.json:
            atomic_write(Path(args.json),
                         lambda tmp: tmp.write_text(json.dumps(dict(memory=rows), indent=1)))
        return
    bf16, autocast = use_bf16(args.precision, device), autocast_for(args.precision, device)
    torch.manual_seed(0)
    specs = args.models.split(",")
    models = {s: build(s, args, device) for s in specs}
    opts = {s: torch.optim.AdamW(m.parameters(), lr=1e-4) for s, m in models.items()}
    diffusion = R.Diffusion.of(models[specs[0]].cfg)  # every model here has the same recipe
    B, C, S = args.batch_size, args.channels, args.image_size
    x0 = torch.randn(B, C, S, S, device=device)
    y = torch.randint(0, args.num_classes, (B,), device=device)

    def train_step(s):
        models[s].train()
        with autocast(), saved_for_backward() as seen:
            losses, _ = diffusion.training_losses(models[s], x0, y)
        opts[s].zero_grad(set_to_none=True)
        losses["loss"].backward()
        opts[s].step()
        return sum(seen.values())

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
    med = {s: {k: statistics.median(v) for k, v in times[s].items() if k != "experts"}
           for s in specs}
    rows = []
    print(f"device {device} "
          f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
          f"{'bf16' if bf16 else 'fp32'}, batch {B} of {C}x{S}x{S}, torch {torch.__version__}, "
          f"median of {args.rounds} rounds")
    print(f"{'model':26s} {'params':>9s} {'active':>9s} {'train ms':>9s} {'x base':>7s} "
          f"{'infer ms':>9s} {'x base':>7s} {'img/s tr':>9s} {'mem MB':>8s} {'exp/tok':>8s}")
    for s in specs:
        total, active = R.count_params(models[s])
        row = dict(model=s, params=total, activated=active, train_ms=1e3 * med[s]["train"],
                   infer_ms=1e3 * med[s]["infer"], train_ratio=med[s]["train"] / med[base]["train"],
                   infer_ratio=med[s]["infer"] / med[base]["infer"],
                   train_images_per_s=B / med[s]["train"],
                   infer_images_per_s=B / med[s]["infer"], memory_mb=mem[s] / 2**20,
                   experts_per_token_infer=times[s]["experts"])
        rows.append(row)
        ept = (f"{row['experts_per_token_infer']:.2f}"
               if row["experts_per_token_infer"] is not None else "-")
        print(f"{s:26s} {total / 1e6:8.1f}M {active / 1e6:8.1f}M "
              f"{row['train_ms']:9.1f} {row['train_ratio']:7.2f} "
              f"{row['infer_ms']:9.1f} {row['infer_ratio']:7.2f} {row['train_images_per_s']:9.1f} "
              f"{row['memory_mb']:8.0f} {ept:>8s}")
    if args.json:
        result = dict(device=str(device), precision="bf16" if bf16 else "fp32", batch_size=B,
                      image_size=S, channels=C, torch=torch.__version__, rows=rows)
        atomic_write(Path(args.json), lambda tmp: tmp.write_text(json.dumps(result, indent=1)))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
