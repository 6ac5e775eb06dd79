"""
The paper's comparisons at small scale, over paired seeds: does Expert Race beat dense, token-choice
and expert-choice at equal activated compute, each with its usual recipe and with the same gating
and auxiliary losses (Table 6); does each step of the ablation help (Table 3); does a finer
granularity help at equal activated compute (Table 5); does PLR help where its motivation applies,
a deep narrow model (S5), and with which weight and head initialisation; does the race give more
experts to the tokens that carry the object (S3)?

    python benchmarks/reproduce.py          # Tables 6, 4, 3: 8 methods x 8 seeds
    python benchmarks/reproduce.py --seeds 4 --methods "race 1in4,race 4in32,race 8in128"  # Table 5
    python benchmarks/reproduce.py --seeds 4 --methods "deep race -PLR,deep race +PLR,deep race \
        PLR summed zero-init,race PLR summed zero-init"              # S5's deep pair, PLR's setting
    python benchmarks/reproduce.py --quick  # a smoke run: a few steps each, in a temporary folder

Every run is train.py with its default recipe (built-in 16x16 shapes, XS/4, batch 64, cosine
schedule, min-SNR-5, v-prediction, lr 2e-3) and the method's flags, for --steps (600: the full
recipe's samples are about 3/4 shape-correct), seeds 0..N-1; every MoE but Table 5's is 2in8 with
granularity 2, so its activated compute equals the dense MLP's. Per run: held-out epsilon-MSE on
the test split at fixed (noise, timestep) per image, overall and by timestep; support/evaluator.py's
class accuracy, log-probability of the class asked for and KID of --samples-per-class samples per
class (train.py's grid sampler: DDPM, guidance 2); MaxVio and combination usage (Table 2) from the
last training logs; experts per token by sampling timestep (Fig. 6) and against the object's share
of each patch; for the deep models, each block's contribution to the residual stream. Each claim
and metric gets a paired t-test over the seeds both methods have (the runs of one seed share initial
weights, data order, t and noise), Holm-corrected over the table: supports, contradicts, or no
detectable effect with the smallest effect the seeds could have detected. Runs go seed by seed; a
score made with the same recipe, --steps, --samples-per-class and sampler is kept, others are
computed again from their checkpoints; interrupted runs resume. Every method with two seeds or more
in results.json is judged; summary.json and summary.md (the tables of benchmarks/README.md) hold the
verdicts.
"""
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import race_dit as R  # noqa: E402
import train  # noqa: E402
from support.data import load_data, to_unit  # noqa: E402
from support.evaluator import Evaluator, samples_per_class  # noqa: E402
from support.pictures import experts_chart, line_chart, save_grid  # noqa: E402
from support.runs import Parser, atomic_write, load_checkpoint, load_model  # noqa: E402
from support.routing import ExpertsByTimestep, experts_per_token_at  # noqa: E402

