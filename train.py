"""
Train Race-DiT (or a dense / token-choice / expert-choice baseline) on one device or with torchrun.

    python train.py                                            # built-in shapes data, CPU-friendly
    python train.py --data cifar10 --data-dir data/ --model S/2 --experts 2in8
    torchrun --nproc_per_node 8 train.py --data latents --data-dir latents/ --model XL/2 --experts 4in32

See README.md for the data formats and the paper's settings.
"""
import argparse
import copy
import dataclasses
import gzip
import hashlib
import json
import math
import os
import pickle
import resource
import sys
import tarfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

import race_dit as R

CKPT_FORMAT = "race-dit-checkpoint-v1"
LATENT_SCALE = 0.18215  # Stable Diffusion VAE latent scale, as in DiT
CIFAR_URL, CIFAR_MD5 = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a"
FMNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FMNIST_MD5 = {"train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
              "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
              "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
              "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310"}


class UserError(Exception):
    """Bad input: reported as one line and exit status 2, before anything is written."""


class Diverged(Exception):
    """NaN or Inf loss: reported as one line and exit status 3; the last checkpoint is kept."""


# ----------------------------------------------------------------------------------------------------
# Data. Every source is a Dataset of (uint8 image (C, H, W) or float latent moments, label);
# `to_model_input` turns a batch into x0 on the device (flips and posterior sampling use torch's RNG,
# which the checkpoint stores, so a resumed run sees the same batches).

class ArrayDataset(torch.utils.data.Dataset):
    def __init__(self, x, y, latent=False):
        self.x, self.y, self.latent = x, np.asarray(y, dtype=np.int64), latent

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return torch.from_numpy(np.array(self.x[i])), int(self.y[i])


class FolderDataset(torch.utils.data.Dataset):
    """One subfolder per class; ADM-style center crop (halve with BOX while large, then BICUBIC)."""
    EXT = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

    def __init__(self, root, size):
        classes = sorted(d.name for d in Path(root).iterdir() if d.is_dir())
        self.items = [(f, c) for c, d in enumerate(classes) for f in sorted((Path(root) / d).rglob("*"))
                      if f.suffix.lower() in self.EXT]
        self.y, self.size, self.latent = np.array([c for _, c in self.items]), size, False

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return torch.from_numpy(center_crop(Image.open(self.items[i][0]), self.size)).permute(2, 0, 1), self.items[i][1]


def center_crop(img, size):
    img = img.convert("RGB")
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(s // 2 for s in img.size), Image.BOX)
    scale = size / min(img.size)
    img = img.resize(tuple(round(s * scale) for s in img.size), Image.BICUBIC)
    a = np.asarray(img)
    top, left = (a.shape[0] - size) // 2, (a.shape[1] - size) // 2
    return np.array(a[top:top + size, left:left + size])


def make_shapes(n=10_000, size=32, seed=0):
    """Built-in data: 10 classes, each a fixed shape in a fixed colour (disc, square, ring, diamond,
    cross, triangle, two discs, and square patches of horizontal stripes, vertical stripes or checks) with random
    position, size and brightness on a noisy dark background. Deterministic by seed."""
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.arange(n) % 10)
    g = (np.arange(size) + 0.5) / size
    cx, cy, r = rng.uniform(0.35, 0.65, (3, n, 1, 1)) * [[[[1]]], [[[1]]], [[[0.5]]]]
    dx, dy = g[None, None, :] - cx, g[None, :, None] - cy                   # (n, S, S) each
    d, ph = np.hypot(dx, dy), rng.uniform(0, 2 * np.pi, (n, 1, 1))
    masks = [d < r, np.maximum(abs(dx), abs(dy)) < r * 0.85, abs(d - r) < r / 3, abs(dx) + abs(dy) < r,
             (np.minimum(abs(dx), abs(dy)) < r / 3) & (np.maximum(abs(dx), abs(dy)) < r),
             (dy < r * 0.8) & (abs(dx) < (dy + r) * 0.6),
             (np.hypot(dx - r * 0.7, dy) < r * 0.45) | (np.hypot(dx + r * 0.7, dy) < r * 0.45),
             *[(np.maximum(abs(dx), abs(dy)) < r) & p for p in (                # textures on a square patch
                 np.sin(dy * 40 + ph) > 0, np.sin(dx * 40 + ph) > 0,
                 (np.sin(dx * 30 + ph) > 0) ^ (np.sin(dy * 30) > 0))]]
    mask = np.choose(y[:, None, None], masks)                              # (n, S, S) picks each class's
    colours = np.array([[230, 40, 40], [40, 200, 60], [60, 90, 240], [240, 220, 40], [240, 240, 240],
                        [240, 130, 20], [170, 60, 220], [40, 220, 220], [230, 60, 170], [150, 110, 60]])
    light = rng.uniform(0.7, 1.0, (n, 1, 1, 1))
    img = mask[:, None] * colours[y][:, :, None, None] * light + rng.uniform(0, 40, (n, 1, size, size))
    return ArrayDataset(img.clip(0, 255).astype(np.uint8), y)


