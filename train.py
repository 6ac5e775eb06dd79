"""
Train Race-DiT (or a dense / token-choice / expert-choice baseline) on one device or with torchrun.

    python train.py                      # built-in shapes, a few minutes on a laptop CPU
    python train.py --data fashion-mnist --model XS/7 --steps 8000
    torchrun --nproc_per_node 8 train.py --data latents --model XL/2 --experts 4in32 ...

The defaults are a small-scale recipe for CPU runs; README.md gives the paper's (DiT's) settings.
Top to bottom: flags, the training step, saving / sampling / logging, train()'s linear loop.
"""
import contextlib
import copy
import dataclasses
import datetime
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import race_dit as R
from support.data import (LATENT_SCALE, BatchOrder, first_examples, load_data, load_vae,
                          to_model_input, to_uint8)
from support.evaluator import SUPPORTED as EVALUATED, Evaluator
from support.pictures import plot_losses, save_grid
from support.runs import (AT_LEAST_ZERO, DECAY, POSITIVE, POSITIVE_NUMBER, SEED, STEPS, WEIGHT,
                          WRITE_RATE, Diverged, Parser, UserError, autocast_for, check_resume,
                          checkpoint_bytes, count_params, keep_metrics, load_checkpoint, locked,
                          peak_memory_gib, require, restore, run_main, save_checkpoint)
from support.routing import routing_stats


def parse_args(argv=None, prog="train.py"):
    p = Parser(prog=prog, description=__doc__)
    a = p.add_argument
    a("--data", default="shapes",
      help="shapes | cifar10 | fashion-mnist | latents | a class-folder path")
    a("--data-dir", default="data", help="where cifar10 / fashion-mnist / latents files live")
    a("--image-size", type=POSITIVE, default=16, help="for shapes and image folders")
    a("--num-classes", type=POSITIVE, default=1000, help="for latents (ImageNet: 1000)")
    a("--model", default="XS/4", help="XS|S|B|M|L|XL / patch, e.g. B/2")
    a("--experts", default="2in8", help="k in E, e.g. 4in32")
    a("--routing", default="race", choices=R.CHOICES["routing"])
    a("--gating", default="identity", choices=R.CHOICES["gating"])
    a("--granularity", type=AT_LEAST_ZERO, default=0, help="expert width = 4D / this (0: k)")
    a("--learn-sigma", default="auto", choices=["auto", "on", "off"],
      help="learned variance with DiT's hybrid loss; auto: on for latents, as DiT")
    a("--plr-weight", type=WEIGHT, default=0.1, help="per-layer regularization (S5)")
    a("--plr-init", default="xavier", choices=R.CHOICES["plr_init"], help="PLR heads' init (S5)")
    a("--rsl-weight", type=WEIGHT, default=0.01, help="router similarity loss (S6)")
    a("--balance-weight", type=WEIGHT, default=0.0, help="switch balance loss (token-choice)")
    a("--threshold-decay", type=DECAY, default=0.99, help="EMA of the race cutoff (S4)")
    a("--schedule", default="cosine", choices=R.CHOICES["schedule"],
      help="noise schedule: cosine (IDDPM) or linear (paper / DiT)")
    a("--loss-weight", default="min-snr", choices=R.CHOICES["loss_weight"],
      help="weight of each timestep's MSE: min-snr (min(SNR, gamma) / SNR) or none (paper / DiT)")
    a("--min-snr-gamma", type=POSITIVE_NUMBER, default=5.0, help="gamma of --loss-weight min-snr")
    a("--prediction", default="v", choices=R.CHOICES["prediction"],
      help="what the model predicts: v = sqrt(ab) eps - sqrt(1 - ab) x0, or eps (paper / DiT)")
    a("--lr", type=POSITIVE_NUMBER, default=2e-3, help="peak learning rate (paper: 1e-4)")
    a("--warmup", type=AT_LEAST_ZERO, default=0, help="linear learning-rate warm-up steps")
    a("--batch-size", type=POSITIVE, default=64, help="per process and micro-batch (paper: 256)")
    a("--grad-accum", type=POSITIVE, default=1, help="micro-batches per optimizer step")
    a("--recompute", action="store_true", help="recompute each block in backward: less memory")
    a("--steps", type=POSITIVE, default=1600)
    a("--ema-decay", type=DECAY, default=0.999, help="weight EMA (paper: 0.9999)")
    a("--seed", type=SEED, default=0)
    a("--out", default="runs/default")
    a("--resume", action="store_true", help="continue from OUT/ckpt.pt")
    a("--precision", default="auto", choices=["auto", "fp32", "bf16"], help="auto: bf16 on CUDA")
    a("--compile", action="store_true", help="torch.compile the model (for GPUs; no gain on a CPU)")
    a("--workers", type=AT_LEAST_ZERO, default=0, help="data loader workers")
    a("--log-every", type=POSITIVE, default=50)
    a("--save-every", type=POSITIVE,
      help="steps between checkpoints (default 400; latents: 5000, their checkpoints are GBs)")
    a("--sample-every", type=AT_LEAST_ZERO, default=800, help="grid (and scores); 0: none")
    a("--sample-steps", type=STEPS, default=50, help="sampling steps for grids")
    a("--grid-per-class", type=POSITIVE, default=20, help="samples per class row of the grid")
    a("--cfg-scale", type=WEIGHT, default=2.0)
    a("--eval", default="auto", choices=["auto", "on", "off"],
      help="score the grids (support/evaluator.py); auto: on for shapes/cifar10/fashion-mnist")
    a("--vae", default="stabilityai/sd-vae-ft-ema", help="decodes latent samples (diffusers)")
    a("--dist-timeout", type=POSITIVE, default=10,
      help="minutes a process waits for the others, plus the checkpoint's write at 50 MB/s")
    args = p.parse_args(argv)
    args.save_every = args.save_every or (5000 if args.data == "latents" else 400)
    return args