NO_AUX = ["--plr-weight", "0", "--rsl-weight", "0"]
# PLR as one public re-implementation sets it (shiml20/SVG): 1e-2 per layer summed over the layers
# (XS: 6 layers, XSD: 18) and a zero-initialised head, against the mean over layers at 0.1 with
# DiT's xavier initialisation.
PLR_SUMMED = lambda depth: ["--plr-weight", f"{0.01 * depth:g}", "--plr-init", "zero"]
# name -> (train.py flags, inference selection, training run it shares)
METHODS = {
    "dense": (["--routing", "dense"], "threshold", None),
    "token-choice": (["--routing", "token", "--gating", "softmax", "--balance-weight", "0.01",
                      *NO_AUX], "threshold", None),
    "expert-choice": (["--routing", "expert", "--gating", "softmax", *NO_AUX], "threshold", None),
    "race softmax": (["--gating", "softmax", *NO_AUX], "topk", None),
    "race identity": (NO_AUX, "topk", None),
    "race identity +threshold": (NO_AUX, "threshold", "race identity"),
    "race +threshold +PLR": (["--rsl-weight", "0"], "threshold", None),
    "race full recipe (+RSL)": ([], "threshold", None),
    # Table 5: granularity at equal activated compute (k experts of width 4D/k); 2in8 is the above
    "race 1in4": (["--experts", "1in4"], "threshold", None),
    "race 4in32": (["--experts", "4in32"], "threshold", None),
    "race 8in128": (["--experts", "8in128"], "threshold", None),
    "race PLR summed zero-init": (PLR_SUMMED(6), "threshold", None),
    "deep race -PLR": (["--model", "XSD/4", "--plr-weight", "0"], "threshold", None),
    "deep race +PLR": (["--model", "XSD/4"], "threshold", None),
    "deep race PLR summed zero-init": (["--model", "XSD/4", *PLR_SUMMED(18)], "threshold", None),
}
# (claim, better method, worse method): the paper says the first beats the second.
CLAIMS = [("Table 6: race beats token-choice", "race full recipe (+RSL)", "token-choice"),
          ("Table 6: race beats expert-choice", "race full recipe (+RSL)", "expert-choice"),
          ("Table 6 matched (softmax, no PLR/RSL): race beats token-choice", "race softmax",
           "token-choice"),
          ("Table 6 matched (softmax, no PLR/RSL): race beats expert-choice", "race softmax",
           "expert-choice"),
          ("Table 4: race MoE beats dense", "race full recipe (+RSL)", "dense"),
          ("Table 1/3: identity gating beats softmax", "race identity", "race softmax"),
          ("Table 3: threshold beats batch top-K at inference", "race identity +threshold",
           "race identity"),
          ("Table 3: PLR helps", "race +threshold +PLR", "race identity +threshold"),
          ("Table 3: RSL helps", "race full recipe (+RSL)", "race +threshold +PLR"),
          ("S5: PLR helps a deep narrow model", "deep race +PLR", "deep race -PLR"),
          ("S5: PLR summed zero-init helps a deep narrow model", "deep race PLR summed zero-init",
           "deep race -PLR"),
          ("PLR summed zero-init beats mean xavier, deep", "deep race PLR summed zero-init",
           "deep race +PLR"),
          ("PLR summed zero-init beats mean xavier, XS", "race PLR summed zero-init",
           "race full recipe (+RSL)"),
          ("Table 5: 2in8 beats 1in4", "race full recipe (+RSL)", "race 1in4"),
          ("Table 5: 4in32 beats 2in8", "race 4in32", "race full recipe (+RSL)"),
          ("Table 5: 8in128 beats 4in32", "race 8in128", "race 4in32")]
# train.py's arguments that define a run's training (not its length: a longer run resumes)
RECIPE = ("model", "experts", "routing", "gating", "granularity", "schedule", "loss_weight",
          "min_snr_gamma", "prediction", "lr", "warmup", "batch_size", "ema_decay",
          "plr_weight", "plr_init", "rsl_weight", "balance_weight", "threshold_decay", "data",
          "image_size", "seed")
CLASSES = 10                                    # of the shapes (and Fashion-MNIST) scored
MSE_BINS = 5                                    # held-out epsilon-MSE by t: 0-199, ..., 800-999
METRICS = {"accuracy": 1, "logp": 1, "kid": -1, "heldout_mse": -1}  # +1: higher is better
COLOURS = [(0, 0, 0), (220, 50, 50), (50, 120, 220), (30, 160, 60), (230, 140, 0), (150, 60, 200),
           (0, 170, 170), (120, 120, 120), (200, 0, 120), (90, 60, 20)]


@torch.no_grad()
def block_contributions(model, x0, y, d):
    """||block(x) - x|| / ||x|| per block, averaged over images at random t: how much each layer
    changes the residual stream (the quantity behind the paper's Fig. 5)."""
    ratios = []

    def measure(block, inputs, outputs):                    # inputs (x, c), outputs (x', layer_aux)
        x, new = inputs[0], outputs[0]
        ratios.append(((new - x).norm(dim=(1, 2)) / x.norm(dim=(1, 2))).mean().item())
    hooks = [block.register_forward_hook(measure) for block in model.blocks]
    g = torch.Generator().manual_seed(7)
    t = torch.randint(0, 1000, (len(x0),), generator=g)
    model(d.q_sample(x0, t, torch.randn(x0.shape, generator=g)), t, y)
    for h in hooks:
        h.remove()
    return ratios