def download(url, dest, md5):
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            data = response.read()
    except OSError as e:
        raise UserError(f"{dest.name} is not in {dest.parent} and could not be downloaded ({e}); "
                        f"fetch {url} and put it there")
    if hashlib.md5(data).hexdigest() != md5:
        raise UserError(f"{url} arrived corrupted (md5 mismatch); try again")
    dest.parent.mkdir(parents=True, exist_ok=True)
    Path(str(dest) + ".part").write_bytes(data)
    os.replace(str(dest) + ".part", dest)


def load_cifar10(root, train=True):
    """The official python archive (cifar-10-python.tar.gz) or its extracted cifar-10-batches-py/."""
    root = Path(root)
    folder, archive = root / "cifar-10-batches-py", root / "cifar-10-python.tar.gz"
    names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    if not folder.is_dir():
        if not archive.is_file():
            download(CIFAR_URL, archive, CIFAR_MD5)
        with tarfile.open(archive) as tar:
            files = {Path(m.name).name: m for m in tar.getmembers()}
            batches = [pickle.load(tar.extractfile(files[n]), encoding="bytes") for n in names]
    else:
        batches = [pickle.loads((folder / n).read_bytes(), encoding="bytes") for n in names]
    x = np.concatenate([b[b"data"] for b in batches]).reshape(-1, 3, 32, 32)
    return ArrayDataset(x, np.concatenate([b[b"labels"] for b in batches]))


def load_fashion_mnist(root, train=True):
    """idx .gz files from root, else Debian's dataset-fashion-mnist, else downloaded into root."""
    split = "train" if train else "t10k"
    files = [f"{split}-images-idx3-ubyte.gz", f"{split}-labels-idx1-ubyte.gz"]
    system = Path("/usr/share/datasets/fashion-mnist")
    where = next((d for d in [Path(root), system] if all((d / f).is_file() for f in files)), None)
    if where is None:
        for f in files:
            download(FMNIST_URL + f, Path(root) / f, FMNIST_MD5[f])
        where = Path(root)
    images, labels = (np.frombuffer(gzip.open(where / f).read(), np.uint8) for f in files)
    return ArrayDataset(images[16:].reshape(-1, 1, 28, 28), labels[8:])


def load_latents(root):
    """DiT-style VAE latents (README "Latent format"): moments.npy float (N, 2, 2C, h, w) holding
    [mean | logvar] for each image and its horizontal flip, and labels.npy int (N,)."""
    root = Path(root)
    if not (root / "moments.npy").is_file() or not (root / "labels.npy").is_file():
        raise UserError(f"no moments.npy and labels.npy in {root}; see README 'ImageNet latents'")
    return ArrayDataset(np.load(root / "moments.npy", mmap_mode="r"), np.load(root / "labels.npy"), latent=True)


def load_data(args, train=True):
    try:
        if args.data == "shapes":
            return make_shapes(size=args.image_size, seed=0 if train else 1)
        if args.data == "cifar10":
            return load_cifar10(args.data_dir, train)
        if args.data == "fashion-mnist":
            return load_fashion_mnist(args.data_dir, train)
        if args.data == "latents":
            return load_latents(args.data_dir)
        if not Path(args.data).is_dir():
            raise UserError(f"--data {args.data!r} is neither a known dataset nor a folder of class folders")
        ds = FolderDataset(args.data, args.image_size)
    except (OSError, KeyError, ValueError, pickle.UnpicklingError, tarfile.TarError) as e:
        raise UserError(f"could not read {args.data} data from {args.data_dir}: {e}")
    if len(ds) == 0:
        raise UserError(f"no images found under {args.data}")
    return ds


