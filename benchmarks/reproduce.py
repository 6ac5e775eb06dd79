"""
Does Expert Race beat dense, token-choice and expert-choice at equal activated compute, and does each
step of the paper's ablation help? A small, real-data version of Table 6 and Table 3, over seeds.

    python benchmarks/reproduce.py              # every method x --seeds; results in benchmarks/results
    python benchmarks/reproduce.py --quick      # a smoke run: a few steps each, in a temporary folder

Data: Fashion-MNIST (28x28, 10 classes), patch 4, the XS size (6 layers, 192 wide), MoE 2in8 whose
activated compute equals the dense MLP's. The same budget (steps, batch, lr) for every run. Per run:
  - held-out epsilon-MSE on the test split at fixed (noise, timestep) per image;
  - evaluate.py's class accuracy and FD proxy of 50 samples per class (DDIM, no guidance);
  - MaxVio and combination usage (Table 2) from the last training logs;
  - mean experts per token by sampling timestep (Fig. 6).
Finished runs are skipped and interrupted ones resume (train.py --resume).
"""
import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import race_dit as R  # noqa: E402
import train  # noqa: E402
from data import load_data  # noqa: E402
from evaluate import Evaluator  # noqa: E402
from utils import (RoutingStats, atomic_write, generate, line_chart, load_checkpoint, load_model,  # noqa: E402
                   routing_chart, save_grid, to_uint8)

# name -> (train.py flags, inference routing). Main comparison first, then the Table 3 ablation.
NO_AUX = ["--plr-weight", "0", "--rsl-weight", "0"]
METHODS = {
    "dense": (["--routing", "dense"], "threshold"),
    "token-choice": (["--routing", "token", "--gating", "softmax", "--balance-weight", "0.01", *NO_AUX],
                     "threshold"),
    "expert-choice": (["--routing", "expert", "--gating", "softmax", *NO_AUX], "threshold"),
    "race (full recipe)": (["--routing", "race"], "threshold"),
    "race softmax": (["--routing", "race", "--gating", "softmax", *NO_AUX], "topk"),
    "race identity": (["--routing", "race", *NO_AUX], "topk"),
    "race identity +threshold": (None, "threshold"),                      # same training run, other routing
    "race +threshold +PLR": (["--routing", "race", "--rsl-weight", "0"], "threshold"),
}
SAME_RUN = {"race identity +threshold": "race identity"}
COLOURS = [(0, 0, 0), (220, 50, 50), (50, 120, 220), (30, 160, 60), (230, 140, 0), (150, 60, 200)]


