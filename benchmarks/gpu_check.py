"""
One command for whoever has a GPU for a few minutes (about 5 minutes on one H100/H200):

    python benchmarks/gpu_check.py --json benchmarks/gpu_check.json

1. grouped GEMM vs the loop over experts in bf16, forward and backward, on a NaN-poisoned
   allocator, with an expert that gets no rows first, in the middle and last (its weight gradient
   must be exactly zero);
2. train.py's own step (latent data through the pinned loader, accumulation, AdamW, the thresholds
   averaged over a one-process group, the EMA) at B/2-2in8, 2 micro-batches of 32, under
   torch.cuda.set_sync_debug_mode("error"), with and without --recompute;
3. 50 bf16 steps of that step at batch 256: the loss must fall;
4. bench.py: B/2 dense vs race vs token at batch 256 (images/s, peak memory);
5. the largest XL/2-4in32 micro-batch for a training step with the EMA copy and AdamW's state
   resident, without and with --recompute, and each batch's peak allocated memory next to
   bench.py's count of the same step on FakeTensors.
The JSON is rewritten after every stage, so a crash keeps the stages before it.
`--tiny` runs the same stages at tiny sizes on a CPU (the sync check needs CUDA); full sizes refuse
to run without CUDA.
"""
import argparse
import gc
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import race_dit as R  # noqa: E402
import train  # noqa: E402
from benchmarks import bench  # noqa: E402
from support.data import BatchOrder, load_data  # noqa: E402
from support.runs import Parser, atomic_write, autocast_for  # noqa: E402

TINY = dict(model="XS/8", big="XS/8", batch=4, sync_batch=4, steps=6, size=8, limit=8)
FULL = dict(model="B/2", big="XL/2", batch=256, sync_batch=32, steps=50, size=32, limit=4096)


def poison_allocator(device, shape, dtype):
    """Allocate and free a NaN-filled block: memory a kernel forgets to write then reads as NaN,
    not as the zeros a fresh process's allocations often hold."""
    block = torch.full(shape, float("nan"), device=device, dtype=dtype)
    del block