def within_cell_slope(experts, fraction, cells):
    """Least-squares slope of experts per token on object fraction after removing each cell's mean
    from both (cells: a (token position, timestep) label per row; rows grouped by image in axis 0),
    with a jackknife 95% interval over images, and the slope without the cells for comparison.
    experts, fraction, cells: (images, rows)."""
    e, f = experts.astype(np.float64), fraction.astype(np.float64)
    for c in np.unique(cells):
        at = cells == c
        e[at] -= e[at].mean()
        f[at] -= f[at].mean()
    a, b = (e * f).sum(1), (f * f).sum(1)                                 # per image
    slope = a.sum() / b.sum()
    leave_one_out = (a.sum() - a) / (b.sum() - b)
    n = len(a)
    se = math.sqrt((n - 1) / n * ((leave_one_out - leave_one_out.mean()) ** 2).sum())
    raw = np.polyfit(fraction.ravel(), experts.ravel(), 1)[0]
    return dict(slope=float(slope), ci=(slope - 1.96 * se, slope + 1.96 * se), se=se,
                raw_slope=float(raw))


@torch.no_grad()
def experts_by_object(model, test, timesteps=(100, 300, 500, 700, 900), n=500):
    """The paper's claim that the race gives experts to critical tokens, at this scale: experts per
    token (mean over layers, selected by the threshold) against the fraction of the token's
    patch the object covers (exact masks of the built-in shapes), within each (position,
    timestep) cell, so that neither where a patch sits nor the noise level can make the slope."""
    p, d, n = model.cfg.patch_size, R.Diffusion(model.cfg), min(n, len(test.y))
    x = to_unit(torch.from_numpy(np.array(test.x[:n])))
    y = torch.from_numpy(test.y[:n])
    masks = torch.from_numpy(test.masks[:n]).float()[:, None]             # (n, 1, S, S)
    fraction = F.avg_pool2d(masks, p).flatten(1).numpy()                  # (n, L)
    experts = list(experts_per_token_at(model, d, x, y, timesteps,
                                        torch.Generator().manual_seed(11)).numpy())  # T x (n, L)
    cells = [np.broadcast_to(i * fraction.shape[1] + np.arange(fraction.shape[1]), fraction.shape)
             for i in range(len(timesteps))]
    cat = lambda v: np.concatenate(v, axis=1)                             # (n, timesteps * L)
    return within_cell_slope(cat(experts), cat([fraction] * len(timesteps)), cat(cells))


@torch.no_grad()
def score(ckpt_path, select_by, test, evaluator, args):
    model, ckpt = load_model(ckpt_path)
    R.set_select_by(model, select_by)
    d = R.Diffusion(model.cfg)
    g = torch.Generator().manual_seed(1234)                           # the same noise for every run
    x = to_unit(torch.from_numpy(np.array(test.x)))
    y = torch.from_numpy(test.y)
    t, noise = torch.randint(0, 1000, (len(x),), generator=g), torch.randn(x.shape, generator=g)
    C = x.shape[1]                                 # the epsilon channels (not a learned variance)
    eps = lambda xt, tb, yb: d.eps_from(model(xt, tb, yb)[:, :C], xt, tb)     # of any prediction
    mse = torch.cat([((eps(d.q_sample(xb, tb, nb), tb, yb) - nb) ** 2).mean((1, 2, 3))
                     for xb, yb, tb, nb in zip(x.split(500), y.split(500), t.split(500),
                                               noise.split(500))])                 # (N,) per image
    bins = t * MSE_BINS // d.num_timesteps                            # (N,) in 0..MSE_BINS-1
    stats = ExpertsByTimestep()
    images, labels = samples_per_class(model, args.samples_per_class, args.sample_steps,
                                       method="ddpm", cfg_scale=2.0, on_step=stats)  # train.py's
    records = [json.loads(line) for line in open(Path(ckpt_path).parent / "metrics.jsonl")]
    out = dict(heldout_mse=mse.mean().item(), steps=ckpt["step"], sample_steps=args.sample_steps,
               sampler="ddpm",
               heldout_mse_by_t=[mse[bins == b].mean().item() for b in range(MSE_BINS)],
               select_by=select_by,
               curve=[(r["step"], r["mse"]) for r in records],
               **evaluator.score(images, labels),
               contributions=block_contributions(model, x[:256], y[:256], d))
    if model.cfg.routing != "dense" and hasattr(test, "masks"):
        out["experts_by_object"] = experts_by_object(model, test, n=50 if args.quick else 500)
    if stats.sums:
        out.update(stats.result(), max_vio=float(np.mean([r["max_vio"] for r in records[-5:]])),
                   comb_usage=float(np.mean([r["comb_usage"] for r in records[-5:]])))
    grid = np.concatenate([images[labels == c][:10] for c in range(CLASSES)])
    return out, grid


