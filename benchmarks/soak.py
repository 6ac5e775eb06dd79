"""
A long run in miniature: train.py's own data path and step on a tiny model for N steps, printing at
intervals the host's resident memory, the autograd nodes reachable from the EMA's tensors and the
time per step, then the slope of each over the run after its first interval. A leak shows as a slope
that does not vanish; a week-long run needs all three flat.

    python benchmarks/soak.py --steps 5000 --every 500
"""
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import race_dit as R  # noqa: E402
import train  # noqa: E402
from support.data import BatchOrder, load_data  # noqa: E402
from support.runs import Parser, atomic_write, autocast_for, peak_memory_gib  # noqa: E402


def rss_mib():
    """The process's resident memory now (Linux), or its peak where /proc is missing."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return peak_memory_gib(torch.device("cpu")) * 1024


def autograd_nodes(tensors):
    """Distinct autograd nodes reachable from the tensors' grad_fn: 0 for leaves outside any
    graph."""
    seen, todo = set(), [t.grad_fn for t in tensors if t.grad_fn is not None]
    while todo:
        node = todo.pop()
        if node is not None and node not in seen:
            seen.add(node)
            todo.extend(next_node for next_node, _ in node.next_functions)
    return len(seen)


def slope(xs, ys):
    """Least-squares slope of ys over xs."""
    return float(np.polyfit(xs, ys, 1)[0]) if len(xs) > 1 else 0.0


def main(argv=None):
    p = Parser(prog="soak.py", description=__doc__)
    p.add_argument("--steps", type=int, default=5000)
    p.add_argument("--every", type=int, default=500, help="steps between measurements")
    p.add_argument("--json", help="also write the measurements here")
    args = p.parse_args(argv)
    if args.steps < 2 * args.every or args.every < 1:
        p.error("--every must be positive and --steps at least twice --every "
                "(a slope needs two points)")
    torch.manual_seed(0)
    run = train.parse_args(["--model", "XS/8", "--batch-size", "8", "--image-size", "16"])
    ds = load_data("shapes", image_size=16)
    model, ema, opt = train.build(train.model_config(run, ds), run, torch.device("cpu"))
    loader = iter(torch.utils.data.DataLoader(ds, batch_sampler=BatchOrder(len(ds), 8, 0, 0)))
    diffusion, device = R.Diffusion(model.cfg), torch.device("cpu")
    autocast = autocast_for("auto", torch.device("cpu"))
    rows, tick = [], time.perf_counter()
    print(f"{'step':>7s} {'RSS MiB':>9s} {'EMA autograd nodes':>19s} {'ms/step':>8s}")
    for step in range(args.steps):
        micro = train.device_batches([next(loader)], ds, device, diffusion.num_timesteps)
        train.train_step(model, model, ema, opt, diffusion, micro, step, run, autocast)
        if (step + 1) % args.every == 0:
            ms = 1e3 * (time.perf_counter() - tick) / args.every
            rows.append(dict(step=step + 1, rss_mib=rss_mib(),
                             ema_nodes=autograd_nodes(ema.parameters()), ms_per_step=ms))
            print(f"{step + 1:7d} {rows[-1]['rss_mib']:9.1f} {rows[-1]['ema_nodes']:19d} {ms:8.2f}",
                  flush=True)
            tick = time.perf_counter()
    later = rows[1:]                                                     # after the first interval
    steps = [r["step"] for r in later]
    slopes = dict(rss_mib_per_1000_steps=1000 * slope(steps, [r["rss_mib"] for r in later]),
                  ema_nodes_per_step=slope(steps, [r["ema_nodes"] for r in later]),
                  ms_per_step_per_1000_steps=1000 * slope(steps, [r["ms_per_step"] for r in later]))
    print(f"slopes after step {rows[0]['step']}: "
          f"RSS {slopes['rss_mib_per_1000_steps']:+.2f} MiB per 1000 steps, "
          f"EMA autograd nodes {slopes['ema_nodes_per_step']:+.2f} per step, "
          f"time per step {slopes['ms_per_step_per_1000_steps']:+.3f} ms per 1000 steps")
    if args.json:
        result = dict(rows=rows, slopes=slopes, torch=torch.__version__)
        atomic_write(Path(args.json), lambda tmp: tmp.write_text(json.dumps(result, indent=1)))
    return rows, slopes


if __name__ == "__main__":
    main()
