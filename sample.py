"""
Sample from a train.py checkpoint: a PNG grid, an ADM-format .npz for FID, and the routing picture.

    python sample.py --ckpt runs/default/ckpt.pt --out grid.png
    python sample.py --ckpt CKPT --num-samples 50000 --npz samples.npz --cfg-scale 1.5 --steps 250
    torchrun --nproc_per_node 8 sample.py --ckpt CKPT --num-samples 50000 --npz samples.npz
    python sample.py --ckpt CKPT --routing-stats routing.json      # mean experts per token by timestep
"""
import argparse
import json
import math
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw, ImageFont

import race_dit as R
from train import LATENT_SCALE, UserError, generate, load_checkpoint, load_vae, save_grid, to_uint8


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--ckpt", required=True, help="a checkpoint written by train.py")
    a("--online", action="store_true", help="the online weights instead of the EMA")
    a("--routing", default="threshold", choices=["threshold", "topk"],
      help="threshold: per-token calibrated threshold (S4); topk: batch top-K, for comparison")
    a("--sampler", default="ddpm", choices=["ddpm", "ddim"])
    a("--steps", type=int, default=250)
    a("--cfg-scale", type=float, default=1.5, help="classifier-free guidance on all channels; 1 = none")
    a("--seed", type=int, default=0)
    a("--labels", help="comma-separated class labels (cycled to --num-samples)")
    a("--num-samples", type=int, help="default: the number of --labels, else 64")
    a("--batch-size", type=int, default=64, help="per process")
    a("--out", default="grid.png", help="PNG grid of the samples ('' for none)")
    a("--nrow", type=int, default=8)
    a("--npz", help="also write the samples as uint8 (N, H, W, 3) arr_0 (ADM evaluation format)")
    a("--routing-stats", help="JSON path; also writes a PNG chart beside it")
    a("--vae", default="stabilityai/sd-vae-ft-ema", help="decodes a latent model's samples (diffusers)")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def load_model(path, device, online=False):
    """Rebuild the model from a checkpoint's stored configuration; the EMA weights unless online."""
    ckpt = load_checkpoint(path)
    try:
        model = R.RaceDiT(R.Config(**ckpt["config"]))
        model.load_state_dict(ckpt["model" if online else "ema"])
    except (TypeError, ValueError, RuntimeError) as e:
        raise UserError(f"{path} does not match this version of race_dit.py: {str(e)[:200]}")
    return model.to(device).eval(), ckpt


def choose_labels(args, num_classes):
    if args.labels:
        given = [int(v) for v in args.labels.split(",") if v.strip().isdigit()]
        if len(given) != len(args.labels.split(",")) or not all(v < num_classes for v in given):
            raise UserError(f"--labels must be comma-separated classes in 0..{num_classes - 1}")
        n = args.num_samples or len(given)
        return torch.tensor(given).repeat(math.ceil(n / len(given)))[:n]
    return torch.randint(0, num_classes, (args.num_samples or 64,), generator=torch.Generator().manual_seed(args.seed))


class RoutingStats:
    """on_step callback: mean experts per token at each sampling timestep, per layer (the paper's
    Fig. 6). Sums stay on the device, so collecting them adds no host synchronisation."""

    def __init__(self):
        self.sums, self.counts = {}, {}

    def __call__(self, i, t, aux):
        if aux:
            self.sums[t] = self.sums.get(t, 0) + torch.stack([a["mask"].float().sum(-1).mean() for a in aux])
            self.counts[t] = self.counts.get(t, 0) + 1

    def result(self):
        ts = sorted(self.sums, reverse=True)
        per_t = [(self.sums[t] / self.counts[t]).tolist() for t in ts]     # (T, layers)
        mean = [sum(v) / len(v) for v in per_t]
        return dict(timesteps=ts, per_layer=[list(v) for v in zip(*per_t)], mean=mean,
                    overall=sum(mean) / len(mean))