def recipe_of(run_args):
    """What defines a run's training, from train.py's arguments: results and checkpoints of another
    recipe are never mixed with this one's."""
    return {k: run_args.get(k) for k in RECIPE}


def t_cdf(x, df, intervals=2000):
    """Student's t distribution function. With u = sqrt(df) tan(a) its density integrates as
    c sqrt(df) cos(a)^(df - 1) over a bounded angle, which Simpson's rule handles for any |x|."""
    if x < 0:
        return 1 - t_cdf(-x, df, intervals)
    c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    a, h = np.linspace(0, math.atan(x / math.sqrt(df)), intervals + 1, retstep=True)
    weights = np.where(np.arange(intervals + 1) % 2, 4.0, 2.0)
    weights[[0, -1]] = 1.0                                                # Simpson: 1 4 2 ... 4 1
    area = float(h / 3 * (weights @ np.cos(a) ** (df - 1)))
    return min(1.0, 0.5 + math.exp(c) * math.sqrt(df) * area)


def t_quantile(p, df):
    """The p-quantile (p > 0.5) of Student's t, by bisection on t_cdf."""
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, 2 * hi
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


def paired_test(diffs):
    """Paired t-test of per-seed differences: mean, 95% interval, t, df and two-sided p."""
    n = len(diffs)
    mean = float(np.mean(diffs))
    se = float(np.std(diffs, ddof=1)) / math.sqrt(n)
    half = t_quantile(0.975, n - 1) * se
    t = mean / se if se > 0 else math.copysign(math.inf, mean) if mean else 0.0
    p = 2 * (1 - t_cdf(abs(t), n - 1)) if math.isfinite(t) else 0.0 if mean else 1.0
    return dict(mean=mean, ci=(mean - half, mean + half), t=t, df=n - 1, p=p, se=se)


def holm(pvalues, alpha=0.05):
    """Holm's step-down: for each test, the level it is judged at and whether it is rejected."""
    order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    levels, rejected, going = [0.0] * len(pvalues), [False] * len(pvalues), True
    for rank, i in enumerate(order):
        levels[i] = alpha / (len(pvalues) - rank)
        going = going and pvalues[i] <= levels[i]
        rejected[i] = going
    return levels, rejected


def judge(tests, alpha=0.05, power=0.8):
    """Holm-corrects a list of paired_test results together and labels each: supports /
    contradicts (its sign, the claim's direction positive), or no detectable effect with the
    smallest effect its seeds could have detected (at the level it was judged, 80% power)."""
    levels, rejected = holm([test["p"] for test in tests], alpha)
    judged = []
    for test, level, reject in zip(tests, levels, rejected):
        detectable = (t_quantile(1 - level / 2, test["df"]) + t_quantile(power, test["df"]))
        verdict = ("supports" if test["mean"] > 0 else "contradicts") if reject else \
            "no detectable effect"
        judged.append(dict(verdict=verdict, level=level, detectable=detectable * test["se"],
                           **test))
    return judged


