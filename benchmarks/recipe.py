"""
The small-scale recipe, lever by lever: which changes to DiT's recipe make `python train.py` draw
the shapes asked for, measured over paired seeds.

    python benchmarks/recipe.py                          # every arm x 3 seeds, then the table
    python benchmarks/recipe.py --arms "cosine,cosine min-snr" --seeds 4
    python benchmarks/recipe.py --quick                  # a smoke run in a temporary folder

Each arm is train.py on the built-in 16x16 shapes with every recipe flag spelled out, so that a
later change of train.py's defaults cannot change what an arm means. Each lever compares an arm
with its reference arm over the same seeds: the runs of one seed share initial weights, data order,
t and noise wherever the lever leaves them alone (a batch or model change draws them differently).
Every final EMA is scored as train.py scores its grids: support/evaluator.py's classifier on
--per-class samples per class (class accuracy, log-probability of the class asked for, KID).
The sampler levers re-sample the checkpoints of --sampler-arm with other settings, paired on the
same weights and sampling seeds. Each lever gets a paired t-test over seeds, Holm-corrected over
every lever and metric. Results go to results/recipe/results.json after every run; an interrupted
table resumes from it and from the checkpoints.
"""
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import train  # noqa: E402
from support.evaluator import Evaluator, samples_per_class  # noqa: E402
from benchmarks.reproduce import judge, paired_test  # noqa: E402
from support.pictures import save_grid  # noqa: E402
from support.runs import Parser, atomic_write, load_checkpoint, load_model  # noqa: E402

DIT = ["--schedule", "linear", "--loss-weight", "none", "--prediction", "eps", "--lr", "1e-3",
       "--warmup", "100", "--batch-size", "64", "--steps", "1600", "--model", "XS/4",
       "--ema-decay", "0.999"]
COSINE = [*DIT, "--schedule", "cosine"]                           # a later flag overrides
MIN_SNR = [*COSINE, "--loss-weight", "min-snr", "--min-snr-gamma", "5"]
# name -> (train.py flags, the arm it is compared with, the lever)
ARMS = {
    "linear": (DIT, None, None),
    "cosine": (COSINE, "linear", "schedule: cosine instead of linear"),
    "cosine min-snr": (MIN_SNR, "cosine", "loss weight: min-SNR-5 instead of none"),
    "lr 2e-3": ([*MIN_SNR, "--lr", "2e-3"], "cosine min-snr", "learning rate 2e-3 instead of 1e-3"),
    "lr 4e-3": ([*MIN_SNR, "--lr", "4e-3"], "lr 2e-3", "learning rate 4e-3 instead of 2e-3"),
    "batch 32": ([*MIN_SNR, "--batch-size", "32", "--steps", "2720"], "cosine min-snr",
                 "batch 32 for 2720 steps instead of 64 for 1600 (equal time)"),
    "v": ([*MIN_SNR, "--prediction", "v"], "cosine min-snr", "prediction: v instead of eps"),
    "v lr 2e-3": ([*MIN_SNR, "--prediction", "v", "--lr", "2e-3"], "v",
                  "learning rate 2e-3 instead of 1e-3, with v"),
    "warmup 0": ([*MIN_SNR, "--prediction", "v", "--lr", "2e-3", "--warmup", "0"], "v lr 2e-3",
                 "no warm-up instead of 100 steps, with v and lr 2e-3"),
    # XS/2 runs 1.47 steps/s where XS/4 runs 4.40 (batch 64, this CPU): 533 steps take 1600's time
    "XS/2": ([*MIN_SNR, "--prediction", "v", "--lr", "2e-3", "--model", "XS/2", "--steps", "533"],
             "v lr 2e-3", "XS/2 for 533 steps instead of XS/4 for 1600 (equal time)"),
}
# (what is compared, arm, reference) beyond each arm's own lever: the default against DiT's recipe
COMPARISONS = [("train.py's default (cosine, min-SNR-5, v, lr 2e-3, no warm-up) instead of DiT's "
                "recipe", "warmup 0", "linear")]
