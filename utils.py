"""
Helpers shared by train.py, sample.py and evaluate.py: errors that end a script cleanly, atomic file
writes, the run-folder lock, checkpoints, sampling with per-sample seeds, images and charts.
"""
import argparse
import contextlib
import errno
import fcntl
import json
import math
import os
import re
import resource
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

import race_dit

CKPT_FORMAT = "race-dit-checkpoint-v1"
LATENT_SCALE = 0.18215  # Stable Diffusion VAE latent scale, as in DiT


class UserError(Exception):
    """Bad input: reported as one line on stderr and exit status 2."""


class Diverged(Exception):
    """A non-finite loss or weight: one line on stderr and exit status 3."""


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line on stderr (exit 2), like every other error here."""

    def error(self, message):
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def require(ok, message):
    if not ok:
        raise UserError(message)


def run_main(prog, fn):
    """Run fn(); a UserError, Diverged or full disk becomes one line on stderr and a non-zero exit."""
    try:
        return fn()
    except (UserError, Diverged) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(3 if isinstance(e, Diverged) else 2)
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        print(f"{prog}: error: no space left on device ({e.filename or 'writing'}); free some space and "
              "rerun: files written before are intact", file=sys.stderr)
        sys.exit(2)


def atomic_write(path, write):
    """write(tmp_path), then rename over path: an interrupted or failed write (kill, full disk) leaves
    the old file intact and no temporary file behind. Every file the project writes goes through here."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")  # suffix kept: np.save adds one
    try:
        write(tmp)
        os.replace(tmp, path)
    except Exception as e:
        # torch.save reports a full disk as a RuntimeError; look at the disk before the file is removed.
        if not isinstance(e, OSError) and shutil.disk_usage(path.parent).free < 2**24:
            raise OSError(errno.ENOSPC, "no space left on device", str(path)) from e
        raise
    finally:
        tmp.unlink(missing_ok=True)


def writable_folder(path, what):
    """Fail before any work when an output's folder is missing or read-only."""
    folder = Path(path).resolve().parent
    if not folder.is_dir():
        raise UserError(f"{what}: the folder {folder} does not exist; create it or choose another path")
    try:  # a real write: permission bits alone do not tell for root or a read-only file system
        tempfile.TemporaryFile(dir=folder).close()
    except OSError:
        raise UserError(f"{what}: the folder {folder} is not writable; choose another path") from None