def seeds_of(results, name):
    """The number n of a method's runs in results, seeds 0..n-1 (runs go seed by seed)."""
    n = 0
    while f"{name} / seed {n}" in results:
        n += 1
    return n


def verdicts(results, names):
    """Mean ± std per method and metric over its seeds; for each claim and metric a paired t-test
    over the seeds both methods have (the runs of one seed share initial weights, data order, t
    and noise), Holm-corrected over every claim and metric of the table."""
    rows = {n: [results[f"{n} / seed {s}"] for s in range(seeds_of(results, n))] for n in names}
    metrics = {k: sign for k, sign in METRICS.items()  # scores of an older evaluator may lack some
               if all(k in r for rs in rows.values() for r in rs)}
    table = {n: {k: (float(np.mean([r[k] for r in rs])), float(np.std([r[k] for r in rs], ddof=1)))
                 for k in metrics} | dict(seeds=len(rs)) for n, rs in rows.items()}
    tests = [(claim, a, b, k, paired_test([sign * (ra[k] - rb[k])  # > 0: as the paper says
                                           for ra, rb in zip(rows[a], rows[b])]))
             for claim, a, b in CLAIMS if a in rows and b in rows for k, sign in metrics.items()]
    claims = {}
    for (claim, a, b, k, _), verdict in zip(tests, judge([test for *_, test in tests])):
        claims.setdefault(claim, dict(claim=claim, better=a, worse=b))[k] = verdict
    return table, list(claims.values())


def critical_tokens(results, names):
    """S3's claim that the race gives experts to critical tokens, per method: the within-cell
    slope of experts per token on object fraction, tested against 0 over seeds (Holm over the
    methods); "supports" means object patches get more experts than background at the same
    position and timestep."""
    names = [n for n in names if "experts_by_object" in results[f"{n} / seed 0"]]
    # token-choice gives every token k experts by construction: its slope is exactly 0, no test
    slopes = {n: [results[f"{n} / seed {s}"]["experts_by_object"]["slope"]
                  for s in range(seeds_of(results, n))] for n in names}
    slopes = {n: v for n, v in slopes.items() if any(v)}
    return {n: dict(slopes=slopes[n], **v)
            for n, v in zip(slopes, judge([paired_test(v) for v in slopes.values()]))}


def describe(v):
    """One verdict as text: the effect (the paper's direction positive) with its 95% interval."""
    effect = f"{v['mean']:+.4g} [{v['ci'][0]:+.4g}, {v['ci'][1]:+.4g}], p {v['p']:.2g}"
    if v["verdict"] == "no detectable effect":
        return f"no detectable effect ({effect}; detectable: {v['detectable']:.3g})"
    return f"{v['verdict']} ({effect})"