def draw_chart(stats, path, k, size=(720, 420), pad=50):
    """A thin line per layer and a thick one for their mean against the timestep (pillow only)."""
    img = Image.new("RGB", size, "white")
    d, font = ImageDraw.Draw(img), ImageFont.load_default(13)
    W, H = size[0] - 2 * pad, size[1] - 2 * pad
    top = max(max(max(v) for v in stats["per_layer"]), k) * 1.15
    xy = lambda t, v: (pad + W * (1 - t / 999), pad + H * (1 - v / top))  # noise high (left) to low
    d.rectangle([pad, pad, pad + W, pad + H], outline="black")
    for v in np.linspace(0, top, 6):
        d.text((8, xy(999, v)[1] - 7), f"{v:.1f}", fill="black", font=font)
    for t in range(0, 1000, 200):
        d.text((xy(t, 0)[0] - 10, pad + H + 8), str(t), fill="black", font=font)
    d.line([xy(999, k), xy(0, k)], fill=(170, 170, 170))
    n = len(stats["per_layer"])
    for i, values in enumerate(stats["per_layer"]):
        colour = (int(40 + 200 * i / max(n - 1, 1)), 110, int(240 - 200 * i / max(n - 1, 1)))
        d.line([xy(t, v) for t, v in zip(stats["timesteps"], values)], fill=colour, width=1)
    d.line([xy(t, v) for t, v in zip(stats["timesteps"], stats["mean"])], fill="black", width=3)
    d.text((pad, 15), f"experts per token: layers shallow (blue) to deep (red), mean (black), k = {k} (grey)",
           fill="black", font=font)
    d.text((pad + W // 2 - 30, size[1] - 22), "timestep", fill="black", font=font)
    img.save(path)


def main(argv=None):
    args = parse_args(argv)
    try:
        run(args)
    except UserError as e:
        print(f"sample.py: error: {e}", file=sys.stderr)
        sys.exit(2)


def run(args, grid_max=256):
    for flag, ok in [("steps", 1 <= args.steps <= 1000), ("batch_size", args.batch_size > 0),
                     ("num_samples", (args.num_samples or 1) > 0), ("nrow", args.nrow > 0)]:
        if not ok:
            raise UserError(f"--{flag.replace('_', '-')} is out of range")
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if args.device == "cuda" else args.device)
    model, ckpt = load_model(args.ckpt, device, args.online)
    cfg, latent = model.cfg, ckpt["args"]["data"] == "latents"
    R.set_inference_routing(model, args.routing)
    labels = choose_labels(args, cfg.num_classes)
    vae = None
    if latent:
        try:
            vae = load_vae(args.vae, device)
        except Exception as e:
            if args.npz:
                raise UserError(f"--npz of a latent model needs the VAE to decode its samples: {e}")
            print(f"note: no VAE ({str(e)[:160]}); writing latents only. Decode them with diffusers: "
                  f"AutoencoderKL.from_pretrained('{args.vae}').decode(z / {LATENT_SCALE}).sample")
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    # --npz: each batch is saved as a part file; a rerun with the same settings skips those on disk.
    parts = Path(args.npz + ".parts") if args.npz else None
    meta = dict(ckpt=str(Path(args.ckpt).resolve()), online=args.online, routing=args.routing, sampler=args.sampler,
                steps=args.steps, cfg_scale=args.cfg_scale, seed=args.seed, n=len(labels), batch_size=args.batch_size)
    if parts is not None and rank == 0:
        if (parts / "meta.json").exists() and json.loads((parts / "meta.json").read_text()) != meta:
            raise UserError(f"{parts} holds an interrupted run with other settings; delete it or match them")
        parts.mkdir(parents=True, exist_ok=True)
        (parts / "meta.json").write_text(json.dumps(meta))
    if world > 1:
        dist.barrier()

    diffusion, stats, shown, latents = R.Diffusion(), RoutingStats(), [], []
    mine = list(range(rank * args.batch_size, len(labels), world * args.batch_size))  # batch starts
    for b, s in enumerate(mine):
        part = parts / f"{s:08d}.npy" if parts else None
        if part is not None and part.exists():
            images = np.load(part)                                        # resumed: generated before
        else:
            x = generate(model, diffusion, labels[s:s + args.batch_size].to(device), s, args.seed, args.steps,
                         args.cfg_scale, clip_x0=not latent, method=args.sampler, on_step=stats)
            if latent:
                latents.append(x.cpu().numpy())
                x = vae.decode(x / LATENT_SCALE).sample if vae is not None else None
            images = to_uint8(x) if x is not None else None
            if part is not None:
                np.save(part.with_suffix(".tmp.npy"), images)
                os.replace(part.with_suffix(".tmp.npy"), part)
        if images is not None and sum(map(len, shown)) < grid_max:
            shown.append(images)
        if rank == 0:
            last = min(s + args.batch_size, len(labels)) - 1
            print(f"batch {b + 1}/{len(mine)} (process 0 of {world}): samples {s}..{last} of {len(labels)}", flush=True)
    if world > 1:
        dist.barrier()                                                    # every part is on disk
        dist.destroy_process_group()
    if rank != 0:
        return
    if parts is not None:
        arr = np.concatenate([np.load(parts / f"{s:08d}.npy") for s in range(0, len(labels), args.batch_size)])
        np.savez(args.npz + ".tmp.npz", arr_0=arr)
        os.replace(args.npz + ".tmp.npz", args.npz)
        shutil.rmtree(parts)
        print(f"wrote {args.npz}: arr_0 {arr.shape} {arr.dtype}")
    if args.out and shown:
        save_grid(np.concatenate(shown)[:grid_max], args.out, nrow=args.nrow)
        print(f"wrote {args.out}")
    if latents:
        path = Path(args.out or "samples").with_suffix(".latents.npy")
        np.save(path, np.concatenate(latents))
        print(f"wrote {path}: latents on the model's scale (divide by {LATENT_SCALE} before decoding)")
    if stats.sums:
        result = stats.result()
        print(f"mean experts per token ({args.routing} routing): {result['overall']:.3f} (k = {cfg.top_k})")
        if args.routing_stats:
            Path(args.routing_stats).write_text(json.dumps(dict(routing=args.routing, k=cfg.top_k, **result)))
            draw_chart(result, Path(args.routing_stats).with_suffix(".png"), cfg.top_k)
            print(f"wrote {args.routing_stats} and {Path(args.routing_stats).with_suffix('.png')}")


if __name__ == "__main__":
    main()
