"""
Sample from a train.py checkpoint (or a reference DiT state_dict): a PNG grid, an ADM-format .npz
for FID, and the routing pictures (experts per token by timestep, the paper's Fig. 6, and per token
over the images: --routing-map).

    python sample.py --ckpt runs/default/ckpt.pt --out grid.png
    python sample.py --ckpt CKPT --num-samples 50000 --npz samples.npz --cfg-scale 1.5 --steps 250
    torchrun --nproc_per_node 8 sample.py --ckpt CKPT --num-samples 50000 --npz samples.npz
    python sample.py --ckpt CKPT --experts-by-timestep experts.json
    python sample.py --ckpt CKPT --labels 0,1,2,3,4,5,6,7,8,9 --num-samples 200 --routing-map m.png
    python sample.py --ckpt DiT-XL-2-256x256.pt --model XL/2 --labels 207,360,387 --out dit.png
"""
import datetime
import hashlib
import json
import math
import os
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import race_dit as R
from support.data import LATENT_SCALE, first_examples, load_data, load_vae, to_model_input, to_uint8
from support.pictures import experts_chart, routing_map, save_grid
from support.routing import ExpertsByTimestep, experts_per_token_at
from support.runs import (POSITIVE, SEED, STEPS, WEIGHT, Parser, UserError, atomic_write,
                          autocast_for, load_model, require, run_main, use_bf16, writable_folder)


def parse_args(argv=None):
    p = Parser(prog="sample.py", description=__doc__)
    a = p.add_argument
    a("--ckpt", required=True,
      help="a train.py checkpoint, or a reference DiT state_dict with --model")
    a("--model", help="for a reference DiT state_dict: its size, e.g. XL/2")
    a("--online", action="store_true", help="the online weights instead of the EMA")
    a("--select-by", default="threshold", choices=["threshold", "topk"],
      help="threshold: the calibrated per-layer threshold (S4); topk: batch top-K, for comparison")
    a("--sampler", default="ddpm", choices=["ddpm", "ddim"])
    a("--steps", type=STEPS, default=250)
    a("--cfg-scale", type=WEIGHT, default=1.5, help="classifier-free guidance; 1 = none")
    a("--seed", type=SEED, default=0)
    a("--labels", help="comma-separated class labels (cycled to --num-samples)")
    a("--num-samples", type=POSITIVE, help="default: the number of --labels, else 64")
    a("--batch-size", type=POSITIVE, default=64, help="per process")
    a("--out", default="grid.png", help="PNG grid of the samples ('' for none)")
    a("--nrow", type=POSITIVE, default=8)
    a("--npz", help="also write the samples as uint8 (N, H, W, 3) arr_0 (ADM evaluation format)")
    a("--experts-by-timestep", help="JSON path; also writes a PNG chart beside it")
    a("--routing-map", help="PNG: experts per token over the samples at 5 timesteps and the mean "
      "per class; PNG_train.png: the same for a training batch noised to those timesteps")
    a("--vae", default="stabilityai/sd-vae-ft-ema",
      help="decodes a latent model's samples (diffusers)")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a("--precision", default="auto", choices=["auto", "fp32", "bf16"],
      help="auto: bf16 autocast on CUDA (as train.py, whose thresholds it calibrated), fp32 on CPU")
    return p.parse_args(argv)


@torch.no_grad()
def training_batch_map(path, model, diffusion, autocast, ckpt, n, timesteps, vae, args):
    """--routing-map's second picture: the first n training images, noised to the timesteps of
    the samples' map, with the same overlays."""
    a, device = ckpt["args"], next(model.parameters()).device
    try:
        ds = load_data(a["data"], a["data_dir"], a["image_size"], "train", a["num_classes"])
    except (KeyError, UserError) as e:
        return print(f"note: no training-batch routing map ({e})")
    if ds.latent and vae is None:
        return print("note: no training-batch routing map (latents need the VAE to be shown)")
    x, y = first_examples(ds, n, device)
    torch.manual_seed(args.seed)                   # to_model_input's flips (latents: posterior)
    x0 = to_model_input(x, ds)
    g, bs = torch.Generator().manual_seed(args.seed), args.batch_size
    with autocast():
        maps = torch.cat([experts_per_token_at(model, diffusion, xb, yb, timesteps, g)
                          for xb, yb in zip(x0.split(bs), y.split(bs))], dim=1)   # (T, n, L)
    images = to_uint8(torch.cat([vae.decode(xb / LATENT_SCALE).sample for xb in x0.split(bs)])
                      if ds.latent else x0)
    routing_map(images, maps.float().cpu().numpy(), y.cpu().numpy(), timesteps, path,
                f"experts per token on {len(y)} training images (select by {args.select_by})")
    print(f"wrote {path}")