# name -> (sampler, steps, guidance, DDPM variance, weights); the first is train.py's grid
# sampler, the reference
SAMPLERS = {"ddpm 50 g2": ("ddpm", 50, 2.0, "small", "ema"),
            "ddpm 50 g3": ("ddpm", 50, 3.0, "small", "ema"),
            "ddpm 50 g4": ("ddpm", 50, 4.0, "small", "ema"),
            "ddim 50 g2": ("ddim", 50, 2.0, "small", "ema"),
            "ddpm 100 g2": ("ddpm", 100, 2.0, "small", "ema"),
            "ddpm 50 g2 large": ("ddpm", 50, 2.0, "large", "ema"),
            "ddpm 50 g2 online": ("ddpm", 50, 2.0, "small", "online")}
REFERENCE_SAMPLER = next(iter(SAMPLERS))
METRICS = {"accuracy": 1, "logp": 1, "kid": -1}                     # +1: higher is better


@torch.no_grad()
def score(ckpt_path, sampler, evaluator, per_class):
    """Scores of the samples, per_class per class, seeded as train.py's grids (seed 0)."""
    method, steps, guidance, variance, weights = SAMPLERS[sampler]
    model, ckpt = load_model(ckpt_path, online=weights == "online")
    tick = time.time()
    images, labels = samples_per_class(model, per_class, steps, method=method, cfg_scale=guidance,
                                       variance=variance)
    return dict(step=ckpt["step"], per_class=per_class, sample_seconds=time.time() - tick,
                **evaluator.score(images, labels)), images


def run(name, seed, runs, args):
    """Trains the arm's seed unless its checkpoint is complete; returns the training seconds
    (None when it was trained before)."""
    flags = ARMS[name][0]
    folder = runs / f"{name.replace(' ', '_')}_seed{seed}"
    steps = min(train.parse_args(flags).steps, args.max_steps)
    ckpt = folder / "ckpt.pt"
    if ckpt.exists() and load_checkpoint(ckpt)["step"] >= steps:
        return folder, None
    tick = time.time()
    train.main([*flags, "--steps", str(steps), "--seed", str(seed), "--sample-every", "0",
                "--data-dir", args.data_dir, "--out", str(folder),
                *(["--resume"] if ckpt.exists() else [])])
    return folder, time.time() - tick


def levers(results, seeds):
    """Each lever's paired test on each metric, Holm-corrected together: (lever, arm, reference,
    sampler, metric, verdict)."""
    have = lambda arm, sampler: all(f"{arm} / {sampler} / seed {s}" in results for s in seeds)
    pairs = [(lever, arm, ref, REFERENCE_SAMPLER, REFERENCE_SAMPLER)
             for lever, arm, ref in [(lv, a, r) for a, (_, r, lv) in ARMS.items()] + COMPARISONS
             if ref and have(arm, REFERENCE_SAMPLER) and have(ref, REFERENCE_SAMPLER)]
    pairs += [(f"sampler: {s} instead of {REFERENCE_SAMPLER} (on {arm})", arm, arm, s,
               REFERENCE_SAMPLER)
              for arm in ARMS for s in SAMPLERS if s != REFERENCE_SAMPLER and have(arm, s)
              and have(arm, REFERENCE_SAMPLER)]
    tests = [(lever, arm, ref, s, k, paired_test([
        sign * (results[f"{arm} / {s} / seed {i}"][k] - results[f"{ref} / {r} / seed {i}"][k])
        for i in seeds])) for lever, arm, ref, s, r in pairs for k, sign in METRICS.items()]
    judged = judge([t for *_, t in tests]) if tests else []
    return [(*row[:5], v) for row, v in zip(tests, judged)]


def effect(v):
    """One paired effect as a table cell: the change (in the metric's better direction positive),
    its interval, and the Holm-corrected verdict."""
    word = {"supports": "**better**", "contradicts": "**worse**"}.get(
        v["verdict"], f"not detectable (detectable: {v['detectable']:.2g})")
    return f"{v['mean']:+.3g} [{v['ci'][0]:+.3g}, {v['ci'][1]:+.3g}] {word}"


