"""
Does Expert Race beat dense, token-choice and expert-choice at equal activated parameters? A small,
real-data version of the paper's comparisons (Table 6) and cumulative ablation (Table 3).

    python benchmarks/reproduce.py            # every method, the budget below, results in benchmarks/results
    python benchmarks/reproduce.py --quick    # a smoke run: a few steps each, in a temporary folder

Data: Fashion-MNIST (28x28, 10 classes), patch 4, the XS size (6 layers, 192 wide), MoE 2in8 whose
activated compute equals the dense MLP's. One seed, one budget (steps, batch, lr) for every run.
For each run it reports:
  - held-out diffusion loss: epsilon MSE on the test split at fixed noise and timesteps (inference
    routing: the threshold for Expert Race unless the method says top-K);
  - FD-FMNIST: the Frechet distance between generated and test images in the 128-d feature space of a
    small CNN classifier trained once and cached. A sample-quality proxy, not FID;
  - MaxVio and combination usage (the paper's Table 2 metrics) averaged over the last training logs;
  - mean experts per token by sampling timestep (the paper's Fig. 6).
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
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import race_dit as R  # noqa: E402
import sample  # noqa: E402
import train  # noqa: E402

# name -> (train.py flags, inference routing). Main comparison first, then the Table 3 ablation.
METHODS = {
    "dense": (["--router", "dense"], "threshold"),
    "token-choice": (["--router", "token", "--gating", "softmax", "--balance-weight", "0.01",
                      "--plr-weight", "0", "--sim-weight", "0"], "threshold"),
    "expert-choice": (["--router", "expert", "--gating", "softmax", "--plr-weight", "0", "--sim-weight", "0"],
                      "threshold"),
    "race (full recipe)": (["--router", "race"], "threshold"),
    "race softmax": (["--router", "race", "--gating", "softmax", "--plr-weight", "0", "--sim-weight", "0"], "topk"),
    "race identity": (["--router", "race", "--plr-weight", "0", "--sim-weight", "0"], "topk"),
    "race identity +threshold": (None, "threshold"),                      # same training run, other routing
    "race +threshold +PLR": (["--router", "race", "--sim-weight", "0"], "threshold"),
}
SAME_RUN = {"race identity +threshold": "race identity"}


class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                                  nn.Linear(64 * 7 * 7, 128), nn.ReLU())
        self.head = nn.Linear(128, 10)

    def forward(self, x):  # x (B, 1, 28, 28) in [-1, 1] -> (features (B, 128), logits (B, 10))
        f = self.conv(x)
        return f, self.head(f)


def classifier(path, train_set, test_x, test_y, epochs=2):
    """Train the feature network once (cached at path); report its test accuracy."""
    net = Classifier()
    if path.exists():
        net.load_state_dict(torch.load(path, weights_only=True))
    else:
        torch.manual_seed(0)
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        x = torch.from_numpy(np.array(train_set.x)).float() / 127.5 - 1
        y = torch.from_numpy(train_set.y)
        for _ in range(epochs):
            for idx in torch.randperm(len(x)).split(256):
                loss = F.cross_entropy(net(x[idx])[1], y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        torch.save(net.state_dict(), path)
    net.eval()
    with torch.no_grad():
        acc = (torch.cat([net(b)[1].argmax(1) for b in test_x.split(1000)]) == test_y).float().mean().item()
    return net, acc


@torch.no_grad()
def features(net, x):
    return torch.cat([net(b)[0] for b in x.split(1000)]).double().numpy()


def frechet(a, b):
    """||mu_a - mu_b||^2 + Tr(Sa + Sb - 2 (Sa Sb)^(1/2)), the trace of the root through eigenvalues."""
    mu_a, mu_b, sa, sb = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(sa)
    root_a = (v * np.sqrt(w.clip(0))) @ v.T
    cross = np.sqrt(np.linalg.eigvalsh(root_a @ sb @ root_a).clip(0)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(sa) + np.trace(sb) - 2 * cross)


@torch.no_grad()
def evaluate(ckpt_path, routing, test_x, test_y, net, test_feats, args):
    model, ckpt = sample.load_model(ckpt_path, "cpu")
    R.set_inference_routing(model, routing)
    d = R.Diffusion()
    g = torch.Generator().manual_seed(1234)                              # the same noise for every run
    t, noise = torch.randint(0, 1000, (len(test_x),), generator=g), torch.randn(test_x.shape, generator=g)
    mse = [d.training_losses(model, x, y, t=tt, noise=n)[0]["mse"].item() * len(x) for x, y, tt, n in
           zip(test_x.split(500), test_y.split(500), t.split(500), noise.split(500))]
    labels = torch.arange(10).repeat_interleave(args.samples_per_class)
    stats = sample.RoutingStats()
    gen = torch.cat([train.generate(model, d, labels[i:i + 500], i, 0, args.sample_steps, 1.0, clip_x0=True,
                                    method="ddim", on_step=stats) for i in range(0, len(labels), 500)])
    records = [json.loads(line) for line in open(Path(ckpt_path).parent / "metrics.jsonl")][-5:]
    out = dict(heldout_mse=sum(mse) / len(test_x), fd_fmnist=frechet(features(net, gen), test_feats),
               steps=ckpt["step"], routing=routing)
    if stats.sums:
        out.update(stats.result() | dict(max_vio=float(np.mean([r["max_vio"] for r in records])),
                                         comb_usage=float(np.mean([r["comb_usage"] for r in records]))))
    grid = torch.cat([gen[labels == c][:10] for c in range(10)])
    return out, grid, [(r["step"], r["mse"]) for r in map(json.loads, open(Path(ckpt_path).parent / "metrics.jsonl"))]


def loss_chart(curves, path, size=(760, 440), pad=55):
    """Training epsilon-MSE against step, one line per run (pillow only)."""
    img = Image.new("RGB", size, "white")
    d, font = ImageDraw.Draw(img), ImageFont.load_default(13)
    steps = max(s for c in curves.values() for s, _ in c)
    values = [v for c in curves.values() for _, v in c[len(c) // 10:]]
    lo, hi = min(values), max(values)
    W, H = size[0] - 2 * pad - 150, size[1] - 2 * pad
    xy = lambda s, v: (pad + W * s / steps, pad + H * (1 - (min(v, hi) - lo) / (hi - lo)))
    d.rectangle([pad, pad, pad + W, pad + H], outline="black")
    for v in np.linspace(lo, hi, 5):
        d.text((4, xy(0, v)[1] - 7), f"{v:.3f}", fill="black", font=font)
    for s in np.linspace(0, steps, 5).astype(int):
        d.text((xy(s, lo)[0] - 10, pad + H + 6), str(s), fill="black", font=font)
    d.text((pad + W // 2 - 20, size[1] - 25), "step", fill="black", font=font)
    d.text((pad, 20), "training epsilon-MSE (mean over each log interval; top clipped)", fill="black", font=font)
    colours = [(0, 0, 0), (220, 50, 50), (50, 120, 220), (30, 160, 60), (230, 140, 0), (150, 60, 200), (0, 170, 170)]
    for (name, c), colour in zip(curves.items(), colours):
        d.line([xy(s, v) for s, v in c], fill=colour, width=2)
        y = pad + 18 * list(curves).index(name)
        d.line([(pad + W + 10, y + 7), (pad + W + 30, y + 7)], fill=colour, width=3)
        d.text((pad + W + 35, y), name, fill="black", font=font)
    img.save(path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--samples-per-class", type=int, default=50)
    p.add_argument("--sample-steps", type=int, default=50, help="DDIM steps for the FD samples")
    p.add_argument("--methods", default=",".join(METHODS), help="comma list of: " + ", ".join(METHODS))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--runs", default=str(ROOT / "benchmarks" / "runs"), help="checkpoints (not committed)")
    p.add_argument("--quick", action="store_true", help="smoke test: 6 steps, tiny evaluation, temporary folders")
    args = p.parse_args(argv)
    if args.quick:
        tmp = Path(tempfile.mkdtemp())
        args.steps, args.batch_size, args.samples_per_class, args.sample_steps = 6, 16, 2, 3
        args.out, args.runs = str(tmp / "results"), str(tmp / "runs")
    out, runs = Path(args.out), Path(args.runs)
    out.mkdir(parents=True, exist_ok=True)
    runs.mkdir(parents=True, exist_ok=True)
    data = argparse.Namespace(data="fashion-mnist", data_dir=str(ROOT / "data"))
    test = train.load_data(data, train=False)
    test_x = torch.from_numpy(np.array(test.x)).float() / 127.5 - 1
    test_y = torch.from_numpy(test.y)
    if args.quick:
        test_x, test_y = test_x[:1000], test_y[:1000]
    net, acc = classifier(runs / "classifier.pt", train.load_data(data), test_x, test_y, epochs=0 if args.quick else 2)
    test_feats = features(net, test_x)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    results["_setup"] = dict(vars(args), classifier_test_accuracy=acc)
    curves = {}
    for name in args.methods.split(","):
        flags, routing = METHODS[name]
        run = runs / SAME_RUN.get(name, name).replace(" ", "_").replace("(", "").replace(")", "")
        if name in results and results[name]["steps"] == args.steps:
            print(f"{name}: done before, skipped")
        else:
            if not (run / "ckpt.pt").exists() or train.load_checkpoint(run / "ckpt.pt")["step"] < args.steps:
                flags = flags or METHODS[SAME_RUN[name]][0]
                train.main(["--data", "fashion-mnist", "--data-dir", data.data_dir, "--model", "XS/4",
                            "--experts", "2in8", "--steps", str(args.steps), "--batch-size", str(args.batch_size),
                            "--lr", str(args.lr), "--log-every", str(max(args.steps // 50, 1)), "--sample-every", "0",
                            "--save-every", str(max(args.steps // 4, 1)), "--out", str(run), "--resume", *flags])
            res, grid, curve = evaluate(run / "ckpt.pt", routing, test_x, test_y, net, test_feats, args)
            results[name] = res | dict(curve=curve)
            suffix = "_topk" if routing == "topk" else ""
            train.save_grid(train.to_uint8(grid), out / f"grid_{run.name}{suffix}.png", nrow=10)
            results_path.write_text(json.dumps(results, indent=1))
        r = results[name]
        curves.setdefault(SAME_RUN.get(name, name), r["curve"])
        print(f"{name:28s} held-out mse {r['heldout_mse']:.4f}  FD-FMNIST {r['fd_fmnist']:8.2f}  "
              + (f"MaxVio {r['max_vio']:.3f}  comb {r['comb_usage']:5.1f}%  experts/token {r['overall']:.2f}"
                 if "max_vio" in r else ""), flush=True)
    loss_chart(curves, out / "loss_curves.png")
    fig6 = {k: v for k, v in results.items() if k == "race (full recipe)" and "per_layer" in v}
    if fig6:
        sample.draw_chart(fig6["race (full recipe)"], out / "experts_by_timestep.png", 2)
    print(f"wrote {results_path}, {out / 'loss_curves.png'}; classifier test accuracy {acc:.3f}")
    if args.quick:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