def to_model_input(x, ds):
    """A raw batch -> x0 on the model's scale: images to [-1, 1] with random horizontal flips;
    latents: pick the image or its flip, sample the VAE posterior, scale by 0.18215."""
    if ds.latent:
        x = x[torch.arange(len(x)), torch.randint(0, 2, (len(x),), device=x.device)].float()  # (B, 2C, h, w)
        mean, logvar = x.chunk(2, dim=1)
        return (mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)) * LATENT_SCALE
    x = x.float() / 127.5 - 1
    return torch.where(torch.rand(len(x), 1, 1, 1, device=x.device) < 0.5, x.flip(-1), x)


class BatchOrder(torch.utils.data.Sampler):
    """Index lists for steps start, start+1, ...: a fresh permutation per epoch seeded by (seed, epoch),
    each rank taking its slice of the global batch, so any step's batch can be recomputed on resume."""
    def __init__(self, n, batch, seed, start, rank=0, world=1):
        self.n, self.batch, self.seed, self.start, self.rank, self.world = n, batch, seed, start, rank, world

    def __iter__(self):
        per_epoch, step, perm = self.n // (self.batch * self.world), self.start, None
        while True:
            epoch, i = divmod(step, per_epoch)
            if i == 0 or perm is None:
                perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
            lo = (i * self.world + self.rank) * self.batch
            yield perm[lo:lo + self.batch].tolist()
            step += 1


# ----------------------------------------------------------------------------------------------------
# Checkpoints, images, VAE (shared with sample.py)

def atomic_save(obj, path):
    """Write to a temporary file, then rename: an interrupted save never corrupts the old file."""
    tmp = Path(str(path) + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, map_location="cpu"):
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise UserError(f"no checkpoint at {path}")
    except Exception as e:
        raise UserError(f"{path} is not a readable checkpoint ({type(e).__name__}: {str(e)[:120]})")
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise UserError(f"{path} is not a race-dit checkpoint (written by this project's train.py)")
    return ckpt


def to_uint8(x):
    """Model-space images (B, C, H, W) in [-1, 1] -> uint8 (B, H, W, 3), grey replicated to RGB."""
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return np.repeat(x, 3, axis=3) if x.shape[3] == 1 else x


def save_grid(images, path, nrow):
    """uint8 images (N, H, W, 3) -> one PNG, nrow images per row, 2 px gaps."""
    N, H, W, _ = images.shape
    grid = np.zeros((math.ceil(N / nrow) * (H + 2) + 2, nrow * (W + 2) + 2, 3), np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, nrow)
        grid[2 + r * (H + 2):2 + r * (H + 2) + H, 2 + c * (W + 2):2 + c * (W + 2) + W] = img
    Image.fromarray(grid).save(path)


def load_vae(name, device):
    """The Stable Diffusion VAE through diffusers (optional dependency, imported only here)."""
    try:
        from diffusers.models import AutoencoderKL
    except ImportError:
        raise UserError("decoding latents needs diffusers: pip install diffusers")
    return AutoencoderKL.from_pretrained(name).to(device).eval()


@torch.no_grad()
def extract_latents(folder, out_dir, image_size, encode, device, batch=64, workers=4):
    """Encode a class-folder image dataset into the format `--data latents` reads. encode(x in [-1, 1])
    -> (mean, logvar), each (B, C, size/8, size/8); `--extract` passes the Stable Diffusion VAE's."""
    ds, out_dir = FolderDataset(folder, image_size), Path(out_dir)
    if len(ds) == 0:
        raise UserError(f"no images found under {folder}")
    out_dir.mkdir(parents=True, exist_ok=True)
    moments = None
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=workers)
    for i, (x, _) in enumerate(loader):
        x = x.to(device).float() / 127.5 - 1
        both = torch.stack([torch.cat(encode(v), dim=1) for v in (x, x.flip(-1))], dim=1)  # (B, 2, 2C, h, w)
        if moments is None:
            moments = np.lib.format.open_memmap(out_dir / "moments.tmp.npy", "w+", np.float16,
                                                (len(ds), *both.shape[1:]))
        moments[i * batch:i * batch + len(x)] = both.cpu().numpy()
        print(f"encoded {min((i + 1) * batch, len(ds))}/{len(ds)}", flush=True)
    moments.flush()
    os.replace(out_dir / "moments.tmp.npy", out_dir / "moments.npy")
    np.save(out_dir / "labels.npy", ds.y)


