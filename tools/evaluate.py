"""
Score a train.py checkpoint's samples with support/evaluator.py's classifier of its data (shapes,
Fashion-MNIST, CIFAR-10): class accuracy, mean log-probability of the class asked for, KID.

    python tools/evaluate.py --ckpt runs/default/ckpt.pt                  # 20 samples per class
    python tools/evaluate.py --ckpt CKPT --per-class 100 --classifier-seed 1 --json eval.json
"""
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from support.evaluator import Evaluator, samples_per_class  # noqa: E402
from support.pictures import save_grid  # noqa: E402
from support.runs import (POSITIVE, SEED, STEPS, WEIGHT, Parser, atomic_write,  # noqa: E402
                          load_model, run_main, writable_folder)


def main(argv=None):
    p = Parser(prog="evaluate.py", description=__doc__)
    a = p.add_argument
    a("--ckpt", required=True, help="a train.py checkpoint of shapes, fashion-mnist or cifar10")
    a("--per-class", type=POSITIVE, default=20, help="samples per class")
    a("--steps", type=STEPS, help="sampling steps (default: the run's --sample-steps)")
    a("--cfg-scale", type=WEIGHT, help="guidance (default: the run's --cfg-scale)")
    a("--seed", type=SEED, default=0, help="sampling seed")
    a("--classifier-seed", type=SEED, default=0, help="another seed trains another classifier")
    a("--batch-size", type=POSITIVE, default=100)
    a("--json", help="write the scores here (also printed)")
    a("--grid", help="also write the samples as a PNG grid, one row per class")
    args = p.parse_args(argv)
    run_main("evaluate.py", lambda: evaluate(args))


def evaluate(args):
    for path, flag in ((args.json, "--json"), (args.grid, "--grid")):
        if path:
            writable_folder(path, flag)
    model, ckpt = load_model(args.ckpt)
    run = ckpt["args"]
    steps = args.steps or run["sample_steps"]                             # the run's were checked
    cfg_scale = run["cfg_scale"] if args.cfg_scale is None else args.cfg_scale
    evaluator = Evaluator(run["data"], run["data_dir"], run["image_size"], args.classifier_seed)
    tick = time.time()
    images, labels = samples_per_class(model, args.per_class, steps, args.batch_size,
                                       cfg_scale=cfg_scale, seed=args.seed)
    scores = dict(ckpt=str(args.ckpt), step=ckpt["step"], steps=steps, cfg_scale=cfg_scale,
                  seed=args.seed, classifier_seed=args.classifier_seed,
                  sample_seconds=time.time() - tick,
                  **evaluator.score(images, labels))
    print(json.dumps(scores, indent=1))
    if args.json:
        atomic_write(Path(args.json), lambda tmp: tmp.write_text(json.dumps(scores, indent=1)))
    if args.grid:
        save_grid(images, args.grid, nrow=args.per_class)


if __name__ == "__main__":
    main()
