"""
One command for whoever has a GPU for a few minutes (about 5 minutes on one H100/H200):

    python benchmarks/gpu_check.py --json benchmarks/gpu_check.json

1. grouped GEMM vs the loop over experts in bf16, forward and backward, with an expert that gets no rows;
2. a training step under torch.cuda.set_sync_debug_mode("error"), with and without --grad-checkpoint;
3. 50 bf16 training steps of B/2-2in8 on synthetic latents: the loss must fall;
4. bench.py: B/2 dense vs race vs token at batch 256 (images/s, peak memory);
5. the largest XL/2-4in32 micro-batch that fits for a training step, without and with --grad-checkpoint,
   next to bench.py's estimate of it.
`--tiny` runs the same checks on tiny sizes (on CPU, the sync check is skipped): the test suite does.
"""
import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import race_dit as R  # noqa: E402
from benchmarks import bench  # noqa: E402
from runs import atomic_write  # noqa: E402


def grouped_equals_loop(device, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 64, generator=g).to(device, dtype).requires_grad_()
    w = torch.randn(4, 64, 32, generator=g).to(device, dtype).requires_grad_()
    ends = torch.tensor([30, 30, 70, 96], device=device)                  # expert 1: zero rows
    out = {}
    for grouped in (True, False):
        y = R.grouped_matmul(x, w, ends, grouped=grouped)
        out[grouped] = (y, *torch.autograd.grad(y.float().square().sum(), (x, w)))
    errors = [(a.float() - b.float()).abs().max().item() / (b.float().abs().max().item() + 1e-6)
              for a, b in zip(out[True], out[False])]
    return dict(max_relative_error=max(errors), ok=max(errors) < 2e-2)


def make(name, experts, device, size):
    """A latent model as train.py builds it (learned sigma), on the device itself (XL/2-4in32's 2.8B
    parameters initialise in seconds), with AdamW."""
    cfg = R.make_config(name, experts, input_size=size, in_channels=4, learn_sigma=True)
    with torch.device(device):
        model = R.RaceDiT(cfg).to(device)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)


def train_steps(model, opt, batch, steps, no_sync_check=False):
    device, size = next(model.parameters()).device, model.cfg.input_size
    d = R.Diffusion()
    g = torch.Generator(device=device).manual_seed(0)
    x0 = torch.randn(batch, 4, size, size, device=device, generator=g)
    y = torch.randint(0, 1000, (batch,), device=device, generator=g)
    losses = []
    for i in range(steps):
        check = no_sync_check and i == steps - 1 and device.type == "cuda"
        with torch.autocast(device.type, torch.bfloat16), contextlib.ExitStack() as stack:
            if check:
                torch.cuda.set_sync_debug_mode("error")
                stack.callback(torch.cuda.set_sync_debug_mode, "default")
            loss = d.training_losses(model, x0, y)[0]["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        losses.append(loss.detach())
    return [v.item() for v in losses]


def largest_batch(model, opt, start=8, limit=4096):
    """Doubles the micro-batch until a training step runs out of memory; the optimizer state counts."""
    best, batch = 0, start
    while batch <= limit:
        try:
            train_steps(model, opt, batch, 1)
            best, batch = batch, batch * 2
        except torch.OutOfMemoryError:
            break
        finally:
            opt.zero_grad(set_to_none=True)                               # a failed backward's partial grads
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return best


def main(argv=None):
    p = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny sizes, for a CPU smoke test")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tiny, full = ("XS/8", "XS/8", 4, 6, 8), ("B/2", "XL/2", 256, 50, 32)
    name, big, batch, steps, size = tiny if args.tiny else full  # model, big model, batch, steps, size
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    result = dict(device=gpu, torch=torch.__version__)
    tick = time.time()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    result["grouped_vs_loop"] = grouped_equals_loop(device, dtype)
    result["grouped_mm_chosen"] = R.use_grouped_mm(device, torch.bfloat16)
    try:
        model, opt = make(name, "2in8", device, size)
        for checkpointing in (False, True):
            model.grad_checkpointing = checkpointing
            train_steps(model, opt, 8, 2, no_sync_check=True)
        result["sync_free_step"] = device.type == "cuda" or "not checked on CPU"
    except RuntimeError as e:
        result["sync_free_step"] = f"failed: {str(e).splitlines()[0]}"
    losses = train_steps(*make(name, "2in8", device, size), batch, steps)
    result["loss_first_last"] = [losses[0], sum(losses[-5:]) / 5]
    result["loss_falls"] = result["loss_first_last"][1] < result["loss_first_last"][0]
    bench_json = Path(args.json or "gpu_check.json").with_suffix(".bench.json")
    models = ",".join(f"{name}:{r}" for r in ("dense", "race:2in8", "token:2in8"))
    bench.main(["--models", models, "--batch-size", str(batch), "--rounds", "1" if args.tiny else "5",
                "--warmup", "0" if args.tiny else "2", "--image-size", str(size),
                "--json", str(bench_json)])
    result["bench"] = json.loads(bench_json.read_text())["rows"]
    bench_json.unlink()
    limit = 8 if args.tiny else 4096
    model, opt = make(big, "4in32", device, size)
    result["largest_xl2_4in32_batch"] = largest_batch(model, opt, limit=limit)
    model.grad_checkpointing = True
    result["largest_xl2_4in32_batch_ckpt"] = largest_batch(model, opt, limit=2 * limit)
    del model, opt
    shape = argparse.Namespace(image_size=size, channels=4, num_classes=1000)
    result["memory_estimate"] = bench.memory([f"{big}:race:4in32"], shape, device)  # against the measured
    result["seconds"] = time.time() - tick
    print(json.dumps({k: v for k, v in result.items() if k != "bench"}, indent=1))
    if args.json:
        atomic_write(Path(args.json), lambda tmp: tmp.write_text(json.dumps(result, indent=1)))
    return result


if __name__ == "__main__":
    main()