def model_config(args, ds):
    x, _ = ds[0]
    shape = x.shape[1:] if ds.latent else x.shape                          # (C, H, W)
    require(shape[1] == shape[2], f"images must be square, got {tuple(shape)}")
    learn_sigma = {"on": True, "off": False, "auto": ds.latent}[args.learn_sigma]
    same = ("routing", "gating", "granularity", "threshold_decay", "schedule", "loss_weight",
            "min_snr_gamma", "prediction", "plr_init")              # flags named as Config fields
    try:
        return R.make_config(args.model, None if args.routing == "dense" else args.experts,
                             input_size=shape[-1], in_channels=shape[0] // (1 + ds.latent),
                             learn_sigma=learn_sigma, num_classes=ds.num_classes,
                             **{k: getattr(args, k) for k in same})
    except ValueError as e:
        raise UserError(e) from None


# --------------------------------------------------------------------------------------------------
# The training step

def build(cfg, args, device):
    """The model, its EMA copy and AdamW, as every run starts them. The model is created on its
    device (an XL model built on the host would cost each process its size in host memory and a
    slow CPU initialisation); AdamW is fused on CUDA (no full-size temporaries in its step)."""
    with torch.device(device):
        model = R.RaceDiT(cfg)
    model.recompute = args.recompute
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0,
                            fused=device.type == "cuda")
    return model, ema, opt


def device_batches(raw, ds, device, num_timesteps):
    """Loader batches [(x, y)] -> micro-batches [(x0, y, t, noise)] on the device. The copies come
    from pinned memory and every random tensor is drawn on the device: no host synchronisation."""
    micro = []
    for x, y in raw:
        x0 = to_model_input(x.to(device, non_blocking=True), ds)
        t = torch.randint(0, num_timesteps, (len(x0),), device=device)
        micro.append((x0, y.to(device, non_blocking=True), t, torch.randn_like(x0)))
    return micro