@contextlib.contextmanager
def locked(folder):
    """An exclusive lock on a run folder while the block runs. A second run on the same folder fails at
    once; the kernel drops the lock of a killed process, so no stale lock can block."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / "LOCK", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UserError(f"{folder} is in use by another running process; "
                        "wait for it or choose another --out") from None
    try:
        yield
    finally:
        os.close(fd)


# Names from before the renames (router -> routing, target_head -> plr_head, sim_weight -> rsl_weight).
RENAMED = {"router": "routing", "sim_weight": "rsl_weight"}


def renamed(d):
    return {RENAMED.get(k, k).replace(".target_head.", ".plr_head."): v for k, v in d.items()}


def load_checkpoint(path):
    """A train.py checkpoint, memory-mapped (only what is read is loaded), with pre-rename keys mapped."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except FileNotFoundError:
        raise UserError(f"no checkpoint at {path}") from None
    except Exception as e:
        raise UserError(f"{path} is not a readable checkpoint ({type(e).__name__}: {str(e)[:120]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise UserError(f"{path} is not a race-dit checkpoint (written by this project's train.py)")
    for key in ("config", "args", "model", "ema"):
        ckpt[key] = renamed(ckpt[key])
    return ckpt


def load_model(path, online=False, size=None):
    """(model in eval mode, checkpoint) from a train.py checkpoint (the EMA weights unless online), or
    from a bare reference DiT state_dict (e.g. DiT-XL-2-256x256.pt) given its size, e.g. "XL/2"."""
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        sd = None  # load_checkpoint below names the problem
    if isinstance(sd, dict) and "pos_embed" in sd:
        require(size, f"{path} is a bare DiT state_dict: pass its size, e.g. --model XL/2")
        ckpt = dict(args=dict(data="latents"), step=0, ema=sd, model=sd)
        patch = int(size.split("/")[-1]) if re.fullmatch(r".*/[0-9]+", size) else 0
        config = dict(input_size=math.isqrt(sd["pos_embed"].shape[1]) * patch, learn_sigma=True,
                      in_channels=sd["x_embedder.proj.weight"].shape[1],
                      num_classes=sd["y_embedder.embedding_table.weight"].shape[0] - 1)
    else:
        ckpt = load_checkpoint(path)
    try:
        cfg = race_dit.Config(**ckpt["config"]) if "config" in ckpt else race_dit.make_config(size, **config)
        model = race_dit.RaceDiT(cfg)
        model.load_state_dict(ckpt["model" if online else "ema"])
    except (TypeError, ValueError, RuntimeError) as e:
        raise UserError(f"{path} does not match this model: {str(e).splitlines()[0][:200]}") from None
    return model.eval(), ckpt


def all_finite(tensors):
    return all(bool(t.isfinite().all()) for t in tensors if t.is_floating_point())


@torch.no_grad()
def generate(model, diffusion, y, first, seed, steps, cfg_scale, clip_x0, method="ddpm", on_step=None):
    """Samples for labels y, sample i seeded by (seed, first + i) alone: the same images whatever the
    batch size or process split (with threshold routing)."""
    gens = [torch.Generator().manual_seed(seed * 1_000_003 + first + i) for i in range(len(y))]
    shape = (model.cfg.in_channels, model.cfg.input_size, model.cfg.input_size)
    return diffusion.sample(model, y, shape, steps=steps, method=method, cfg_scale=cfg_scale,
                            generators=gens, clip_x0=clip_x0, on_step=on_step)


def load_vae(name, device):
    """The Stable Diffusion VAE through diffusers (optional dependency, imported only here)."""
    try:
        from diffusers.models import AutoencoderKL
    except ImportError:
        raise UserError("latents need diffusers to be encoded or decoded: pip install diffusers") from None
    try:
        return AutoencoderKL.from_pretrained(name).to(device).eval()
    except (OSError, ValueError) as e:
        raise UserError(f"could not load the VAE {name!r}: {str(e)[:160]}") from None


def to_uint8(x):
    """Model-space images (B, C, H, W) in [-1, 1] -> uint8 (B, H, W, 3), grey replicated to RGB."""
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return np.repeat(x, 3, axis=3) if x.shape[3] == 1 else x


def save_grid(images, path, nrow):
    """uint8 images (N, H, W, 3) -> one PNG, nrow images per row, 2 px gaps; images under 48 px are
    enlarged by an integer factor (nearest neighbour) so that small samples can be seen."""
    scale = max(1, 48 // images.shape[1])
    images = images.repeat(scale, axis=1).repeat(scale, axis=2)
    N, H, W, _ = images.shape
    grid = np.zeros((math.ceil(N / nrow) * (H + 2) + 2, nrow * (W + 2) + 2, 3), np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, nrow)
        grid[2 + r * (H + 2):2 + r * (H + 2) + H, 2 + c * (W + 2):2 + c * (W + 2) + W] = img
    atomic_write(path, lambda tmp: Image.fromarray(grid).save(tmp, format="PNG"))


def line_chart(series, path, title, xlabel, size=(720, 420), pad=56, hline=None, log_y=False,
               reverse_x=False, legend=()):
    """One chart helper for every picture: series = [(x values, y values, RGB colour, width), ...];
    legend = [(label, RGB colour), ...] is written in the top right corner."""
    img = Image.new("RGB", size, "white")
    draw, font = ImageDraw.Draw(img), ImageFont.load_default(13)
    W, H = size[0] - 2 * pad, size[1] - 2 * pad
    fy = (lambda v: math.log10(max(v, 1e-12))) if log_y else (lambda v: v)
    xs = [x for s in series for x in s[0]]
    ys = [fy(v) for s in series for v in s[1] if math.isfinite(v)] + ([fy(hline)] if hline else [])
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = (min(ys), max(ys)) if log_y else (0.0, max(ys) * 1.1)
    y1 = y1 if y1 > y0 else y0 + 1
    def xy(x, v):
        u = (x - x0) / (x1 - x0)
        return pad + W * ((1 - u) if reverse_x else u), pad + H * (1 - (fy(v) - y0) / (y1 - y0))
    draw.rectangle([pad, pad, pad + W, pad + H], outline="black")
    for v in np.linspace(y0, y1, 6):
        label = f"{10 ** v:.3g}" if log_y else f"{v:.3g}"
        draw.text((4, pad + H * (1 - (v - y0) / (y1 - y0)) - 7), label, fill="black", font=font)
    for x in np.linspace(x0, x1, 6):
        left = pad + W * (((x1 - x) if reverse_x else (x - x0)) / (x1 - x0))
        draw.text((left - 12, pad + H + 8), f"{x:.0f}", fill="black", font=font)
    if hline:
        draw.line([xy(x0, hline), xy(x1, hline)], fill=(170, 170, 170))
    for x, y, colour, width in series:
        points = [xy(a, b) for a, b in zip(x, y) if math.isfinite(b)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=width)
    for i, (label, colour) in enumerate(legend):
        draw.text((pad + W - 230, pad + 6 + 15 * i), label, fill=colour, font=font)
    draw.text((pad, 18), title, fill="black", font=font)
    draw.text((pad + W // 2 - 30, size[1] - 22), xlabel, fill="black", font=font)
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


def use_bf16(precision, device):
    """--precision auto: bf16 autocast on CUDA, fp32 on CPU (for the small models a CPU trains, bf16
    autocast was slower there: 4.6 vs 6.2 steps/s for the default run on 2 cores with native bf16)."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def peak_memory_gib(device):
    """Peak allocated CUDA memory, or the process's peak resident memory on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def keep_metrics(path, upto):
    """Keep the records of steps <= upto (the checkpoint's step): a restart redoes the others. A line
    cut by a kill mid-write is dropped too."""
    kept = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            if json.loads(line)["step"] <= upto:
                kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            pass
    atomic_write(path, lambda tmp: tmp.write_text("".join(kept)))


def plot_losses(metrics, path):
    """The loss curve of a run from its metrics.jsonl (total and epsilon-MSE, log scale)."""
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    steps = [r["step"] for r in records]
    line_chart([(steps, [r["loss"] for r in records], (30, 30, 30), 2),
                (steps, [r["mse"] for r in records], (40, 110, 240), 2)],
               path, "training loss (black: total, blue: epsilon MSE)", "step", log_y=True)


class RoutingStats:
    """Diffusion.sample's on_step callback: mean experts per token of each layer at each sampling step
    (Fig. 6). Sums stay on the device, so collecting them adds no host synchronisation."""

    def __init__(self):
        self.sums, self.counts = {}, {}

    def __call__(self, i, t, aux):
        if aux:
            self.sums[t] = self.sums.get(t, 0) + race_dit.experts_per_image(aux).mean(1)    # (layers,)
            self.counts[t] = self.counts.get(t, 0) + 1

    def result(self):
        ts = sorted(self.sums, reverse=True)
        per_t = [(self.sums[t] / self.counts[t]).tolist() for t in ts]           # (T, layers)
        mean = [sum(v) / len(v) for v in per_t]
        return dict(timesteps=ts, per_layer=[list(v) for v in zip(*per_t)], mean=mean,
                    overall=sum(mean) / len(mean))


def routing_chart(stats, path, k):
    n = len(stats["per_layer"])
    colour = lambda i: (int(40 + 200 * i / max(n - 1, 1)), 110, int(240 - 200 * i / max(n - 1, 1)))
    series = [(stats["timesteps"], v, colour(i), 1) for i, v in enumerate(stats["per_layer"])]
    line_chart(series + [(stats["timesteps"], stats["mean"], (0, 0, 0), 3)], path,
               f"experts per token: layers shallow (blue) to deep (red), mean (black), k = {k} (grey)",
               "timestep (noisy -> clean)", hline=k, reverse_x=True)