def weights_digest(model):
    """sha256 of every tensor of the model: a resumed --npz must come from the same weights."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode() + tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def choose_labels(args, num_classes):
    if args.labels:
        given = [v.strip() for v in args.labels.split(",")]
        ok = all(re.fullmatch(r"[0-9]+", v) and int(v) < num_classes for v in given)
        require(ok, f"--labels must be comma-separated classes in 0..{num_classes - 1}")
        n = args.num_samples or len(given)
        return torch.tensor([int(v) for v in given]).repeat(math.ceil(n / len(given)))[:n]
    gen = torch.Generator().manual_seed(args.seed)
    return torch.randint(0, num_classes, (args.num_samples or 64,), generator=gen)


def run(args, grid_max=256):
    for path, flag in ((args.out, "--out"), (args.npz, "--npz"),
                       (args.experts_by_timestep, "--experts-by-timestep"),
                       (args.routing_map, "--routing-map")):
        if path:
            writable_folder(path, flag)
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if args.device == "cuda"
                          else args.device)
    model, ckpt = load_model(args.ckpt, args.online, args.model)
    latent, digest = ckpt["args"]["data"] == "latents", weights_digest(model)
    model.to(device)
    cfg = model.cfg
    R.set_select_by(model, args.select_by)
    require(not args.routing_map or cfg.routing != "dense", "--routing-map needs an MoE model")
    require(args.cfg_scale == 1 or cfg.class_dropout_prob > 0,
            "--cfg-scale needs a model trained with label dropout (a null class); use 1")
    autocast = autocast_for(args.precision, device)
    labels = choose_labels(args, cfg.num_classes)
    vae = None
    if latent:
        try:
            vae = load_vae(args.vae, device)
        except UserError as e:
            require(not args.npz,
                    f"--npz of a latent model needs the VAE to decode its samples: {e}")
            print(f"note: {e}; writing latents only. Decode them with diffusers: "
                  f"AutoencoderKL.from_pretrained('{args.vae}').decode(z / {LATENT_SCALE}).sample")
    if device.type == "cuda":  # NCCL's barriers use the current device: this process's own
        torch.cuda.set_device(device)
    if world > 1:  # bounded: a process that died makes the others fail instead of wait forever
        timeout = datetime.timedelta(minutes=10)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout)
    # --npz: each batch is saved as a part file; a rerun resumes only if the weights (by content),
    # the labels and every setting that changes an image are the same.
    parts = Path(args.npz + ".parts") if args.npz else None
    meta = dict(weights_sha256=digest, online=args.online, select_by=args.select_by,
                precision="bf16" if use_bf16(args.precision, device) else "fp32",
                sampler=args.sampler, steps=args.steps, cfg_scale=args.cfg_scale, seed=args.seed,
                diffusion=[cfg.schedule, cfg.prediction],
                batch_size=args.batch_size,
                labels_sha256=hashlib.sha256(labels.numpy().tobytes()).hexdigest(), n=len(labels))
    if parts is not None and rank == 0:
        old = parts / "meta.json"
        require(not old.exists() or json.loads(old.read_text()) == meta,
                f"{parts} holds an interrupted run of another model, labels or settings; "
                "delete it or match them")
        parts.mkdir(parents=True, exist_ok=True)
        atomic_write(old, lambda tmp: tmp.write_text(json.dumps(meta)))
    if world > 1:
        dist.barrier()

    # --routing-map: the sampling steps whose per-token maps are kept (5, fewer if --steps < 5)
    map_steps = {round(v) for v in np.linspace(0, args.steps - 1, 5)} if args.routing_map else set()
    stats = ExpertsByTimestep(map_steps, guided=args.cfg_scale != 1)
    diffusion = R.Diffusion(model.cfg)
    shown, latents, mapped = [], [], []                              # mapped: (images, labels)
    mine = list(range(rank * args.batch_size, len(labels), world * args.batch_size))  # batch starts
    for b, s in enumerate(mine):
        part = parts / f"{s:08d}.npy" if parts else None
        if part is not None and part.exists():
            images = np.load(part)                                       # resumed: generated before
        else:
            with autocast():
                x = diffusion.sample(model, labels[s:s + args.batch_size].to(device), args.steps,
                                     args.sampler, args.cfg_scale, args.seed, first=s,
                                     clip_x0=not latent, on_step=stats)
            if latent:
                latents.append(x.cpu().numpy())
                x = vae.decode(x / LATENT_SCALE).sample if vae is not None else None
            images = to_uint8(x) if x is not None else None
            if map_steps and images is not None and sum(len(m) for m, _ in mapped) < grid_max:
                mapped.append((images, labels[s:s + args.batch_size]))  # maps of this batch
            elif map_steps:
                stats.map_steps = set()                       # enough (or not drawable): stop
            if part is not None:
                atomic_write(part,
                             lambda tmp, images=images: np.save(tmp, images, allow_pickle=False))
        if images is not None and sum(map(len, shown)) < grid_max:
            shown.append(images)
        if rank == 0:
            last = min(s + args.batch_size, len(labels)) - 1
            print(f"batch {b + 1}/{len(mine)} (process 0 of {world}): "
                  f"samples {s}..{last} of {len(labels)}", flush=True)
    if world > 1:
        dist.barrier()                                                    # every part is on disk
        dist.destroy_process_group()
    if rank != 0:
        return
    if parts is not None:
        starts = range(0, len(labels), args.batch_size)
        arr = np.concatenate([np.load(parts / f"{s:08d}.npy") for s in starts])
        def write_npz(tmp):
            with open(tmp, "wb") as f:
                np.savez(f, arr_0=arr)
        atomic_write(Path(args.npz), write_npz)
        shutil.rmtree(parts)
        print(f"wrote {args.npz}: arr_0 {arr.shape} {arr.dtype}")
    if args.out and shown:
        save_grid(np.concatenate(shown)[:grid_max], args.out, nrow=args.nrow)
        print(f"wrote {args.out}")
    if latents:
        path = Path(args.out or "samples").with_suffix(".latents.npy")
        atomic_write(path, lambda tmp: np.save(tmp, np.concatenate(latents)))
        print(f"wrote {path}: latents on the model's scale "
              f"(divide by {LATENT_SCALE} before decoding)")
    if args.routing_map and not mapped:
        print("note: no routing map (no batch was generated and shown in this run)")
    if args.routing_map and mapped:
        ts = sorted(stats.maps, reverse=True)                             # noisy -> clean
        images = np.concatenate([m for m, _ in mapped])
        maps = torch.stack([torch.cat(stats.maps[t][:len(mapped)]) for t in ts])   # (T, N, L)
        routing_map(images, maps.float().cpu().numpy(),
                    torch.cat([y for _, y in mapped]).numpy(), ts,
                    args.routing_map, f"experts per token on {len(images)} samples "
                    f"(select by {args.select_by}, {args.sampler} {args.steps} steps, "
                    f"guidance {args.cfg_scale})")
        print(f"wrote {args.routing_map}")
        training_batch_map(Path(args.routing_map).with_name(Path(args.routing_map).stem
                                                            + "_train.png"),
                           model, diffusion, autocast, ckpt, len(images), ts, vae, args)
    if stats.sums:
        result = stats.result()
        print(f"mean experts per token (select by {args.select_by}): {result['overall']:.3f} "
              f"(k = {cfg.top_k})")
        if args.experts_by_timestep:
            record = dict(select_by=args.select_by, k=cfg.top_k, **result)
            atomic_write(Path(args.experts_by_timestep),
                         lambda tmp: tmp.write_text(json.dumps(record)))
            experts_chart(result, Path(args.experts_by_timestep).with_suffix(".png"), cfg.top_k)
            print(f"wrote {args.experts_by_timestep} and "
                  f"{Path(args.experts_by_timestep).with_suffix('.png')}")


def main(argv=None):
    run_main("sample.py", lambda: run(parse_args(argv)))


if __name__ == "__main__":
    main()