def accumulate(net, diffusion, micro, args, autocast):
    """Forward and backward over micro-batches [(x0, y, t, noise)], each loss scaled by 1/N: for a
    dense model the gradients equal those of one batch holding all of them. Expert Race runs one
    race per micro-batch (as every DDP process does), so K = B_micro * L * k. DDP syncs on the last
    one only. Returns the losses averaged over micro-batches (detached) and the last micro-batch's
    selection masks: all the logs need (logits and PLR maps would stay alive to the next step)."""
    sums = {}
    for i, (x0, y, t, noise) in enumerate(micro):
        last = i == len(micro) - 1
        sync = contextlib.nullcontext() if last or not hasattr(net, "no_sync") else net.no_sync()
        with sync:
            with autocast():
                losses, aux = diffusion.training_losses(net, x0, y, args.plr_weight,
                                                        args.rsl_weight, args.balance_weight,
                                                        t=t, noise=noise)
            (losses["loss"] / len(micro)).backward()
        sums = {k: sums.get(k, 0) + v.detach().float() / len(micro) for k, v in losses.items()}
    return sums, [dict(mask=a["mask"]) for a in aux]


@torch.no_grad()
def average_thresholds(model):
    """Each process raced its own batch (S3, S4): every process takes the mean thresholds."""
    thresholds = [m.threshold for m in model.moe_layers()]
    if thresholds and dist.is_initialized():
        mean = torch.stack(thresholds)                                    # (layers,)
        dist.all_reduce(mean)
        for threshold, value in zip(thresholds, mean / dist.get_world_size()):
            threshold.copy_(value)