def grouped_equals_loop(device, dtype, matmul=R.grouped_matmul):
    """The grouped GEMM against the loop over experts, forward and backward (a fixed upstream
    gradient, so that each of output, input gradient and weight gradient is judged on its own),
    with an empty expert first, in the middle and last. ok needs every error finite and below
    2e-2, and the empty expert's weight gradient exactly zero (pytorch/pytorch#172439 leaves it
    unwritten)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 64, generator=g).to(device, dtype)
    w = torch.randn(4, 64, 32, generator=g).to(device, dtype)
    up = torch.randn(96, 32, generator=g).to(device, dtype)               # upstream gradient
    # where the empty expert is -> (its index, group ends)
    cases = {"first": (0, [0, 30, 70, 96]), "middle": (1, [30, 30, 70, 96]),
             "last": (3, [30, 60, 96, 96])}
    errors, empty_zero = {}, {}
    for where, (empty, ends) in cases.items():
        ends = torch.tensor(ends, device=device)
        out = {}
        for grouped in (True, False):
            poison_allocator(device, (4 * 96, 64), dtype)
            xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
            y = matmul(xg, wg, ends, grouped=grouped)
            out[grouped] = (y, *torch.autograd.grad(y, (xg, wg), up))
        empty_zero[where] = bool((out[True][2][empty] == 0).all())
        errors[where] = [(a.float() - b.float()).abs().max().item()
                         / (b.float().abs().max().item() + 1e-6)
                         for a, b in zip(out[True], out[False])]
    flat = [e for errs in errors.values() for e in errs]                  # output, dx, dw per case
    finite = all(math.isfinite(e) for e in flat)
    return dict(max_relative_error=max(flat) if finite else float("nan"),
                errors=errors, empty_expert_grad_zero=empty_zero,
                ok=finite and max(flat) < 2e-2 and all(empty_zero.values()))


class Run:
    """What train.py builds for a latent run: flags, data, model, EMA copy, AdamW, loader,
    precision."""

    def __init__(self, name, experts, batch, size, device, folder, grad_accum=1):
        n = max(2 * batch * grad_accum, 64)
        rng = np.random.default_rng(0)
        np.save(folder / "moments.npy",
                rng.standard_normal((n, 2, 8, size, size), dtype=np.float32))
        np.save(folder / "labels.npy", rng.integers(0, 1000, n))
        self.args = train.parse_args(["--data", "latents", "--data-dir", str(folder),
                                      "--model", name, "--experts", experts,
                                      "--batch-size", str(batch), "--grad-accum", str(grad_accum)])
        self.ds = load_data("latents", str(folder), num_classes=1000)
        cfg = train.model_config(self.args, self.ds)
        self.model, self.ema, self.opt = train.build(cfg, self.args, device)   # as train.py does
        order = BatchOrder(len(self.ds), batch, 0, 0, accum=grad_accum)
        self.loader = iter(torch.utils.data.DataLoader(self.ds, batch_sampler=order,
                                                       pin_memory=device.type == "cuda"))
        self.device, self.diffusion = device, R.Diffusion(cfg)
        self.autocast, self.step = autocast_for("bf16", device), 0

    def train_step(self, sync_check=False):
        """train.py's data path and step; the loader's own work (CPU index lists) comes first."""
        raw = [next(self.loader) for _ in range(self.args.grad_accum)]
        check = sync_check and self.device.type == "cuda"
        if check:
            torch.cuda.set_sync_debug_mode("error")
        try:
            micro = train.device_batches(raw, self.ds, self.device, self.diffusion.num_timesteps)
            losses, _ = train.train_step(self.model, self.model, self.ema, self.opt, self.diffusion,
                                         micro, self.step, self.args, self.autocast)
        finally:
            if check:
                torch.cuda.set_sync_debug_mode("default")
        self.step += 1
        return losses["loss"]


def out_of_memory(e):
    """An allocation failure, as the caching allocator reports it or as cuBLAS / CUDA do."""
    text = str(e)
    return isinstance(e, torch.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and ("out of memory" in text or "ALLOC_FAILED" in text))


def free_memory(run=None):
    if run is not None:
        run.opt.zero_grad(set_to_none=True)                              # a failed backward's grads
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def largest_batch(name, experts, size, device, folder, recompute, limit):
    """Doubles the micro-batch until a training step runs out of memory; optimizer state, gradients
    and the EMA copy are resident, as in train.py: two steps, since the first creates AdamW's state
    after its backward. Returns the largest batch and the second step's peak allocated bytes at
    each batch that ran."""
    best, batch, peaks = 0, 8, {}
    while batch <= limit:
        run = None
        try:
            run = Run(name, experts, batch, size, device, folder)
            run.model.recompute = recompute
            run.train_step()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            run.train_step()
            if device.type == "cuda":
                peaks[batch] = torch.cuda.max_memory_allocated(device)
            best, batch = batch, batch * 2
        except Exception as e:
            if not out_of_memory(e):
                raise
            break
        finally:
            free_memory(run)
            del run
            free_memory()
    return best, peaks


def main(argv=None):
    p = Parser(prog="gpu_check.py", description=__doc__)
    p.add_argument("--tiny", action="store_true", help="tiny sizes, for a CPU smoke test")
    p.add_argument("--json", help="written after every stage")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        p.error("no CUDA device: the full sizes need a GPU (--tiny runs the stages on a CPU)")
    device = torch.device("cuda" if cuda else "cpu")
    s = TINY if args.tiny else FULL
    result = dict(device=torch.cuda.get_device_name() if cuda else "cpu", torch=torch.__version__)
    tick = time.time()

    def stage(key, value):
        result[key], result["seconds"] = value, time.time() - tick
        print(json.dumps({key: value}), flush=True)
        if args.json:
            atomic_write(Path(args.json), lambda tmp: tmp.write_text(json.dumps(result, indent=1)))

    folder = Path(tempfile.mkdtemp())
    stage("grouped_vs_loop", grouped_equals_loop(device, torch.bfloat16 if cuda else torch.float32))
    stage("grouped_mm_chosen", R.use_grouped_mm(device, torch.bfloat16))
    # A one-process group, so that the step averages the thresholds as under torchrun.
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{folder / 'store'}",
                            rank=0, world_size=1)
    run = Run(s["model"], "2in8", s["sync_batch"], s["size"], device, folder, grad_accum=2)
    sync = {}
    for recompute in (False, True):
        run.model.recompute = recompute
        run.train_step()                                                  # warm-up: lazy state
        try:
            run.train_step(sync_check=True)
            sync[f"recompute={recompute}"] = "no host sync" if cuda else "not checked on CPU"
        except RuntimeError as e:
            sync[f"recompute={recompute}"] = f"failed: {str(e).splitlines()[0]}"
    stage("sync_free_step", sync)
    del run
    free_memory()
    run = Run(s["model"], "2in8", s["batch"], s["size"], device, folder)
    losses = [run.train_step() for _ in range(s["steps"])]
    losses = [v.item() for v in losses]
    stage("loss_first_last", [losses[0], sum(losses[-5:]) / 5])
    stage("loss_falls", result["loss_first_last"][1] < result["loss_first_last"][0])
    del run
    free_memory()
    dist.destroy_process_group()
    bench_json = folder / "bench.json"
    models = ",".join(f"{s['model']}:{r}" for r in ("dense", "race:2in8", "token:2in8"))
    bench.main(["--models", models, "--batch-size", str(s["batch"]),
                "--rounds", "1" if args.tiny else "5", "--warmup", "0" if args.tiny else "2",
                "--image-size", str(s["size"]), "--json", str(bench_json)])
    stage("bench", json.loads(bench_json.read_text())["rows"])
    shape = argparse.Namespace(image_size=s["size"], channels=4, num_classes=1000)
    spec = f"{s['big']}:race:4in32"
    for recompute in (False, True):
        key = "largest_xl2_4in32_batch" + ("_recompute" if recompute else "")
        limit = s["limit"] * (2 if recompute else 1)
        best, peaks = largest_batch(s["big"], "4in32", s["size"], device, folder, recompute, limit)
        stage(key, best)
        # bench.py's count on FakeTensors next to the allocator's peak, batch by batch
        stage(key.replace("batch", "peak_gib"), {
            b: dict(allocated=v / 2**30, counted=bench.step_memory(spec, shape, b, recompute)[1]
                    / 2**30) for b, v in peaks.items()})
    stage("memory_counted", bench.memory([spec], shape, batches=(s["batch"],),
                                         limit=1 if args.tiny else 2 * s["limit"]))
    shutil.rmtree(folder)
    return result


if __name__ == "__main__":
    main()