# ----------------------------------------------------------------------------------------------------
# Training

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--data", default="shapes", help="shapes | cifar10 | fashion-mnist | latents | a class-folder path")
    a("--data-dir", default="data", help="where cifar10 / fashion-mnist / latents files live")
    a("--image-size", type=int, default=32, help="for shapes and image folders")
    a("--model", default="XS/4", help="XS|S|B|M|L|XL / patch, e.g. B/2")
    a("--experts", default="2in8", help="k in E, e.g. 4in32")
    a("--router", default="race", choices=R.ROUTERS)
    a("--gating", default="identity", choices=R.GATINGS)
    a("--split", type=int, default=0, help="hidden split (default k)")
    a("--plr-weight", type=float, default=0.1)
    a("--sim-weight", type=float, default=0.01)
    a("--balance-weight", type=float, default=0.0, help="switch balance loss (token-choice baseline)")
    a("--threshold-decay", type=float, default=0.99)
    a("--lr", type=float, default=1e-4)
    a("--batch-size", type=int, default=32, help="per process")
    a("--steps", type=int, default=2000)
    a("--ema-decay", type=float, default=0.9999)
    a("--seed", type=int, default=0)
    a("--out", default="runs/default")
    a("--resume", action="store_true", help="continue from OUT/ckpt.pt")
    a("--precision", default="auto", choices=["auto", "fp32", "bf16"], help="auto: bf16 on CUDA, fp32 on CPU")
    a("--compile", action="store_true")
    a("--workers", type=int, default=0, help="data loader workers (image folders, latents)")
    a("--log-every", type=int, default=50)
    a("--save-every", type=int, default=1000)
    a("--sample-every", type=int, default=500, help="0: no sample grids")
    a("--sample-steps", type=int, default=50)
    a("--cfg-scale", type=float, default=2.0)
    a("--vae", default="stabilityai/sd-vae-ft-ema", help="decodes latent samples (diffusers)")
    a("--extract", metavar="IMAGE_FOLDER", help="encode IMAGE_FOLDER into latents in --data-dir, then exit")
    return p.parse_args(argv)


def model_config(args, ds):
    x, _ = ds[0]
    shape = x.shape[1:] if ds.latent else x.shape                          # (C, H, W)
    if shape[1] != shape[2]:
        raise UserError(f"images must be square, got {tuple(shape)}")
    try:
        return R.make_config(args.model, None if args.router == "dense" else args.experts, router=args.router,
                             gating=args.gating, split=args.split, threshold_decay=args.threshold_decay,
                             input_size=shape[-1], in_channels=shape[0] // 2 if ds.latent else shape[0],
                             num_classes=int(ds.y.max()) + 1)
    except ValueError as e:
        raise UserError(e)


def check_resume(ckpt, cfg, args, world):
    """What defines the run must match the checkpoint; lr, loss weights, --steps and logging may change."""
    diff = [f"{k}={v} in the checkpoint, {getattr(cfg, k)} now" for k, v in ckpt["config"].items()
            if getattr(cfg, k) != v]
    diff += [f"{k}={ckpt['args'][k]} in the checkpoint, {getattr(args, k)} now"
             for k in ("data", "image_size", "batch_size", "seed") if ckpt["args"][k] != getattr(args, k)]
    diff += [f"{len(ckpt['rng'])} processes in the checkpoint, {world} now"] if len(ckpt["rng"]) != world else []
    if diff:
        raise UserError(f"{Path(args.out) / 'ckpt.pt'} is from another configuration: {'; '.join(diff)}")


@torch.no_grad()
def generate(model, diffusion, y, first, seed, steps, cfg_scale, clip_x0, method="ddpm", on_step=None):
    """Samples for labels y, sample i seeded by (seed, first + i) alone: the same images whatever the
    batch size or process split (with threshold routing)."""
    gens = [torch.Generator().manual_seed(seed * 1_000_003 + first + i) for i in range(len(y))]
    shape = (model.cfg.in_channels, model.cfg.input_size, model.cfg.input_size)
    return diffusion.sample(model, y, shape, steps=steps, method=method, cfg_scale=cfg_scale, generators=gens,
                            clip_x0=clip_x0, on_step=on_step)


def sample_grid(ema, diffusion, args, ds, path, vae=None):
    """One row per class (10 classes at most), 8 samples each, the same seeds at every step."""
    cfg = ema.cfg
    if ds.latent and vae is None:
        return
    classes = np.linspace(0, cfg.num_classes - 1, min(cfg.num_classes, 10)).round().astype(int)
    y = torch.tensor(classes, device=ema.pos_embed.device).repeat_interleave(8)
    x = generate(ema, diffusion, y, 0, args.seed, args.sample_steps, args.cfg_scale, clip_x0=not ds.latent)
    save_grid(to_uint8(vae.decode(x / LATENT_SCALE).sample if ds.latent else x), path, nrow=8)