def main(argv=None):
    p = Parser(prog="recipe.py", description=__doc__)
    p.add_argument("--arms", default=",".join(ARMS), help="comma list of: " + ", ".join(ARMS))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--per-class", type=int, default=50, help="scored samples per class")
    p.add_argument("--sampler-arm", default="cosine min-snr",
                   help="whose checkpoints the sampler levers re-sample ('' for none)")
    p.add_argument("--max-steps", type=int, default=10**9, help="caps every arm's --steps")
    p.add_argument("--out", help="results (default benchmarks/results/recipe)")
    p.add_argument("--runs", help="checkpoints, not committed (default benchmarks/runs/recipe)")
    p.add_argument("--data-dir", default=str(ROOT / "data"))
    p.add_argument("--quick", action="store_true", help="smoke test, temporary files")
    args = p.parse_args(argv)
    arms = args.arms.split(",")
    unknown = [a for a in arms + [args.sampler_arm] if a and a not in ARMS]
    if unknown:
        p.error(f"unknown arms {', '.join(map(repr, unknown))}; choose from: {', '.join(ARMS)}")
    if args.seeds < 2 or args.per_class < 1 or args.max_steps < 1:
        p.error("--seeds must be at least 2 (a verdict needs a spread), --per-class and "
                "--max-steps positive")
    tmp = Path(tempfile.mkdtemp()) if args.quick else None
    if args.quick:  # its files in a temporary folder, unless --out / --runs name one
        args.max_steps, args.per_class, args.seeds = 3, 1, 2
        args.out, args.runs = args.out or str(tmp / "results"), args.runs or str(tmp / "runs")
    out = Path(args.out or ROOT / "benchmarks" / "results" / "recipe")
    runs = Path(args.runs or ROOT / "benchmarks" / "runs" / "recipe")
    out.mkdir(parents=True, exist_ok=True)
    evaluator = Evaluator("shapes", args.data_dir, 16, epochs=1 if args.quick else 10,
                          cache_dir=tmp)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    for seed in range(args.seeds):            # seed by seed: an interrupted table stays paired
        for name in arms:
            samplers = SAMPLERS if name == args.sampler_arm else [REFERENCE_SAMPLER]
            keys = {s: f"{name} / {s} / seed {seed}" for s in samplers}
            if all(results.get(k, {}).get("per_class") == args.per_class for k in keys.values()):
                continue
            folder, seconds = run(name, seed, runs, args)
            for s, key in keys.items():
                if results.get(key, {}).get("per_class") == args.per_class:
                    continue
                results[key], images = score(folder / "ckpt.pt", s, evaluator, args.per_class)
                results[key]["recipe"] = {k: v for k, v in load_checkpoint(
                    folder / "ckpt.pt")["args"].items() if k not in ("out", "data_dir")}
                if seconds is not None:
                    results[key]["train_seconds"] = seconds
                if seed == 0:
                    save_grid(images[::args.per_class // min(args.per_class, 10)][:100],
                              out / f"grid_{name}_{s}.png".replace(" ", "_"), nrow=10)
                atomic_write(results_path, lambda f: f.write_text(json.dumps(results, indent=1)))
                print(f"{key}: accuracy {results[key]['accuracy']:.3f}, "
                      f"KID {results[key]['kid']:.3f}", flush=True)
    seeds = range(args.seeds)
    rows = {}
    for key, r in results.items():
        arm_sampler, seed = key.rsplit(" / seed ", 1)
        if int(seed) < args.seeds:
            rows.setdefault(arm_sampler, []).append(r)
    table = {k: {m: (float(np.mean([r[m] for r in rs])), float(np.std([r[m] for r in rs], ddof=1)))
                 for m in METRICS} for k, rs in rows.items() if len(rs) == args.seeds}
    judged = levers(results, seeds)
    summary = dict(seeds=args.seeds, per_class=args.per_class, table=table,
                   levers=[dict(lever=lv, arm=a, reference=r, sampler=s, metric=k, **v)
                           for lv, a, r, s, k, v in judged])
    atomic_write(out / "summary.json", lambda f: f.write_text(json.dumps(summary, indent=1)))
    for k, row in table.items():
        print(f"{k:32s} " + "  ".join(f"{m} {mean:.3f} ± {sd:.3f}"
                                      for m, (mean, sd) in row.items()))
    print("| lever | " + " | ".join(f"{k} (paired difference, 95% interval)" for k in METRICS)
          + " |\n| --- |" + " --- |" * len(METRICS))
    for lever in dict.fromkeys(lv for lv, *_ in judged):
        cells = [effect(v) for lv, _, _, _, _, v in judged if lv == lever]
        print(f"| {lever} | " + " | ".join(cells) + " |")
    if tmp is not None:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