@torch.no_grad()
def score(ckpt_path, routing, test, evaluator, args):
    model, ckpt = load_model(ckpt_path)
    R.set_inference_routing(model, routing)
    d = R.Diffusion()
    g = torch.Generator().manual_seed(1234)                               # the same noise for every run
    x = torch.from_numpy(np.array(test.x)).float() / 127.5 - 1
    y = torch.from_numpy(test.y)
    t, noise = torch.randint(0, 1000, (len(x),), generator=g), torch.randn(x.shape, generator=g)
    mse = sum(d.training_losses(model, xb, yb, t=tb, noise=nb)[0]["mse"].item() * len(xb)
              for xb, yb, tb, nb in zip(x.split(500), y.split(500), t.split(500), noise.split(500)))
    labels = torch.arange(10).repeat_interleave(args.samples_per_class)
    stats = RoutingStats()
    images = np.concatenate([
        to_uint8(generate(model, d, labels[i:i + 250], i, 0, args.sample_steps, 1.0, True, "ddim", stats))
        for i in range(0, len(labels), 250)])
    records = [json.loads(line) for line in open(Path(ckpt_path).parent / "metrics.jsonl")]
    out = dict(heldout_mse=mse / len(x), steps=ckpt["step"], routing=routing,
               curve=[(r["step"], r["mse"]) for r in records], **evaluator.score(images, labels.numpy()))
    if stats.sums:
        out.update(stats.result(), max_vio=float(np.mean([r["max_vio"] for r in records[-5:]])),
                   comb_usage=float(np.mean([r["comb_usage"] for r in records[-5:]])))
    grid = np.concatenate([images[labels.numpy() == c][:10] for c in range(10)])
    return out, grid


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--samples-per-class", type=int, default=50)
    p.add_argument("--sample-steps", type=int, default=50, help="DDIM steps for the scored samples")
    p.add_argument("--methods", default=",".join(METHODS), help="comma list of: " + ", ".join(METHODS))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--runs", default=str(ROOT / "benchmarks" / "runs"), help="checkpoints (not committed)")
    p.add_argument("--data-dir", default=str(ROOT / "data"))
    p.add_argument("--quick", action="store_true", help="smoke test, temporary files")
    args = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp()) if args.quick else None
    if args.quick:
        args.steps, args.batch_size, args.samples_per_class, args.sample_steps, args.seeds = 4, 16, 2, 3, 1
        args.out, args.runs = str(tmp / "results"), str(tmp / "runs")
    out, runs = Path(args.out), Path(args.runs)
    out.mkdir(parents=True, exist_ok=True)
    test = load_data("fashion-mnist", args.data_dir, split="test")
    if args.quick:
        test.x, test.y = test.x[:200], test.y[:200]
    evaluator = Evaluator("fashion-mnist", args.data_dir, epochs=1 if args.quick else 3, cache_dir=tmp)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    results["_setup"] = {k: v for k, v in vars(args).items() if k not in ("out", "runs", "data_dir")}
    for name in args.methods.split(","):
        flags, routing = METHODS[name]
        flags = flags or METHODS[SAME_RUN[name]][0]
        for seed in range(args.seeds):
            key = f"{name} / seed {seed}"
            run = runs / f"{SAME_RUN.get(name, name).replace(' ', '_').strip('()')}_seed{seed}"
            if results.get(key, {}).get("steps") == args.steps:
                continue
            done = (run / "ckpt.pt").exists() and load_checkpoint(run / "ckpt.pt")["step"] >= args.steps
            if not done:
                every = dict(log=max(args.steps // 50, 1), save=max(args.steps // 4, 1))
                train.main(["--data", "fashion-mnist", "--data-dir", args.data_dir, "--model", "XS/4",
                            "--experts", "2in8", "--steps", str(args.steps), "--lr", str(args.lr),
                            "--batch-size", str(args.batch_size), "--seed", str(seed), "--sample-every", "0",
                            "--log-every", str(every["log"]), "--save-every", str(every["save"]),
                            "--out", str(run), *(["--resume"] if (run / "ckpt.pt").exists() else []), *flags])
            results[key], grid = score(run / "ckpt.pt", routing, test, evaluator, args)
            if seed == 0:
                save_grid(grid, out / f"grid_{run.name}{'_topk' if routing == 'topk' else ''}.png", nrow=10)
            atomic_write(results_path, lambda tmp_path: tmp_path.write_text(json.dumps(results, indent=1)))
        rows = [results[f"{name} / seed {s}"] for s in range(args.seeds)]
        summary = {k: (np.mean([r[k] for r in rows]), np.std([r[k] for r in rows]))
                   for k in ("heldout_mse", "accuracy", "fd")}
        print(f"{name:26s} " + "  ".join(f"{k} {m:.4f} ± {s:.4f}" for k, (m, s) in summary.items()))
    names = [n for n in args.methods.split(",") if n not in SAME_RUN]
    curves = [results[f"{n} / seed 0"]["curve"] for n in names]
    series = [([s for s, _ in c], [v for _, v in c], COLOURS[i % 6], 2) for i, c in enumerate(curves)]
    line_chart(series, out / "loss_curves.png", "training epsilon-MSE, seed 0", "step", log_y=True)
    race = results.get("race (full recipe) / seed 0", {})
    if "per_layer" in race:
        routing_chart(race, out / "experts_by_timestep.png", 2)
    print(f"wrote {results_path} and charts in {out}")
    if tmp is not None:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