@torch.no_grad()
def update_ema(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * model, tensor by tensor, as DiT; under no_grad, so that
    the EMA never joins the autograd graph. Its thresholds are calibrated when it is used (S4)."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - decay)


def train_step(net, model, ema, opt, diffusion, micro, step, args, autocast):
    """One optimizer step: learning rate, forward and backward over the micro-batches, AdamW, the
    race thresholds averaged over processes, the EMA. Returns accumulate's (losses, aux)."""
    for group in opt.param_groups:  # a linear warm-up, then constant (DiT)
        group["lr"] = args.lr * min(1.0, (step + 1) / (args.warmup + 1))
    opt.zero_grad(set_to_none=True)
    losses, aux = accumulate(net, diffusion, micro, args, autocast)
    opt.step()
    average_thresholds(model)
    # warm-up: a useful EMA early
    update_ema(ema, model, min(args.ema_decay, (1 + step) / (10 + step)))
    return losses, aux


# --------------------------------------------------------------------------------------------------
# Saving, sampling, logging

def calibrate_ema(ema, diffusion, ds, batch_size, seed, autocast, device):
    """S4: the EMA's thresholds from its own cutoffs on the data set's first examples (up to 4
    batches), on a forked RNG stream, so that saving or sampling never changes the run's random
    numbers."""
    x, y = first_examples(ds, 4 * batch_size, device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), autocast():
        torch.manual_seed(seed)
        batches = [(to_model_input(xb, ds), yb) for xb, yb in zip(x.split(batch_size),
                                                                   y.split(batch_size))]
        R.calibrate_thresholds(ema, diffusion, batches)


def save(path, step, model, ema, opt, cfg, args, losses, rank, world, device):
    """Refuse to write anything non-finite; gather every process's RNG state; rank 0 writes
    atomically."""
    state = [*model.state_dict().values(), *ema.state_dict().values(), *losses.values()]
    if not all(bool(t.isfinite().all()) for t in state if t.is_floating_point()):
        last = load_checkpoint(path)["step"] if path.exists() else None
        raise Diverged(f"non-finite loss or weights by step {step}; nothing saved "
                       f"(last checkpoint: step {last}, intact); lower --lr or raise --warmup")
    cuda = device.type == "cuda"
    rng = dict(cpu=torch.get_rng_state(), cuda=torch.cuda.get_rng_state(device) if cuda else None)
    rngs = [rng] * world
    if world > 1:
        dist.all_gather_object(rngs, rng)
    if rank == 0:
        save_checkpoint(path, dict(model=model.state_dict(), ema=ema.state_dict(),
                                   opt=opt.state_dict(), step=step,
                                   config=dataclasses.asdict(cfg), args=vars(args), rng=rngs))


def sample_grid(ema, diffusion, path, args, ds, vae, evaluator, autocast, device):
    """One row per class (10 at most), the same seeds at every step; scored by the evaluator."""
    cfg = ema.cfg
    classes = np.linspace(0, cfg.num_classes - 1, min(cfg.num_classes, 10)).round().astype(int)
    y = torch.tensor(classes, device=device).repeat_interleave(args.grid_per_class)
    with autocast():
        x = diffusion.sample(ema, y, args.sample_steps, cfg_scale=args.cfg_scale, seed=args.seed,
                             clip_x0=not ds.latent)
    images = to_uint8(vae.decode(x.float() / LATENT_SCALE).sample if ds.latent else x)
    save_grid(images, path, nrow=args.grid_per_class)
    return evaluator.score(images, y.cpu().numpy()) if evaluator is not None else {}


def log_record(step, n, sums, aux, t, seconds, model, opt, args, rank, world, device):
    """Losses averaged over the n steps since the last record and over processes: a progress line
    on rank 0 and the record for metrics.jsonl, with the last micro-batch's routing statistics."""
    names = sorted(sums)
    vals = torch.stack([sums[k] for k in names]) / n
    if world > 1:
        dist.all_reduce(vals)
        vals /= world
    vals = dict(zip(names, vals.tolist()))
    rate, mem = n / seconds, peak_memory_gib(device)
    eta, images = int((args.steps - step) / rate), rate * args.batch_size * args.grad_accum * world
    if rank == 0:
        print(f"step {step}/{args.steps} | " + " ".join(f"{k} {vals[k]:.4f}" for k in names)
              + f" | {rate:.2f} steps/s {images:.0f} img/s | peak mem {mem:.2f} GiB"
              + f" | eta {eta // 3600}h{eta % 3600 // 60:02d}m{eta % 60:02d}s", flush=True)
    record = dict(step=step, **vals, lr=opt.param_groups[0]["lr"], steps_per_s=rate,
                  images_per_s=images, mem_gib=mem)
    if aux:
        stats = routing_stats(aux, t)
        record.update({k: v for k, v in stats.items() if k != "layers"},
                      load=[layer["load"] for layer in stats["layers"]],
                      threshold=[m.threshold.item() for m in model.moe_layers()])
    return record


# --------------------------------------------------------------------------------------------------
# Training

def train(args):
    # 1. Processes, device, run folder, data and configuration: every check before any work.
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if cuda else "cpu")
    out = Path(args.out)
    ckpt_path, metrics = out / "ckpt.pt", out / "metrics.jsonl"
    if rank == 0:
        (out / "samples").mkdir(parents=True, exist_ok=True)
    ds = load_data(args.data, args.data_dir, args.image_size, "train", args.num_classes)
    cfg = model_config(args, ds)
    batch = args.batch_size * world * args.grad_accum
    require(batch <= len(ds), f"the global batch {batch} is larger than the dataset ({len(ds)})")
    require(args.resume or not ckpt_path.exists(),
            f"{ckpt_path} exists; pass --resume to continue it, or choose another --out")
    ckpt = load_checkpoint(ckpt_path) if args.resume and ckpt_path.exists() else None
    if ckpt is not None:
        check_resume(ckpt, cfg, args, world)
    scored = args.eval == "on" or (args.eval == "auto" and args.data in EVALUATED)
    sampling_on_rank = rank == 0 and args.sample_every
    evaluator = (Evaluator(args.data, args.data_dir, args.image_size)
                 if sampling_on_rank and scored else None)
    vae = load_vae(args.vae, device) if sampling_on_rank and ds.latent else None
    if world > 1:  # a hung process fails the others, but not while rank 0 writes a checkpoint
        timeout = datetime.timedelta(minutes=args.dist_timeout,
                                     seconds=checkpoint_bytes(cfg) / WRITE_RATE)
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
    if cuda:
        torch.cuda.set_device(device)
    autocast = autocast_for(args.precision, device)

    # 2. Model, EMA copy, optimizer; an exact resume restores all three and every RNG stream.
    torch.manual_seed(args.seed * 1000 + rank)
    model, ema, opt = build(cfg, args, device)
    start = restore(ckpt, model, ema, opt, rank, device) if ckpt is not None else 0
    del ckpt  # copied: unmap the file, whose blocks would stay on disk once it is replaced
    if rank == 0:
        print(f"resumed {ckpt_path} at step {start}" if start else "", end="\n" if start else "")
        keep_metrics(metrics, start)
        total, active = count_params(model)
        size = f"{cfg.in_channels}x{cfg.input_size}x{cfg.input_size}"
        print(f"{args.model} {cfg.routing} {'' if cfg.routing == 'dense' else args.experts} on "
              f"{args.data} {size}: {total / 1e6:.2f}M parameters, {active / 1e6:.2f}M activated; "
              f"{world} process(es) on {device}")
    diffusion = R.Diffusion(cfg)
    net = model
    if world > 1:
        # gradient_as_bucket_view: the gradients live in DDP's buckets, not in a second copy
        net = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False,
                                                        gradient_as_bucket_view=True)
    net = torch.compile(net) if args.compile else net

    # 3. Data: the batches of step s are a function of (seed, s), so a resume sees the same ones.
    # The loader has its own generator: creating its iterator must not shift torch's stream.
    order = BatchOrder(len(ds), args.batch_size, args.seed, start, rank, world, args.grad_accum)
    loader = iter(torch.utils.data.DataLoader(ds, batch_sampler=order, num_workers=args.workers,
                                              generator=torch.Generator(), pin_memory=cuda))

    # 4. The loop.
    sums, n, tick, started = {}, 0, time.time(), time.time()
    for step in range(start, args.steps):
        # 4a. This step's micro-batches on the device, then one optimizer step (EMA included).
        micro = device_batches([next(loader) for _ in range(args.grad_accum)], ds, device,
                               diffusion.num_timesteps)
        losses, aux = train_step(net, model, ema, opt, diffusion, micro, step, args, autocast)
        sums = {k: sums.get(k, 0) + v for k, v in losses.items()}
        n, done = n + 1, step + 1
        saving = done % args.save_every == 0 or done == args.steps
        sampling = args.sample_every and (done % args.sample_every == 0 or done == args.steps)
        if not (done % args.log_every == 0 or saving or sampling):
            continue

        # 4b. Log the losses since the last record; stop before saving anything that diverged.
        t = micro[-1][2]                                                  # the timesteps of `aux`
        record = log_record(done, n, sums, aux, t, time.time() - tick, model, opt, args, rank,
                            world, device)
        if not math.isfinite(record["loss"]):
            raise Diverged(f"loss became {record['loss']} between steps {done - n} and {done}; "
                           f"nothing saved since; {ckpt_path} keeps the last good state; "
                           "lower --lr")

        # 4c. Save, then sample: a sampling failure never costs the training.
        if saving or sampling:
            calibrate_ema(ema, diffusion, ds, args.batch_size, args.seed + done, autocast, device)
            save(ckpt_path, done, model, ema, opt, cfg, args, sums, rank, world, device)
        if sampling and rank == 0:
            tock = time.time()
            path = out / "samples" / f"step_{done:07d}.png"
            scores = sample_grid(ema, diffusion, path, args, ds, vae, evaluator, autocast, device)
            record.update(scores, sample_seconds=time.time() - tock)
            if scores:
                print(f"  samples of step {done}: class accuracy {scores['accuracy']:.3f}, log p "
                      f"{scores['logp']:.3f}, KID {scores['kid']:.3f} ± {scores['kid_se']:.3f}")
        if rank == 0:
            with open(metrics, "a") as f:
                f.write(json.dumps(record) + "\n")
        sums, n, tick = {}, 0, time.time()

    if rank == 0:
        plot_losses(metrics, out / "loss.png")
        print(f"done in {time.time() - started:.0f} s: {ckpt_path}, {out}/samples, {out}/loss.png")
    if world > 1:  # torn down together: a rank that leaves first can hang another's teardown
        dist.barrier()
        dist.destroy_process_group()


def main(argv=None):
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    prog = f"train.py (rank {rank})" if world > 1 else "train.py"
    args = parse_args(argv, prog)  # every flag checked here, before any work
    # A second run on the same folder stops at the lock; rank 0 alone writes, so it alone locks.
    run_main(prog, lambda: train(args), locked(args.out) if rank == 0 else None)


if __name__ == "__main__":
    main()
