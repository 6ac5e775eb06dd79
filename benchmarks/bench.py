"""
What a Race-DiT step costs next to a dense DiT with the same activated parameters.

    # CPU-sized default (S/2 at 32x32 latents)
    python benchmarks/bench.py
    # a GPU
    python benchmarks/bench.py --batch-size 256 --models B/2:dense,B/2:race:2in8,B/2:token:2in8
    # GPU training memory, on any machine
    python benchmarks/bench.py --memory --models B/2:race:2in8,XL/2:race:4in32

All models are built in one process and measured alternately (round-robin), after warm-up, so that
clock or thermal drift hits every model alike. Times are medians over rounds. Training step =
forward + backward + AdamW step with the full loss (PLR, RSL); inference = one forward in eval mode
selecting by the threshold (S4). Memory: peak allocated on CUDA; on CPU the bytes of the distinct
tensors saved for backward (the activation memory), since CPU allocations are not tracked per
model. --memory counts train.py's training step on FakeTensors instead (step_memory): every
tensor a bf16 step creates and frees, exactly, without allocating any.
"""
import contextlib
import json
import statistics
import sys
import time
import warnings
import weakref
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import race_dit as R  # noqa: E402
import train  # noqa: E402
from support.routing import routing_stats  # noqa: E402
from support.runs import (Parser, atomic_write, autocast_for, checkpoint_bytes,  # noqa: E402
                          count_params, use_bf16)

DEFAULT = "S/2:dense,S/2:race:2in8,S/2:race:4in16,S/2:race:8in32,S/2:token:2in8,S/2:expert:2in8"


def config(spec, args, **kw):
    name, routing, *experts = spec.split(":")
    return R.make_config(name, experts[0] if experts else None, routing=routing,
                         input_size=args.image_size, in_channels=args.channels,
                         num_classes=args.num_classes, **kw)


def build(spec, args, device, **kw):
    return R.RaceDiT(config(spec, args, **kw)).to(device)


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


class LiveBytes(TorchDispatchMode):
    """Counts the tensor bytes alive inside the block: every storage that a torch op creates is
    added when it is created and taken off when it is freed (`now`), and `peak` is the most at any
    op. Exact for tensors; the allocator's rounding and fragmentation and the kernels' workspaces
    are not tensors and come on top."""

    def __init__(self):
        super().__init__()
        self.alive, self.now, self.peak = set(), 0, 0

    def freed(self, key, nbytes):
        self.alive.discard(key)
        self.now -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        stack = [out]
        while stack:                                   # outputs: a tensor, or (nested) sequences
            t = stack.pop()
            if isinstance(t, (tuple, list)):
                stack.extend(t)
            elif isinstance(t, torch.Tensor) and id(st := t.untyped_storage()) not in self.alive:
                self.alive.add(id(st))
                self.now += st.nbytes()
                weakref.finalize(st, self.freed, id(st), st.nbytes())
        self.peak = max(self.peak, self.now)
        return out


def step_memory(spec, args, batch, recompute, fake=True):
    """train.py's training step (forward and backward with PLR and RSL, fused AdamW as on CUDA, the
    EMA) at this micro-batch in bf16 autocast with learned sigma, counted by LiveBytes on
    FakeTensors, which allocate nothing (fake=False: on real CPU tensors, for the test). Returns
    the bytes alive between steps and the peak of the second step (the first creates AdamW's
    state; the first step's losses and selection masks stay alive across it, as in train.py)."""
    name, routing, *experts = spec.split(":")
    targs = train.parse_args(["--model", name, "--routing", routing, "--batch-size", str(batch),
                              *(["--experts", experts[0]] if experts else []),
                              *(["--recompute"] if recompute else [])])
    S, C = args.image_size, args.channels
    autocast = lambda: torch.autocast("cpu", torch.bfloat16)
    with warnings.catch_warnings(), FakeTensorMode() if fake else contextlib.nullcontext():
        warnings.simplefilter("ignore")               # deepcopy reads a FakeTensor's data_ptr
        with LiveBytes() as live:
            cfg = config(spec, args, learn_sigma=True)
            model, ema, _ = train.build(cfg, targs, torch.device("cpu"))
            # The EMA made again under this mode: a deepcopy makes FakeTensors under a mode of its
            # own, which LiveBytes would not see.
            ema = R.RaceDiT(cfg).eval().requires_grad_(False)
            ema.load_state_dict(model.state_dict())
            opt = torch.optim.AdamW(model.parameters(), lr=targs.lr, weight_decay=0, fused=True)
            diffusion = R.Diffusion(cfg)
            for step in range(2):
                x0 = torch.randn(batch, C, S, S)
                y = torch.randint(0, args.num_classes, (batch,))
                t = torch.randint(0, diffusion.num_timesteps, (batch,))
                micro = [(x0, y, t, torch.randn_like(x0))]
                if step == 1:
                    state, live.peak = live.now, live.now
                out = train.train_step(model, model, ema, opt, diffusion, micro, step, targs,
                                       autocast)
            del out
    return state, live.peak


