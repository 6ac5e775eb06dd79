"""
The PNG pictures every script writes: sample grids, line charts (loss curves, experts per token
by timestep, benchmark charts) and routing maps (experts per token over images), drawn with Pillow
alone.
"""
import json
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from support.runs import atomic_write


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


def plot_losses(metrics, path):
    """The loss curve of a run from its metrics.jsonl (total and the target's MSE, log scale)."""
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    steps = [r["step"] for r in records]
    line_chart([(steps, [r["loss"] for r in records], (30, 30, 30), 2),
                (steps, [r["mse"] for r in records], (40, 110, 240), 2)],
               path, "training loss (black: total, blue: MSE of the target, eps or v)", "step",
               log_y=True)


def experts_chart(stats, path, k):
    n = len(stats["per_layer"])
    colour = lambda i: (int(40 + 200 * i / max(n - 1, 1)), 110, int(240 - 200 * i / max(n - 1, 1)))
    series = [(stats["timesteps"], v, colour(i), 1) for i, v in enumerate(stats["per_layer"])]
    line_chart(series + [(stats["timesteps"], stats["mean"], (0, 0, 0), 3)], path,
               "experts per token: layers shallow (blue) to deep (red), mean (black), "
               f"k = {k} (grey)",
               "timestep (noisy -> clean)", hline=k, reverse_x=True)


HEAT = np.array([(20, 20, 90), (40, 110, 240), (60, 190, 120), (250, 220, 40), (230, 40, 30)])


def heat(v):
    """Values in [0, 1] (any shape) -> RGB along dark blue, blue, green, yellow, red."""
    pos = np.clip(v, 0, 1) * (len(HEAT) - 1)
    lo = np.minimum(pos.astype(int), len(HEAT) - 2)
    w = (pos - lo)[..., None]
    return ((1 - w) * HEAT[lo] + w * HEAT[lo + 1]).astype(np.uint8)


def routing_map(images, maps, labels, timesteps, path, title, rows=10):
    """Where the experts go: images (N, H, W, 3) uint8, maps (T, N, L) experts per token (mean
    over MoE layers) at `timesteps`, labels (N,). Top: one image per class (up to `rows`), then
    its map over the greyed image at each timestep. Bottom: per class, the mean image and the mean
    map at each timestep. Each timestep's column has its own colour scale, from 0 to its largest
    value (written above it), so that where the experts go shows at every noise level."""
    T, N, L = maps.shape
    side, vmax = math.isqrt(L), np.maximum(maps.max(axis=(1, 2)), 1e-6)           # (T,)
    assert side * side == L, f"{L} tokens are not a square grid"
    cell = side * math.ceil(64 / side)                        # at least 64 px, whole patches
    images = np.stack([np.asarray(Image.fromarray(im).resize((cell, cell), Image.NEAREST))
                       for im in images])                                  # (N, cell, cell, 3)
    classes = sorted(set(labels.tolist()))[:rows]
    first = [int(np.flatnonzero(labels == c)[0]) for c in classes]
    up = lambda a: np.kron(a, np.ones((cell // a.shape[0], cell // a.shape[1], 1)))

    def tile(img, m=None, j=0):                # img (cell, cell, 3), m (L,) at column j -> tile
        img = up(np.asarray(img, np.float64)) if img is not None else None
        if m is None:
            return img
        h = up(heat(m.reshape(side, side) / vmax[j]).astype(np.float64))
        return h if img is None else 0.45 * img.mean(-1, keepdims=True) + 0.55 * h
    block = [[tile(images[i])] + [tile(images[i], maps[t, i], t) for t in range(T)] for i in first]
    block += [[tile(images[labels == c].mean(0))]
              + [tile(None, maps[t, labels == c].mean(0), t) for t in range(T)] for c in classes]
    top, left, gap = 34, 100, 4
    width = left + (T + 1) * (cell + gap)
    img = Image.new("RGB", (width, top + len(block) * (cell + gap) + 50), "white")
    draw, font = ImageDraw.Draw(img), ImageFont.load_default(12)
    draw.text((4, img.height - 16), title, fill="black", font=font)
    for j, t in enumerate(timesteps):
        draw.text((left + (j + 1) * (cell + gap), 6), f"t = {t}", fill="black", font=font)
        draw.text((left + (j + 1) * (cell + gap), 20), f"max {vmax[j]:.2f}", fill="black",
                  font=font)
    for r, row in enumerate(block):
        y = top + r * (cell + gap)
        c = classes[r % len(classes)]
        draw.text((4, y + cell // 2 - 6), f"{'mean ' if r >= len(classes) else ''}class {c}",
                  fill="black", font=font)
        for j, a in enumerate(row):
            img.paste(Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)),
                      (left + j * (cell + gap), y))
    bar = heat(np.linspace(0, 1, 200))[None].repeat(10, 0)            # the colour scale
    y = top + len(block) * (cell + gap) + 8
    img.paste(Image.fromarray(bar), (left, y))
    draw.text((left - 14, y - 1), "0", fill="black", font=font)
    draw.text((left + 206, y - 1), "max experts per token at that t", fill="black", font=font)
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))