def markdown(results, table, claims, critical):
    """The tables of benchmarks/README.md, from results.json and the verdicts: per method the mean
    ± standard deviation over its seeds (the routing columns: means), the claims, the slopes."""
    lines = ["| method | seeds | shape-correct ↑ | log p ↑ | KID ↓ | held-out ε-MSE ↓ "
             "| MaxVio | comb. usage % | experts/token (sampling) | experts per object fraction |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    mean = lambda runs, get, form: format(np.mean([get(r) for r in runs]), form) \
        if all(get(r) is not None for r in runs) else "–"
    for n, row in table.items():
        runs = [results[f"{n} / seed {s}"] for s in range(row["seeds"])]
        cells = [f"{row[k][0]:.4g} ± {row[k][1]:.2g}" if k in row else "–" for k in METRICS]
        cells += [mean(runs, lambda r: r.get("max_vio"), ".2f"),          # routed models only
                  mean(runs, lambda r: r.get("comb_usage"), ".0f"),
                  mean(runs, lambda r: r.get("overall"), ".2f"),         # masks of the shapes only
                  mean(runs, lambda r: r.get("experts_by_object", {}).get("slope"), "+.3f")]
        lines.append(f"| {n} | {row['seeds']} | " + " | ".join(cells) + " |")
    bold = lambda text: text.replace("contradicts", "**contradicts**").replace(
        "supports", "**supports**")
    lines += ["", "| claim | seeds | " + " | ".join(METRICS) + " |",
              "| --- | ---: |" + " --- |" * len(METRICS)]
    for c in claims:
        seeds = next(c[k]["df"] + 1 for k in METRICS if k in c)
        cells = [bold(describe(c[k])) if k in c else "–" for k in METRICS]
        lines.append(f"| {c['claim']} | {seeds} | " + " | ".join(cells) + " |")
    lines.append("")
    lines += [f"- {n}: {bold(describe(v))}; per seed "
              + ", ".join(f"{x:+.3f}" for x in v["slopes"]) for n, v in critical.items()]
    return "\n".join(lines) + "\n"


def charts(results, names, out):
    curves = lambda n: [[v for _, v in results[f"{n} / seed {s}"]["curve"]]
                        for s in range(seeds_of(results, n))]
    steps = [s for s, _ in results[f"{names[0]} / seed 0"]["curve"]]
    series = [(steps, list(np.mean(curves(n), 0)), COLOURS[i % 10], 2) for i, n in enumerate(names)]
    # each seed
    series += [(steps, c, COLOURS[i % 10], 1) for i, n in enumerate(names) for c in curves(n)]
    line_chart(series, out / "loss_curves.png",
               "training MSE of the target: mean over seeds (thick), each seed", "step", log_y=True,
               size=(900, 480), legend=[(n, c) for n, (*_, c, _) in zip(names, series)])
    race = results.get("race full recipe (+RSL) / seed 0", {})
    if "per_layer" in race:
        experts_chart(race, out / "experts_by_timestep.png", 2)
    pair = [n for n in METHODS if n.startswith("deep") and n in names]
    if pair:
        series = [(list(range(1, 1 + len(results[f"{n} / seed {s}"]["contributions"]))),
                   results[f"{n} / seed {s}"]["contributions"], COLOURS[1 + i], 2 if s == 0 else 1)
                  for i, n in enumerate(pair) for s in range(seeds_of(results, n))]
        line_chart(series, out / "plr_contributions.png",
                   "||block(x) - x|| / ||x|| by depth (thick: seed 0)", "block", log_y=True,
                   legend=[(n, COLOURS[1 + i]) for i, n in enumerate(pair)])


def main(argv=None):
    p = Parser(prog="reproduce.py", description=__doc__)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--samples-per-class", type=int, default=50)
    p.add_argument("--sample-steps", type=int, default=50, help="DDPM steps for the scored samples")
    p.add_argument("--methods", default=",".join(list(METHODS)[:8]),
                   help="comma list of: " + ", ".join(METHODS) + " (default: the first 8, "
                        "Tables 6, 4 and 3)")
    p.add_argument("--data", default="shapes",
                   help="shapes or fashion-mnist (with --image-size 28)")
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--out", help="results and charts (default benchmarks/results)")
    p.add_argument("--runs", help="checkpoints, not committed (default benchmarks/runs)")
    p.add_argument("--data-dir", default=str(ROOT / "data"))
    p.add_argument("--quick", action="store_true", help="smoke test, temporary files")
    args = p.parse_args(argv)
    unknown = [m for m in args.methods.split(",") if m not in METHODS]
    if unknown:
        p.error(f"unknown --methods {', '.join(map(repr, unknown))}; "
                f"choose from: {', '.join(METHODS)}")
    if min(args.steps, args.samples_per_class, args.sample_steps) < 1 or args.seeds < 2:
        p.error("--steps, --samples-per-class and --sample-steps must be positive, "
                "--seeds at least 2 (a verdict needs a standard deviation)")
    tmp = Path(tempfile.mkdtemp()) if args.quick else None
    if args.quick:  # its files in a temporary folder, unless --out / --runs name one
        args.steps, args.samples_per_class, args.sample_steps, args.seeds = 4, 2, 3, 2
        args.out, args.runs = args.out or str(tmp / "results"), args.runs or str(tmp / "runs")
    out = Path(args.out or ROOT / "benchmarks" / "results")
    runs, tick = Path(args.runs or ROOT / "benchmarks" / "runs"), time.time()
    out.mkdir(parents=True, exist_ok=True)
    test = load_data(args.data, args.data_dir, args.image_size, "test")
    if args.quick:
        test.x, test.y = test.x[:200], test.y[:200]
    epochs = 1 if args.quick else 10
    evaluator = Evaluator(args.data, args.data_dir, args.image_size, epochs=epochs, cache_dir=tmp)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    names = args.methods.split(",")
    for seed in range(args.seeds):         # seed by seed: an interrupted table stays paired
        for name in names:
            flags, select_by, shared = METHODS[name]
            key, began = f"{name} / seed {seed}", time.time()
            run = runs / f"{(shared or name).replace(' ', '_')}_seed{seed}"
            every = dict(log=max(args.steps // 50, 1), save=max(args.steps // 2, 1))
            argv = ["--data", args.data, "--data-dir", args.data_dir, "--image-size",
                    str(args.image_size), "--steps", str(args.steps), "--seed", str(seed),
                    "--sample-every", "0", "--log-every", str(every["log"]), "--save-every",
                    str(every["save"]), "--out", str(run), *flags]
            recipe = recipe_of(vars(train.parse_args(argv)))
            done = results.get(key, {})     # scored already, with these settings: kept
            settings = (args.steps, CLASSES * args.samples_per_class, args.sample_steps, "ddpm")
            if (done.get("steps"), done.get("n"), done.get("sample_steps"), done.get("sampler")) \
                    == settings and recipe_of(done.get("recipe", {})) == recipe:
                continue
            ckpt = load_checkpoint(run / "ckpt.pt") if (run / "ckpt.pt").exists() else None
            if ckpt is not None and recipe_of(ckpt["args"]) != recipe:
                shutil.rmtree(run)                      # trained with another recipe: trained anew
                ckpt = None
            if ckpt is None or ckpt["step"] < args.steps:
                train.main(argv + (["--resume"] if ckpt is not None else []))
            del ckpt
            results[key], grid = score(run / "ckpt.pt", select_by, test, evaluator, args)
            results[key]["recipe"] = recipe
            results[key]["seconds"] = time.time() - began        # training (unless shared) + score
            if seed == 0:
                save_grid(grid, out / f"grid_{name.replace(' ', '_')}.png", nrow=10)
            atomic_write(results_path,
                         lambda tmp_path: tmp_path.write_text(json.dumps(results, indent=1)))
            print(f"{key}: {results[key]['seconds']:.0f} s", flush=True)
    # judged: every method with at least two seeds in results.json, so that a later --methods
    # adds to the table instead of replacing it
    names = [n for n in METHODS if seeds_of(results, n) >= 2]
    table, claims = verdicts(results, names)
    critical = critical_tokens(results, names)
    summary = dict(setup={k: v for k, v in vars(args).items()
                          if k not in ("out", "runs", "data_dir")},
                   seconds=time.time() - tick, table=table, claims=claims,
                   critical_tokens=critical)
    atomic_write(out / "summary.json",
                 lambda tmp_path: tmp_path.write_text(json.dumps(summary, indent=1)))
    text = markdown(results, table, claims, critical)
    atomic_write(out / "summary.md", lambda tmp_path: tmp_path.write_text(text))
    for name, row in table.items():
        print(f"{name:28s} {row['seeds']} seeds " + "  ".join(
            f"{k} {v[0]:.4f} ± {v[1]:.4f}" for k, v in row.items() if k != "seeds"))
    for c in claims:
        print(f"{c['claim']}: " + "; ".join(f"{k} {describe(c[k])}" for k in METRICS if k in c))
    for n, v in critical.items():
        print(f"experts per unit object fraction, {n}: {describe(v)}")
    charts(results, names, out)
    print(f"wrote {results_path}, {out / 'summary.json'}, {out / 'summary.md'} and charts in "
          f"{out} ({time.time() - tick:.0f} s)")
    if tmp is not None:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