def memory(specs, args, gpus=(80, 141), batches=(256, 1024), limit=2**14):
    """GPU training memory of train.py's step in bf16, counted exactly on FakeTensors (step_memory)
    on any machine: the bytes alive between steps, the peak at each of `batches` with and without
    --recompute, the largest power-of-two micro-batch up to `limit` whose peak is within 90% of
    each GPU, and the checkpoint's size (runs.checkpoint_bytes)."""
    print(f"bf16 training memory of train.py's step (learned sigma, "
          f"{args.channels}x{args.image_size}x{args.image_size}), tensor bytes counted on "
          f"FakeTensors; 'recomp': with --recompute")
    print(f"{'model':18s} {'params':>7s} {'ckpt GiB':>8s} {'state GiB':>9s} "
          + " ".join(f"{f'b={b} GiB':>10s} {'recomp':>6s}" for b in batches) + " "
          + " ".join(f"{f'max b {g}G':>9s} {'recmp':>5s}" for g in gpus))
    rows = []
    for spec in specs:
        with torch.device("meta"):
            params = sum(p.numel() for p in R.RaceDiT(config(spec, args, learn_sigma=True))
                         .parameters())
        peak, state = {}, 0
        for c in (False, True):
            for b in batches:
                state, peak[b, c] = step_memory(spec, args, b, c)
        largest = {}
        for c in (False, True):
            b, fits = 1, {g: 0 for g in gpus}
            while b <= limit:
                top = peak[b, c] if (b, c) in peak else step_memory(spec, args, b, c)[1]
                fits.update({g: b for g in gpus if top <= 0.9 * g * 2**30})
                if top > 0.9 * max(gpus) * 2**30:
                    break
                b *= 2
            largest.update({(g, c): fits[g] for g in gpus})
        gib = lambda n: n / 2**30
        ckpt = checkpoint_bytes(config(spec, args, learn_sigma=True))
        row = dict(model=spec, params=params, checkpoint_gib=gib(ckpt), state_gib=gib(state),
                   peak_gib={f"{b}{'_recompute' if c else ''}": gib(v)
                             for (b, c), v in peak.items()},
                   largest_micro_batch={f"{g}GiB{'_recompute' if c else ''}": v
                                        for (g, c), v in largest.items()})
        rows.append(row)
        print(f"{spec:18s} {params / 1e9:6.2f}B {gib(ckpt):8.1f} {gib(state):9.1f} "
              + " ".join(f"{gib(peak[b, False]):10.1f} {gib(peak[b, True]):6.1f}"
                         for b in batches) + " "
              + " ".join(f"{largest[g, False]:9d} {largest[g, True]:5d}" for g in gpus))
    print("max b: the largest power-of-two micro-batch whose peak is within 90% of an "
          + " / ".join(f"{g}" for g in gpus) + " GiB GPU")
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
                   help="count GPU training memory (FakeTensors) instead of timing")
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
        rows = memory(args.models.split(","), args)
        if args.json:
            atomic_write(Path(args.json),
                         lambda tmp: tmp.write_text(json.dumps(dict(memory=rows), indent=1)))
        return
    bf16, autocast = use_bf16(args.precision, device), autocast_for(args.precision, device)
    torch.manual_seed(0)
    specs = args.models.split(",")
    models = {s: build(s, args, device) for s in specs}
    opts = {s: torch.optim.AdamW(m.parameters(), lr=1e-4) for s, m in models.items()}
    diffusion = R.Diffusion(models[specs[0]].cfg)  # every model here has the same recipe
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
                times[s]["experts"] = routing_stats(aux)["experts_per_token"] if aux else None

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
        total, active = count_params(models[s])
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