def train(args):
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu")
    out, ds = Path(args.out), load_data(args)
    cfg, ckpt_path = model_config(args, ds), out / "ckpt.pt"
    if args.batch_size * world > len(ds):
        raise UserError(f"global batch {args.batch_size * world} is larger than the dataset ({len(ds)})")
    if ckpt_path.exists() and not args.resume:
        raise UserError(f"{ckpt_path} exists; pass --resume to continue it, or choose another --out")
    ckpt = load_checkpoint(ckpt_path) if args.resume and ckpt_path.exists() else None
    if ckpt is not None:
        check_resume(ckpt, cfg, args, world)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    log = print if rank == 0 else (lambda *a, **k: None)
    vae = None
    if rank == 0 and ds.latent and args.sample_every:
        try:
            vae = load_vae(args.vae, device)
        except Exception as e:
            log(f"note: sample grids of latents need the VAE; none this run ({str(e)[:120]})")

    torch.manual_seed(args.seed * 1000 + rank)
    model = R.RaceDiT(cfg).to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False) if rank == 0 else None  # only rank 0 writes
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0)
    start = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        for group in opt.param_groups:
            group["lr"] = args.lr
        if ema is not None:
            ema.load_state_dict(ckpt["ema"])
        start, rng = ckpt["step"], ckpt["rng"][rank]
        torch.set_rng_state(rng["cpu"])
        if device.type == "cuda" and rng["cuda"] is not None:
            torch.cuda.set_rng_state(rng["cuda"], device)
        log(f"resumed {ckpt_path} at step {start}")
    total, active = R.count_params(model)
    log(f"{args.model} {cfg.router} {'' if cfg.router == 'dense' else args.experts} on {args.data} "
        f"{cfg.in_channels}x{cfg.input_size}x{cfg.input_size}: {total / 1e6:.2f}M parameters, {active / 1e6:.2f}M "
        f"activated; {world} process(es) on {device}")
    diffusion = R.Diffusion()
    net = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False) if world > 1 else model
    net = torch.compile(net) if args.compile else net
    bf16 = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")
    autocast = lambda: torch.autocast(device.type, torch.bfloat16, enabled=bf16)
    order = BatchOrder(len(ds), args.batch_size, args.seed, start, rank, world)
    # Its own generator: creating a DataLoader iterator draws a seed, which must not shift torch's stream.
    loader = iter(torch.utils.data.DataLoader(ds, batch_sampler=order, num_workers=args.workers,
                                              generator=torch.Generator(), pin_memory=device.type == "cuda"))
    fixed = [ds[i] for i in range(min(len(ds), 4 * args.batch_size))]      # calibration images
    calib_x, calib_y = torch.stack([x for x, _ in fixed]).to(device), torch.tensor([y for _, y in fixed]).to(device)

    def calibrate_ema(step):
        """S4: the EMA's thresholds from its own router logits, in a forked RNG stream so that saving
        and sampling never change the training run's randomness (resume stays exact)."""
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), autocast():
            torch.manual_seed(args.seed + step)
            R.calibrate_thresholds(ema, diffusion, [(to_model_input(calib_x[i::4], ds), calib_y[i::4])
                                                    for i in range(4)])

    def save(step):
        rng = dict(cpu=torch.get_rng_state(), cuda=torch.cuda.get_rng_state(device) if device.type == "cuda" else None)
        rngs = [rng] * world
        if world > 1:
            dist.all_gather_object(rngs, rng)
        if rank == 0:
            atomic_save({"format": CKPT_FORMAT, "model": model.state_dict(), "ema": ema.state_dict(),
                         "opt": opt.state_dict(), "step": step, "config": dataclasses.asdict(cfg),
                         "args": vars(args), "rng": rngs}, ckpt_path)

    def report(done, n, sums, aux, t, seconds):
        """Losses averaged over the steps since the last report and over processes: a progress line, a
        metrics.jsonl record with the routing statistics; a NaN or Inf stops the run before any save."""
        names = sorted(sums)
        vals = torch.stack([sums[k] for k in names]) / n
        if world > 1:
            dist.all_reduce(vals)
            vals /= world
        vals = dict(zip(names, vals.tolist()))
        if not all(map(math.isfinite, vals.values())):
            raise Diverged(f"loss became {vals['loss']} between steps {done - n} and {done}; stopping. "
                           f"{ckpt_path} (the last good checkpoint, if any) is untouched; try a lower --lr")
        rate = n / seconds
        mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else \
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        eta = int((args.steps - done) / rate)
        log(f"step {done}/{args.steps} | " + " ".join(f"{k} {vals[k]:.4f}" for k in names) +
            f" | {rate:.2f} steps/s {rate * args.batch_size * world:.1f} img/s | peak mem {mem:.2f} GiB"
            f" | eta {eta // 3600}h{eta % 3600 // 60:02d}m{eta % 60:02d}s", flush=True)
        if rank == 0:
            record = dict(step=done, **vals, steps_per_s=rate, images_per_s=rate * args.batch_size * world, mem_gib=mem)
            if aux:
                stats = R.routing_stats(aux, t)
                record.update({k: v for k, v in stats.items() if k != "layers"},
                              load=[layer["load"] for layer in stats["layers"]],
                              threshold=[m.threshold.item() for m in model.moe_layers()])
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    thresholds = [m.threshold for m in model.moe_layers()]
    sums, n, tick = {}, 0, time.time()
    if rank == 0:
        (out / "samples").mkdir(parents=True, exist_ok=True)
        if ckpt is not None and (out / "metrics.jsonl").exists():  # drop records the resumed steps will redo
            kept = [line for line in open(out / "metrics.jsonl") if json.loads(line)["step"] <= start]
            (out / "metrics.jsonl").write_text("".join(kept))
    for step in range(start, args.steps):
        x, y = next(loader)
        x0, y = to_model_input(x.to(device, non_blocking=True), ds), y.to(device, non_blocking=True)
        t = torch.randint(0, diffusion.num_timesteps, (len(x0),), device=device)
        with autocast():
            losses, aux = diffusion.training_losses(net, x0, y, args.plr_weight, args.sim_weight,
                                                    args.balance_weight, t=t)
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        opt.step()
        if world > 1 and thresholds:  # each rank raced its own batch: average, so all ranks agree
            mean = torch.stack(thresholds)
            dist.all_reduce(mean)
            torch._foreach_copy_(thresholds, list((mean / world).unbind()))
        if ema is not None:  # warm-up so that short runs get a useful EMA, then args.ema_decay
            decay = min(args.ema_decay, (1 + step) / (10 + step))
            for pe, p in zip(ema.parameters(), model.parameters()):
                pe.lerp_(p.detach(), 1 - decay)
            for be, b in zip(ema.buffers(), model.buffers()):
                be.copy_(b)
        sums = {k: sums.get(k, 0) + v.detach().float() for k, v in losses.items()}
        n, done = n + 1, step + 1
        saving = done % args.save_every == 0 or done == args.steps
        sampling = rank == 0 and args.sample_every and (done % args.sample_every == 0 or done == args.steps)
        if done % args.log_every == 0 or saving or sampling:
            report(done, n, sums, aux, t, time.time() - tick)
            if rank == 0 and (saving or sampling):
                calibrate_ema(done)
            if sampling:
                sample_grid(ema, diffusion, args, ds, out / "samples" / f"step_{done:07d}.png", vae)
            if saving:
                save(done)
            sums, n, tick = {}, 0, time.time()
    if world > 1 and thresholds:
        every = [None] * world
        dist.all_gather_object(every, [v.item() for v in thresholds])
        log(f"thresholds identical across {world} ranks: {all(e == every[0] for e in every)}")
    log(f"done: {ckpt_path}")
    if world > 1:
        dist.destroy_process_group()


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.extract:
            device = "cuda" if torch.cuda.is_available() else "cpu"
            vae = load_vae(args.vae, device)
            encode = lambda x: (lambda d: (d.mean, d.logvar))(vae.encode(x).latent_dist)
            return extract_latents(args.extract, args.data_dir, args.image_size, encode, device, workers=args.workers)
        for flag in ("steps", "batch_size", "log_every", "save_every", "image_size"):
            if getattr(args, flag) <= 0:
                raise UserError(f"--{flag.replace('_', '-')} must be positive")
        train(args)
    except (UserError, Diverged) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        sys.exit(3 if isinstance(e, Diverged) else 2)


if __name__ == "__main__":
    main()
