"""End-to-end tests of the scripts (train.py, sample.py, tools/, benchmarks/) and of the data and
file helpers they share (support/), on tiny inputs the tests create. CPU only, no network."""
import argparse
import contextlib
import errno
import gzip
import hashlib
import json
import math
import os
import pickle
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torch.overrides import TorchFunctionMode

import race_dit as R
import sample
import train
from support import data, evaluator, runs
from tools import evaluate, extract_latents
from conftest import FAST, randomize_zero_init, run_train, tiny

ROOT = Path(__file__).resolve().parent.parent


def digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def losses_by_step(out):
    return {r["step"]: r["loss"] for r in map(json.loads, open(Path(out) / "metrics.jsonl"))}


def expect_error(capsys, main, argv, message, code=2):
    """One line on stderr naming the problem, the exit status, no traceback."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == code and message in err and err.count("\n") == 1, err


# --------------------------------------------------------------------------------------------------
# train.py

def test_train_end_to_end_writes_checkpoint_metrics_grid_and_loss_chart(tmp_path, capsys):
    run_train(tmp_path, "--save-every", "2", "--sample-every", "4")
    assert "step 4/4" in capsys.readouterr().out
    ckpt = runs.load_checkpoint(tmp_path / "ckpt.pt")
    assert ckpt["step"] == 4 and set(ckpt) >= {"model", "ema", "opt", "config", "rng", "args"}
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["experts_per_token"] == pytest.approx(2.0)
    assert "comb_usage" in record and "max_vio" in record
    grid = Image.open(tmp_path / "samples" / "step_0000004.png")
    assert grid.size == (8 * 50 + 2, 10 * 50 + 2)                        # 10 classes x 8 samples
    assert Image.open(tmp_path / "loss.png").size == (720, 420)
    assert not list(tmp_path.glob(".*tmp*"))                             # no temporary file left


def step_parts(argv, data_dir=None):
    """What train() builds for one process: flags, data, model, EMA copy, AdamW, the batch
    iterator."""
    args = train.parse_args([*FAST, *argv])
    ds = data.load_data(args.data, data_dir or args.data_dir, args.image_size, "train",
                        args.num_classes)
    torch.manual_seed(0)
    model, ema, opt = train.build(train.model_config(args, ds), args, torch.device("cpu"))
    order = data.BatchOrder(len(ds), args.batch_size, 0, 0, accum=args.grad_accum)
    return args, ds, model, ema, opt, iter(torch.utils.data.DataLoader(ds, batch_sampler=order))


def test_the_ema_is_the_average_of_the_weights_and_never_joins_the_autograd_graph():
    args, ds, model, ema, opt, loader = step_parts([])
    diffusion, cpu, fp32 = R.Diffusion(), torch.device("cpu"), contextlib.nullcontext
    want = [p.detach().clone() for p in model.parameters()]
    for step in range(3):
        micro = train.device_batches([next(loader)], ds, cpu, 1000)
        train.train_step(model, model, ema, opt, diffusion, micro, step, args, fp32)
        d = min(args.ema_decay, (1 + step) / (10 + step))
        want = [d * w + (1 - d) * p.detach() for w, p in zip(want, model.parameters())]
    for e, w in zip(ema.parameters(), want):
        assert e.grad_fn is None and e.is_leaf and not e.requires_grad
        torch.testing.assert_close(e, w)


def write_latents(folder, n=16, size=8, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    np.save(folder / "moments.npy", rng.standard_normal((n, 2, 8, size, size), dtype=np.float32))
    np.save(folder / "labels.npy", rng.integers(0, 10, n))
    return folder


def test_a_whole_training_step_reads_no_tensor_back_to_the_host(tmp_path, monkeypatch):
    """The CPU stand-in for gpu_check.py's set_sync_debug_mode("error") over train.py's step: latent
    data to the device, two micro-batches, AdamW, the thresholds averaged over a (one-process)
    group, the EMA; with and without recomputation. AdamW's step counts are the one exception: on
    CUDA too they live on the host, so reading them is no synchronisation."""
    argv = ["--data", "latents", "--num-classes", "10", "--batch-size", "4", "--grad-accum", "2"]
    args, ds, model, ema, opt, loader = step_parts(argv, write_latents(tmp_path / "lat"))
    diffusion, cpu, fp32 = R.Diffusion(), torch.device("cpu"), contextlib.nullcontext
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        step = lambda i, raw: train.train_step(model, model, ema, opt, diffusion,
                                               train.device_batches(raw, ds, cpu, 1000),
                                               i, args, fp32)
        step(0, [next(loader), next(loader)])                           # the optimizer's lazy state
        host_side = {id(state["step"]) for state in opt.state.values()}
        raws = [[next(loader), next(loader)] for _ in range(2)]     # the loader's index lists: host
        for name in ("item", "tolist", "numpy", "cpu", "nonzero", "__bool__", "__int__",
                     "__float__", "__index__"):
            def host_read(self, *a, original=getattr(torch.Tensor, name), **k):  # noqa: B008
                assert id(self) in host_side, "a tensor was read on the host"
                return original(self, *a, **k)
            monkeypatch.setattr(torch.Tensor, name, host_read)
        for i, recompute in enumerate((False, True)):
            model.recompute = recompute
            step(1 + i, raws[i])
    finally:
        monkeypatch.undo()
        dist.destroy_process_group()
    assert all(m.threshold_updates == 6 for m in model.moe_layers())     # 3 steps x 2 races


class NoHostTensors(TorchFunctionMode):
    """Fails any call that mixes a host tensor (not a scalar) with a meta one: meta stands in for a
    GPU, where such a call copies from pageable host memory and synchronises."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        def tensors(v):
            if isinstance(v, torch.Tensor):
                return [v]
            items = v.values() if isinstance(v, dict) else v if isinstance(v, (list, tuple)) else []
            return [t for item in items for t in tensors(item)]
        found = tensors([args, kwargs or {}])
        if any(t.device.type == "meta" for t in found):
            assert all(t.device.type == "meta" or t.dim() == 0 for t in found), func
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("latent", [True, False])
def test_the_data_path_makes_every_tensor_on_the_batchs_device(latent):
    ds = argparse.Namespace(latent=latent)
    x = torch.zeros((4, 2, 8, 4, 4) if latent else (4, 3, 4, 4), device="meta")
    with NoHostTensors():
        [(x0, y, t, noise)] = train.device_batches([(x, torch.arange(4))], ds,
                                                   torch.device("meta"), 1000)
    assert all(v.device.type == "meta" for v in (x0, y, t, noise))
    assert x0.shape == (4, 4 if latent else 3, 4, 4)


@pytest.fixture(scope="module")
def shapes_evaluator(tmp_path_factory):
    """The shapes classifier at 16x16, trained once (about 10 s) and cached in its folder."""
    folder = tmp_path_factory.mktemp("evaluator")
    return evaluator.Evaluator("shapes", folder, 16, log=lambda *a: None), folder


def test_the_shapes_classifier_reads_shapes_not_colours(shapes_evaluator):
    ev, _ = shapes_evaluator
    assert ev.test_accuracy > 0.98
    assert ev.probes["colour_only"] < 0.2                                 # chance: 0.1
    assert ev.probes["recoloured"] >= 0.95


def test_train_scores_its_grids_with_the_shape_classifier(tmp_path, capsys, shapes_evaluator):
    _, folder = shapes_evaluator                                          # the cached classifier
    run_train(tmp_path / "run", "--eval", "on", "--data-dir", str(folder), "--sample-every", "4",
              "--grid-per-class", "2")
    line = [s for s in capsys.readouterr().out.splitlines() if "samples of step 4" in s][0]
    assert "class accuracy" in line and "log p" in line and "KID" in line
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["n"] == 20 and {"accuracy", "logp", "kid", "kid_se"} <= set(record)


def test_warmup_ramps_the_learning_rate_linearly(tmp_path):
    run_train(tmp_path, "--warmup", "3", "--lr", "1e-3", "--log-every", "1", "--sample-every", "0")
    lrs = [r["lr"] for r in map(json.loads, open(tmp_path / "metrics.jsonl"))]
    assert lrs == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])


def test_gradient_accumulation_equals_one_big_batch_for_a_dense_model():
    from conftest import tiny
    import race_dit as R
    args = train.parse_args(["--plr-weight", "0.1", "--rsl-weight", "0.01"])
    grads = {}
    for n in (1, 2, 4):
        torch.manual_seed(0)
        model = R.RaceDiT(tiny("dense", class_dropout_prob=0.0))
        g = torch.Generator().manual_seed(1)
        x0, y = torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 4, (8,), generator=g)
        t, noise = torch.randint(0, 1000, (8,), generator=g), torch.randn(8, 3, 8, 8, generator=g)
        micro = list(zip(x0.chunk(n), y.chunk(n), t.chunk(n), noise.chunk(n)))
        losses, _ = train.accumulate(model, R.Diffusion(), micro, args, contextlib.nullcontext)
        grads[n] = [p.grad for p in model.parameters() if p.requires_grad]
        assert set(losses) == {"loss", "mse"}
    for n in (2, 4):
        for a, b in zip(grads[1], grads[n]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("extra", [[], ["--recompute"]])
def test_accumulated_race_runs_one_race_per_micro_batch(tmp_path, extra):
    run_train(tmp_path, "--grad-accum", "2", "--sample-every", "0", *extra)
    ckpt = runs.load_checkpoint(tmp_path / "ckpt.pt")
    updates = [v for k, v in ckpt["model"].items() if k.endswith("threshold_updates")]
    assert len(updates) == 6 and all(u == 4 * 2 for u in updates)         # 4 steps x 2 races each
    for r in map(json.loads, open(tmp_path / "metrics.jsonl")):            # images: 8 x 2 a step
        assert r["images_per_s"] == pytest.approx(r["steps_per_s"] * 8 * 2)


def test_resume_continues_exactly(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    run_train(a, "--save-every", "3", "--sample-every", "3", steps=6)
    run_train(b, "--save-every", "3", "--sample-every", "3", steps=3)
    with open(b / "metrics.jsonl", "a") as f:                   # logged after the save, then killed
        # the last line cut mid-write
        f.write(json.dumps(dict(step=4, loss=9.0)) + '\n{"step": 5, "lo')
    run_train(b, "--save-every", "3", "--sample-every", "3", "--resume", steps=6)
    la, lb = losses_by_step(a), losses_by_step(b)
    assert la.keys() == lb.keys() == {2, 3, 4, 6}
    # stale and partial records gone
    assert len((b / "metrics.jsonl").read_text().splitlines()) == 4
    for s in la:                                                 # CPU kernels: equal to float noise
        assert lb[s] == pytest.approx(la[s], rel=1e-6)


DIFFUSION_FIELDS = ("schedule", "loss_weight", "min_snr_gamma", "prediction")


def test_the_runs_diffusion_is_saved_and_used_by_resume_sample_and_evaluate(tmp_path, capsys):
    recipe = ["--schedule", "cosine", "--loss-weight", "min-snr", "--min-snr-gamma", "2",
              "--prediction", "v"]
    run_train(tmp_path, "--sample-every", "0", *recipe)
    ckpt = runs.load_checkpoint(tmp_path / "ckpt.pt")
    assert [ckpt["config"][k] for k in DIFFUSION_FIELDS] == ["cosine", "min-snr", 2.0, "v"]
    base = [*FAST, "--out", str(tmp_path), "--resume", "--steps", "6"]
    expect_error(capsys, train.main, base + ["--schedule", "linear", "--loss-weight", "min-snr",
                                             "--prediction", "v"],
                 "schedule=cosine in the checkpoint, linear now; min_snr_gamma=2.0 in the")
    # sample.py and evaluate.py sample with the checkpoint's diffusion: the same images as the
    # cosine v diffusion gives, not DiT's
    sample.main(["--ckpt", str(tmp_path / "ckpt.pt"), "--steps", "4", "--labels", "0,1,2",
                 "--npz", str(tmp_path / "s.npz"), "--out", ""])
    model, _ = runs.load_model(tmp_path / "ckpt.pt")
    made = lambda d: data.to_uint8(d.sample(model, torch.tensor([0, 1, 2]), 4, cfg_scale=1.5,
                                            clip_x0=True))
    got = np.load(tmp_path / "s.npz")["arr_0"]
    cosine_v = R.Diffusion(R.Config(schedule="cosine", prediction="v"))
    assert np.array_equal(got, made(cosine_v)) and not np.array_equal(got, made(R.Diffusion()))
    evaluate_uses = []
    real = R.Diffusion
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(R, "Diffusion", lambda cfg: evaluate_uses.append(cfg.schedule) or real(cfg))
        mp.setattr(evaluate, "Evaluator", lambda *a: argparse.Namespace(score=lambda *b: {}))
        evaluate.main(["--ckpt", str(tmp_path / "ckpt.pt"), "--per-class", "1", "--steps", "2"])
    assert evaluate_uses and set(evaluate_uses) == {"cosine"}


def test_a_checkpoint_from_before_the_diffusion_options_keeps_dits_diffusion(tmp_path, capsys):
    dit = ["--schedule", "linear", "--loss-weight", "none", "--prediction", "eps"]
    run_train(tmp_path / "new", "--sample-every", "0", *dit)
    state = torch.load(tmp_path / "new" / "ckpt.pt", weights_only=True)
    for k in DIFFUSION_FIELDS:
        del state["config"][k]
    (tmp_path / "old").mkdir()
    torch.save(state, tmp_path / "old" / "ckpt.pt")
    model, _ = runs.load_model(tmp_path / "old" / "ckpt.pt")
    assert (model.cfg.schedule, model.cfg.loss_weight, model.cfg.prediction) == (
        "linear", "none", "eps")
    argv = [*FAST, "--out", str(tmp_path / "old"), "--resume", "--steps", "6"]
    expect_error(capsys, train.main, argv + ["--schedule", "cosine"],
                 "schedule=linear in the checkpoint, cosine now")
    train.main(argv + [*dit, "--sample-every", "0"])
    assert runs.load_checkpoint(tmp_path / "old" / "ckpt.pt")["step"] == 6


def test_a_resumed_run_keeps_no_map_of_the_checkpoint_it_loaded(tmp_path, monkeypatch):
    """Mapped, the loaded file's blocks would stay on disk after the next save replaces it (45 GB
    at XL/2-4in32); the optimizer state is the part load_state_dict would keep as given."""
    run_train(tmp_path, "--sample-every", "0")
    maps, real_step = [], train.train_step

    def step(*a, **kw):
        maps.append([line for line in Path("/proc/self/maps").read_text().splitlines()
                     if str(tmp_path / "ckpt.pt") in line])
        return real_step(*a, **kw)
    monkeypatch.setattr(train, "train_step", step)
    run_train(tmp_path, "--sample-every", "0", "--resume", steps=6)
    assert len(maps) == 2 and maps == [[], []]


def test_checkpoint_bytes_are_the_bytes_of_the_tensors_a_checkpoint_holds(tmp_path):
    run_train(tmp_path, "--sample-every", "0")
    ckpt = runs.load_checkpoint(tmp_path / "ckpt.pt")
    tensors = [*ckpt["model"].values(), *ckpt["ema"].values(),
               *(t for state in ckpt["opt"]["state"].values() for t in state.values())]
    held = sum(t.nbytes for t in tensors)
    assert runs.checkpoint_bytes(R.Config(**ckpt["config"])) == held
    assert 0 < (tmp_path / "ckpt.pt").stat().st_size - held < 512 * len(tensors) + 2**16
    # latent checkpoints are GBs: saved every 5000 steps unless asked
    assert [train.parse_args(a).save_every for a in ([], ["--data", "latents"],
                                                     ["--data", "latents", "--save-every", "7"])
            ] == [400, 5000, 7]


class HostTensors(TorchFunctionMode):
    """Records the size of every host tensor that a torch call returns."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and out.device.type == "cpu":
            self.sizes.append(out.numel())
        return out


def test_the_model_is_built_on_its_device_not_on_the_host(tmp_path):
    args = train.parse_args([*FAST, "--out", str(tmp_path)])
    cfg = R.make_config("XS/8", "2in8", input_size=16, in_channels=3, num_classes=10)
    with HostTensors() as host:
        model, ema, opt = train.build(cfg, args, torch.device("meta"))   # meta stands in for a GPU
    tensors = [*model.parameters(), *model.buffers(), *ema.parameters(), *ema.buffers()]
    assert tensors and all(t.device.type == "meta" for t in tensors)
    assert host.sizes == []                      # not a weight, not even the sin-cos table,
    with HostTensors() as probe:                 # which the mode sees when made on the host
        R.sincos_pos_embed(192, 2)
    assert probe.sizes == [4 * 192]


def test_a_restart_without_checkpoint_drops_the_killed_runs_records(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps(dict(step=2, loss=5.0)) + "\n")
    run_train(tmp_path, "--sample-every", "0")
    records = map(json.loads, open(tmp_path / "metrics.jsonl"))
    assert [r["loss"] != 5.0 for r in records] == [True, True]


@pytest.mark.parametrize("flags,message", [
    (["--sample-steps", "0"], "argument --sample-steps: must be in 1..1000"),
    (["--sample-steps", "5000"], "argument --sample-steps: must be in 1..1000"),
    (["--lr", "-1"], "argument --lr: must be a positive number"),
    (["--lr", "nan"], "argument --lr: must be a positive number"),
    (["--cfg-scale", "nan"], "argument --cfg-scale: must be a number"),
    (["--threshold-decay", "2"], "[0, 1)"),
    (["--workers", "-1"], "argument --workers: must be zero or positive"),
    (["--model", "XS/0"], "patch size must be"),
    (["--seed", "1e20"], "invalid int value"), (["--seed", "-1"], "argument --seed: must be in"),
    (["--experts", "9in8"], "top-k must be between 1 and the number of experts"),
    (["--model", "Q/2"], "unknown model"), (["--data", "nowhere"], "neither one of"),
    (["--model", "XS/4", "--image-size", "30"], "not divisible by the patch size")])
def test_bad_flags_fail_before_any_work(tmp_path, capsys, flags, message):
    expect_error(capsys, train.main, [*FAST, "--out", str(tmp_path / "run"), *flags], message)
    assert not (tmp_path / "run" / "ckpt.pt").exists()


def test_an_error_under_torchrun_names_its_rank(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    argv = [*FAST, "--out", str(tmp_path), "--lr", "0"]
    expect_error(capsys, train.main, argv, "train.py (rank 1): error:")


def test_bad_inputs_and_divergence_keep_the_checkpoint(tmp_path, capsys):
    run_train(tmp_path, "--sample-every", "0")
    before = digest(tmp_path / "ckpt.pt")
    base = [*FAST, "--out", str(tmp_path), "--resume", "--steps", "8"]
    no_latents = ["--data", "latents", "--data-dir", str(tmp_path / "no")]
    expect_error(capsys, train.main, base + no_latents, "no moments.npy")
    expect_error(capsys, train.main, base + ["--experts", "1in8"],
                 "is from another configuration: top_k=2")
    expect_error(capsys, train.main, [*FAST, "--out", str(tmp_path)], "exists; pass --resume")
    # A diverging run: the weights blow up after a step whose loss was finite; nothing non-finite is
    # saved.
    expect_error(capsys, train.main, base + ["--lr", "1e6", "--save-every", "1", "--warmup", "0"],
                 "nothing saved (last checkpoint: step 4, intact)", code=3)
    assert digest(tmp_path / "ckpt.pt") == before
    assert not list(tmp_path.glob(".*tmp*"))


def test_a_second_run_on_a_locked_folder_fails_at_once(tmp_path, capsys):
    with runs.locked(tmp_path):                                        # a live run holds the folder
        expect_error(capsys, train.main, [*FAST, "--out", str(tmp_path)],
                     "in use by another running process")
    run_train(tmp_path, "--sample-every", "0")                      # it ended (or was killed): free
    assert (tmp_path / "ckpt.pt").exists()


def test_a_full_disk_during_torch_save_is_one_line_and_keeps_the_old_file(tmp_path, capsys):
    """The temporary file is /dev/full, so torch.save's zip writer fails as on a full disk: a
    RuntimeError raised while handling the OSError."""
    path = tmp_path / "ckpt.pt"
    path.write_bytes(b"old")
    os.symlink("/dev/full", tmp_path / f".ckpt.{os.getpid()}.tmp.pt")
    state = dict(model={"w": torch.zeros(100_000)})
    with pytest.raises(SystemExit) as e:
        runs.run_main("train.py", lambda: runs.save_checkpoint(path, state))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "no space left on device" in err and err.count("\n") == 1
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["ckpt.pt"]


def test_a_file_size_limit_during_torch_save_is_one_line_and_keeps_the_old_file(tmp_path):
    """A 4 GB file-system limit or `ulimit -f` (EFBIG): torch.save's zip writer fails with
    "unexpected pos"; a subprocess, so that the limit binds it alone."""
    (tmp_path / "ckpt.pt").write_bytes(b"old")
    code = ("import resource, torch; from support import runs; "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY)); "
            "runs.run_main('train.py', lambda: "
            "runs.save_checkpoint('ckpt.pt', dict(model={'w': torch.zeros(1_000_000)})))")
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr[-2000:]
    assert "file-size limit (ulimit -f)" in res.stderr and "files written before are intact" in \
        res.stderr
    assert (tmp_path / "ckpt.pt").read_bytes() == b"old" and os.listdir(tmp_path) == ["ckpt.pt"]


@pytest.mark.parametrize("code,why", [(errno.EIO, "Input/output error"),
                                      (errno.EROFS, "Read-only file system")])
def test_any_os_error_while_writing_is_one_line_and_keeps_the_old_file(tmp_path, capsys, code,
                                                                       why):
    path = tmp_path / "ckpt.pt"
    path.write_bytes(b"old")

    def refused(tmp):
        tmp.write_bytes(b"partial")
        raise OSError(code, os.strerror(code))
    with pytest.raises(SystemExit) as e:
        runs.run_main("train.py", lambda: runs.atomic_write(path, refused))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert err.startswith(f"train.py: error: writing {path} failed: {why}; files written before")
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["ckpt.pt"]


def test_three_images_and_batch_size_one_train_and_save(tmp_path):
    for i in range(3):
        (tmp_path / "imgs" / "cat").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (16, 16), (200, 20 * i, 0)).save(tmp_path / "imgs" / "cat" / f"{i}.png")
    run_train(tmp_path / "run", "--data", str(tmp_path / "imgs"), "--batch-size", "1",
              "--save-every", "2", "--sample-every", "0")
    assert runs.load_checkpoint(tmp_path / "run" / "ckpt.pt")["step"] == 4


RECORD_STEPS = """
import json, os, sys
import torch
import train
compile = torch.compile
torch.compile = lambda model, **kw: compile(model, backend="aot_eager", **kw)  # --compile's tracing
step = train.train_step
def recorded(net, model, *args):  # each rank writes its thresholds after every step
    out = step(net, model, *args)
    torch.compiler.set_stance("fail_on_recompile")  # after the first step: no new graph may compile
    path = os.path.join(os.environ["RECORDS"], "rank" + os.environ["RANK"] + ".json")
    with open(path, "a") as f:
        f.write(json.dumps([m.threshold.item() for m in model.moe_layers()]) + "\\n")
    return out
train.train_step = recorded
train.main(sys.argv[1:])
"""


def torchrun(args, env, timeout):
    """torchrun with 2 processes. On a timeout it is stopped with SIGTERM, on which it stops its
    ranks (each in a session of its own: killing torchrun would leave them running, to hold up the
    next run), and the test fails with what they printed."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **env}, cwd=ROOT)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()
        out, err = proc.communicate(timeout=60)
        pytest.fail(f"torchrun timed out after {timeout} s\n{out[-3000:]}\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def test_torchrun_two_gloo_processes_compiled_agree_on_thresholds_without_recompiling(tmp_path):
    """DDP (gloo, 2 processes) + torch.compile (aot_eager) + --recompute + bf16, so the experts run
    as one grouped GEMM, with accumulation (DDP's no_sync on all but the last micro-batch): the
    processes agree on every threshold, and steps whose routing differs compile nothing new (a
    host sync would break the graph, and a shape that follows the routing would recompile). The
    single-process tests compare recomputation with plain backward."""
    script = tmp_path / "record_steps.py"
    script.write_text(RECORD_STEPS)
    res = torchrun([str(script), *FAST, "--steps", "4", "--sample-every", "0",
                    "--out", str(tmp_path / "run"), "--grad-accum", "2", "--recompute", "--compile",
                    "--precision", "bf16"], dict(RECORDS=str(tmp_path), PYTHONPATH=str(ROOT)), 300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "1/4" not in res.stdout and res.stdout.count("step 4/4") == 1  # rank 0 alone prints
    thresholds = [(tmp_path / f"rank{r}.json").read_text().splitlines() for r in (0, 1)]
    assert len(thresholds[0]) == 4 and thresholds[0] == thresholds[1]    # every step, both ranks
    assert len(set(thresholds[0])) == 4                                   # and they move
    assert len(runs.load_checkpoint(tmp_path / "run" / "ckpt.pt")["rng"]) == 2


# --------------------------------------------------------------------------------------------------
# Data sources: formats, validation, no code execution

def write_cifar(root, batches):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name, b in batches.items():
        (folder / name).write_bytes(pickle.dumps(b, protocol=2))
    return folder


def test_cifar10_reads_the_official_archive_and_folder(tmp_path):
    rng = np.random.default_rng(0)
    batches = {f"data_batch_{i}": {b"data": rng.integers(0, 256, (3, 3072), dtype=np.uint8),
                                   b"labels": [i, 2, 9], b"batch_label": b"x"} for i in range(1, 6)}
    batches["test_batch"] = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [1, 1]}
    folder = write_cifar(tmp_path / "x", batches)
    with tarfile.open(tmp_path / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    for root in (tmp_path, tmp_path / "x"):                         # archive, then extracted folder
        ds = data.load_cifar10(root)
        assert len(ds) == 15 and ds[3][1] == 2 and ds.num_classes == 10
        x, y = ds[0]
        assert x.shape == (3, 32, 32) and y == 1
        assert torch.equal(x.flatten(), torch.from_numpy(batches["data_batch_1"][b"data"][0]))
        assert len(data.load_cifar10(root, "test")) == 2


class Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_cifar_file_cannot_run_code(tmp_path, capsys):
    Exploit.marker = tmp_path / "pwned"
    batches = {f"data_batch_{i}": {b"data": Exploit(), b"labels": [0]} for i in range(1, 6)}
    write_cifar(tmp_path, batches)
    expect_error(capsys, train.main, [*FAST, "--data", "cifar10", "--data-dir", str(tmp_path),
                                      "--out", str(tmp_path / "run")],
                 "refusing to load posix.system")
    assert not Exploit.marker.exists()


def write_idx(root, split, images, labels):
    with gzip.open(root / f"{split}-images-idx3-ubyte.gz", "wb") as f:
        f.write(np.array([2051, len(images), 28, 28], ">i4").tobytes() + images.tobytes())
    with gzip.open(root / f"{split}-labels-idx1-ubyte.gz", "wb") as f:
        f.write(np.array([2049, len(labels)], ">i4").tobytes()
                + np.asarray(labels, np.uint8).tobytes())


def test_fashion_mnist_reads_idx_gz_files_and_refuses_broken_ones(tmp_path, capsys):
    imgs = np.arange(3 * 28 * 28, dtype=np.uint32).astype(np.uint8).reshape(3, 28, 28)
    write_idx(tmp_path, "train", imgs, [7, 0, 3])
    ds = data.load_fashion_mnist(tmp_path)
    assert len(ds) == 3 and ds[2][1] == 3 and torch.equal(ds[1][0][0], torch.from_numpy(imgs[1]))
    gz = tmp_path / "train-images-idx3-ubyte.gz"
    gz.write_bytes(gz.read_bytes()[:40])                                 # truncated download
    expect_error(capsys, train.main, [*FAST, "--data", "fashion-mnist", "--data-dir", str(tmp_path),
                                      "--out", str(tmp_path / "run")],
                 "could not read fashion-mnist")
    write_idx(tmp_path, "train", imgs, [7, 0, 12])                        # a label out of range
    with pytest.raises(runs.UserError, match=r"labels must be in 0..9, found 0..12"):
        data.load_fashion_mnist(tmp_path)


def make_folder_dataset(root, n=3, sizes=((40, 60), (64, 64), (33, 50))):
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(n):
            colour = (200, 0, 0) if c == "cat" else (0, 0, 200)
            Image.new("RGB", sizes[i % len(sizes)], colour).save(root / c / f"{i}.png")


def test_image_folder_center_crops_and_trains(tmp_path):
    make_folder_dataset(tmp_path / "imgs", n=4)
    ds = data.FolderDataset(tmp_path / "imgs", 16)
    assert len(ds) == 8 and ds[0][0].shape == (3, 16, 16) and ds[7][1] == 1 and ds.num_classes == 2
    assert ds[0][0][0].float().mean() == pytest.approx(200, abs=1)              # red cats
    assert ds[7][0][2].float().mean() == pytest.approx(200, abs=1)              # blue dogs
    run_train(tmp_path / "run", "--data", str(tmp_path / "imgs"), "--image-size", "16",
              "--sample-every", "0")
    assert runs.load_checkpoint(tmp_path / "run" / "ckpt.pt")["config"]["num_classes"] == 2


def test_image_folder_reports_a_truncated_image_and_reads_16_bit(tmp_path, capsys):
    make_folder_dataset(tmp_path / "imgs")
    grey16 = Image.fromarray(np.full((20, 20), 40000, np.uint16))
    grey16.save(tmp_path / "imgs" / "dog" / "deep.png")
    ds = data.FolderDataset(tmp_path / "imgs", 16)
    assert ds[ds.items.index((tmp_path / "imgs" / "dog" / "deep.png", 1))][0].float().mean() == \
        pytest.approx(40000 / 257, abs=1)                               # grey, not clipped to white
    bad = tmp_path / "imgs" / "cat" / "1.png"
    bad.write_bytes(bad.read_bytes()[:60])
    expect_error(capsys, train.main, [*FAST, "--data", str(tmp_path / "imgs"), "--image-size", "16",
                                      "--out", str(tmp_path / "run")],
                 "1.png is not a readable image")


def stand_in_vae(x):  # 8x downsampling, 4 channels, fixed small variance
    m = F.avg_pool2d(x, 8)
    return torch.cat([m, -m[:, :1]], 1), torch.full((len(x), 4, 2, 2), -30.0)


def test_latent_format_round_trips(tmp_path, monkeypatch):
    make_folder_dataset(tmp_path / "imgs")
    extract_latents.extract_latents(tmp_path / "imgs", tmp_path / "lat", 16, stand_in_vae, "cpu",
                                    4, 0)
    ds = data.load_latents(tmp_path / "lat", 1000)
    assert len(ds) == 6 and ds[0][0].shape == (2, 8, 2, 2) and list(ds.y) == [0, 0, 0, 1, 1, 1]
    x = torch.stack([ds[i][0] for i in range(6)])
    img = torch.stack([data.FolderDataset(tmp_path / "imgs", 16)[i][0]
                       for i in range(6)]).float() / 127.5 - 1
    mean, _ = stand_in_vae(img)
    torch.testing.assert_close(x[:, 0, :4].float(), mean, atol=2e-3, rtol=2e-3)  # stored as float16
    torch.testing.assert_close(x[:, 1, :4].float(), stand_in_vae(img.flip(-1))[0],
                               atol=2e-3, rtol=2e-3)
    z = data.to_model_input(x, ds)                               # posterior sample of image or flip
    near = lambda f: (z - x[:, f, :4].float() * data.LATENT_SCALE).abs().amax((1, 2, 3)) < 1e-4
    assert z.shape == (6, 4, 2, 2) and (near(0) | near(1)).all()
    run_train(tmp_path / "run", "--data", "latents", "--data-dir", str(tmp_path / "lat"),
              "--model", "XS/1", "--sample-every", "0", "--batch-size", "4", "--num-classes", "10")
    config = runs.load_checkpoint(tmp_path / "run" / "ckpt.pt")["config"]
    # the flag, not the largest label
    assert config["in_channels"] == 4 and config["num_classes"] == 10
    # The routing maps of a latent model: samples and the training latents decoded by the VAE
    # (here an 8x nearest-neighbour stand-in), each image beside its maps.
    decoded = []
    def decode(z):
        decoded.append(z.shape)
        return argparse.Namespace(sample=F.interpolate(z[:, :3], scale_factor=8).clamp(-1, 1))
    monkeypatch.setattr(sample, "load_vae", lambda *a: argparse.Namespace(decode=decode))
    drawn = []
    monkeypatch.setattr(sample, "routing_map", lambda images, maps, *a: drawn.append(
        (images.shape, maps.shape)))
    run_sample(str(tmp_path / "run" / "ckpt.pt"), "--labels", "0,1", "--num-samples", "2",
               "--routing-map", str(tmp_path / "m.png"), "--out", str(tmp_path / "g.png"))
    assert drawn == [((2, 16, 16, 3), (4, 2, 4)), ((2, 16, 16, 3), (4, 2, 4))]  # (T, N, L)
    assert decoded == [(2, 4, 2, 2)] * 2                              # the samples, the batch
    assert np.load(tmp_path / "g.latents.npy").shape == (2, 4, 2, 2)


@pytest.mark.parametrize("labels,message", [
    (np.array([0, 1, 2, 99999, 4, 5]), "labels must be in 0..999"),
    (np.arange(5), "5 labels for 6 examples"),
    (np.arange(6.0), "labels must be integers")])
def test_latent_labels_are_checked_against_the_class_count(tmp_path, labels, message):
    make_folder_dataset(tmp_path / "imgs")
    extract_latents.extract_latents(tmp_path / "imgs", tmp_path / "lat", 16, stand_in_vae, "cpu",
                                    4, 0)
    np.save(tmp_path / "lat" / "labels.npy", labels)
    with pytest.raises(runs.UserError, match=message):
        data.load_latents(tmp_path / "lat", 1000)


def test_shapes_are_deterministic_and_class_coloured():
    a, b = data.make_shapes(n=100, seed=0), data.make_shapes(n=100, seed=0)
    assert np.array_equal(a.x, b.x) and a.x.shape == (100, 3, 32, 32) and a.num_classes == 10
    red = a.x[a.y == 0].reshape(-1, 3, 32 * 32).max(-1).mean(0)          # class 0: a red disc
    assert red[0] > 150 > red[1] and red[2] < 150


# --------------------------------------------------------------------------------------------------
# sample.py

@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    run_train(out, "--sample-every", "0", "--lr", "1e-3", steps=6)
    return str(out / "ckpt.pt")


def run_sample(ckpt, *extra):
    sample.main(["--ckpt", ckpt, "--steps", "4", "--cfg-scale", "2", "--num-samples", "8", *extra])


def test_same_seed_same_images_for_batch_size_1_and_8(ckpt, tmp_path):
    run_sample(ckpt, "--batch-size", "1", "--npz", str(tmp_path / "a.npz"), "--out", "")
    run_sample(ckpt, "--batch-size", "8", "--npz", str(tmp_path / "b.npz"), "--out", "")
    a, b = np.load(tmp_path / "a.npz")["arr_0"], np.load(tmp_path / "b.npz")["arr_0"]
    assert a.shape == (8, 16, 16, 3) and a.dtype == np.uint8                 # ADM layout
    assert np.abs(a.astype(int) - b).max() <= 1                    # float noise may flip a rounding
    run_sample(ckpt, "--batch-size", "8", "--seed", "1", "--npz", str(tmp_path / "c.npz"),
               "--out", "")
    assert not np.array_equal(np.load(tmp_path / "c.npz")["arr_0"], a)


def test_torchrun_splits_npz_generation_into_the_same_file(ckpt, tmp_path):
    run_sample(ckpt, "--batch-size", "2", "--npz", str(tmp_path / "one.npz"), "--out", "")
    res = torchrun(["sample.py", "--ckpt", ckpt, "--steps", "4", "--cfg-scale", "2",
                    "--num-samples", "8", "--batch-size", "2", "--npz", str(tmp_path / "two.npz"),
                    "--out", ""], {}, 120)
    assert res.returncode == 0, res.stderr[-2000:]
    # rank 0 took batches 0 and 2
    assert "batch 2/2 (process 0 of 2): samples 4..5 of 8" in res.stdout
    one, two = np.load(tmp_path / "one.npz")["arr_0"], np.load(tmp_path / "two.npz")["arr_0"]
    assert two.shape == one.shape and np.abs(one.astype(int) - two).max() <= 1


def interrupt_after_two_batches(monkeypatch, ckpt, npz, *extra):
    calls, real = [], R.Diffusion.sample
    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(R.Diffusion, "sample", flaky)
    with pytest.raises(KeyboardInterrupt):
        run_sample(ckpt, "--batch-size", "2", "--npz", str(npz), "--out", "", *extra)
    calls.clear()
    return calls


def test_interrupted_npz_generation_resumes_to_the_same_file(ckpt, tmp_path, monkeypatch):
    run_sample(ckpt, "--batch-size", "2", "--npz", str(tmp_path / "full.npz"), "--out", "")
    calls = interrupt_after_two_batches(monkeypatch, ckpt, tmp_path / "res.npz")
    on_disk = sorted(p.name for p in (tmp_path / "res.npz.parts").iterdir())
    assert on_disk == ["00000000.npy", "00000002.npy", "meta.json"]
    run_sample(ckpt, "--batch-size", "2", "--npz", str(tmp_path / "res.npz"), "--out", "")
    assert len(calls) == 2 and not (tmp_path / "res.npz.parts").exists()  # only the missing batches
    assert np.array_equal(np.load(tmp_path / "res.npz")["arr_0"],
                          np.load(tmp_path / "full.npz")["arr_0"])


def test_npz_resume_refuses_other_weights_at_the_same_path_or_labels(
        ckpt, tmp_path, monkeypatch, capsys):
    copy = tmp_path / "ckpt.pt"
    copy.write_bytes(Path(ckpt).read_bytes())
    interrupt_after_two_batches(monkeypatch, str(copy), tmp_path / "s.npz", "--labels", "1,2")
    argv = ["--ckpt", str(copy), "--steps", "4", "--cfg-scale", "2", "--num-samples", "8",
            "--batch-size", "2", "--npz", str(tmp_path / "s.npz"), "--out", ""]
    expect_error(capsys, sample.main, argv + ["--labels", "1,3"],
                 "interrupted run of another model, labels")
    state = torch.load(copy, weights_only=True)
    state["ema"]["final_layer.linear.bias"] += 1                          # another model, same path
    torch.save(state, copy)
    expect_error(capsys, sample.main, argv + ["--labels", "1,2"],
                 "interrupted run of another model, labels")


def test_experts_by_timestep_json_and_chart(ckpt, tmp_path, capsys):
    run_sample(ckpt, "--experts-by-timestep", str(tmp_path / "r.json"),
               "--out", str(tmp_path / "g.png"), "--labels", "0,9")
    stats = json.loads((tmp_path / "r.json").read_text())
    assert stats["timesteps"] == [999, 666, 333, 0] and len(stats["per_layer"]) == 6
    assert all(v > 0 for v in stats["mean"]) and all(len(v) == 4 for v in stats["per_layer"])
    assert Image.open(tmp_path / "r.png").size == (720, 420)
    assert Image.open(tmp_path / "g.png").size == (8 * 50 + 2, 50 + 2)
    out = capsys.readouterr().out
    assert f"mean experts per token (select by threshold): {stats['overall']:.3f}" in out


def test_topk_routing_uses_exactly_k_experts_per_token(ckpt, tmp_path):
    """Without guidance: under it the race also spends pairs on the unconditional twins, which the
    statistics leave out."""
    run_sample(ckpt, "--select-by", "topk", "--cfg-scale", "1",
               "--experts-by-timestep", str(tmp_path / "r.json"), "--out", "")
    assert json.loads((tmp_path / "r.json").read_text())["mean"] == [pytest.approx(2.0)] * 4


def test_routing_map_pictures_the_samples_and_a_training_batch(ckpt, tmp_path, monkeypatch):
    drawn, draw = [], sample.routing_map
    def record(images, maps, labels, timesteps, path, title):
        drawn.append((images, maps, labels, timesteps))
        draw(images, maps, labels, timesteps, path, title)
    monkeypatch.setattr(sample, "routing_map", record)
    # Batch top-K without guidance: one race over the 8 images picks exactly k = 2 experts per
    # token on average, at every sampling step and on the training batch alike.
    run_sample(ckpt, "--labels", "0,9", "--select-by", "topk", "--cfg-scale", "1",
               "--routing-map", str(tmp_path / "m.png"), "--out", "")
    (images, maps, labels, ts), (train_images, train_maps, train_labels, train_ts) = drawn
    assert ts == train_ts == [999, 666, 333, 0] and images.shape == (8, 16, 16, 3)
    assert maps.shape == train_maps.shape == (4, 8, 4)                # (T, N, L): XS/8 on 16 px
    assert maps.mean((1, 2)) == pytest.approx([2.0] * 4)
    assert train_maps.mean((1, 2)) == pytest.approx([2.0] * 4)
    assert labels.tolist() == [0, 9] * 4
    first = data.load_data("shapes", image_size=16).y[:8]                 # the training split's
    assert train_labels.tolist() == first.tolist() and train_images.shape == (8, 16, 16, 3)
    # per class a row of overlays and a row of means; a column for the image and each timestep
    rows = lambda labels: 2 * len(set(labels.tolist()))
    assert Image.open(tmp_path / "m.png").size == (100 + 5 * 68, 34 + rows(labels) * 68 + 50)
    assert Image.open(tmp_path / "m_train.png").size == (100 + 5 * 68,
                                                         34 + rows(first) * 68 + 50)


@pytest.mark.parametrize("content", [b"garbage", None])
def test_foreign_or_corrupted_checkpoint_is_refused(tmp_path, capsys, ckpt, content):
    path = tmp_path / "bad.pt"
    if content is None:
        torch.save({"state_dict": {}}, path)                       # a foreign (readable) checkpoint
    else:
        path.write_bytes(Path(ckpt).read_bytes()[:1000])                   # truncated
    message = "not a race-dit checkpoint" if content is None else "not a readable checkpoint"
    expect_error(capsys, sample.main, ["--ckpt", str(path)], message)


def test_a_checkpoint_with_missing_keys_is_refused_in_one_line(tmp_path, capsys, ckpt):
    state = torch.load(ckpt, weights_only=True)
    del state["ema"], state["rng"]
    torch.save(state, tmp_path / "ckpt.pt")
    expect_error(capsys, sample.main, ["--ckpt", str(tmp_path / "ckpt.pt")],
                 "incomplete: it has no ema, rng")
    argv = [*FAST, "--out", str(tmp_path), "--resume"]
    expect_error(capsys, train.main, argv, "incomplete: it has no ema, rng")


def test_a_checkpoint_of_the_earlier_format_is_named_as_such(tmp_path, capsys, ckpt):
    state = torch.load(ckpt, weights_only=True)
    torch.save({**state, "format": "race-dit-checkpoint-v1"}, tmp_path / "old.pt")
    expect_error(capsys, sample.main, ["--ckpt", str(tmp_path / "old.pt")], "earlier race-dit")


def test_a_flag_is_never_taken_for_a_prefix_of_another(ckpt, capsys, tmp_path):
    """--routing, an old flag's name, is a prefix of --routing-map; it must fail, not write a file
    named topk."""
    expect_error(capsys, sample.main, ["--ckpt", ckpt, "--routing", "topk"],
                 "unrecognized arguments")
    argv = [*FAST, "--steps", "1", "--out", str(tmp_path), "--expert", "2in8"]
    expect_error(capsys, train.main, argv, "unrecognized arguments")


def test_precision_fp32_is_the_cpu_default_and_bf16_samples_close_to_it(ckpt, tmp_path):
    for name, flags in (("auto", []), ("fp32", ["--precision", "fp32"]),
                        ("bf16", ["--precision", "bf16"])):
        run_sample(ckpt, "--npz", str(tmp_path / f"{name}.npz"), "--out", "", *flags)
    auto, fp32, bf16 = (np.load(tmp_path / f"{n}.npz")["arr_0"].astype(int)
                        for n in ("auto", "fp32", "bf16"))
    assert np.array_equal(auto, fp32) and not np.array_equal(fp32, bf16)
    assert np.abs(fp32 - bf16).mean() < 8                                 # of 255 levels


@pytest.mark.parametrize("flags,message", [
    (["--labels", "3,x"], "--labels must be comma-separated classes"),
    (["--labels", "10"], "in 0..9"),
    (["--labels", "²"], "--labels must be"), (["--steps", "0"], "--steps"),
    (["--num-samples", "0"], "argument --num-samples: must be positive"),
    (["--cfg-scale", "nan"], "--cfg-scale"),
    (["--out", "/nonexistent/dir/g.png"], "does not exist"),
    (["--npz", "/proc/s.npz"], "not writable")])
def test_sample_rejects_bad_flags_before_sampling(ckpt, capsys, flags, message):
    expect_error(capsys, sample.main, ["--ckpt", ckpt, "--out", "", *flags], message)


def test_a_reference_dit_state_dict_samples(ckpt, tmp_path, capsys):
    """A bare DiT state_dict (as DiT-XL-2-256x256.pt) with --model: learned sigma, 4 latent
    channels."""
    import race_dit as R
    model = R.RaceDiT(R.make_config("XS/2", input_size=8, in_channels=4, num_classes=7,
                                    learn_sigma=True))
    torch.save(model.state_dict(), tmp_path / "dit.pt")
    sample.main(["--ckpt", str(tmp_path / "dit.pt"), "--model", "XS/2", "--steps", "3",
                 "--labels", "0,6", "--out", str(tmp_path / "g.png")])
    assert np.load(tmp_path / "g.latents.npy").shape == (2, 4, 8, 8)
    expect_error(capsys, sample.main, ["--ckpt", str(tmp_path / "dit.pt")], "pass its size")


# --------------------------------------------------------------------------------------------------
# evaluate.py

def brute_force_kid(a, b):
    """The unbiased MMD^2 written out pair by pair."""
    k = lambda u, v: (float(u @ v) / len(u) + 1) ** 3
    m, n = len(a), len(b)
    within = lambda s: sum(k(s[i], s[j]) for i in range(len(s)) for j in range(len(s)) if i != j)
    cross = sum(k(u, v) for u in a for v in b)
    return within(a) / (m * (m - 1)) + within(b) / (n * (n - 1)) - 2 * cross / (m * n)


def test_kid_is_the_unbiased_mmd_zero_for_one_distribution_and_exact_for_a_shift():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((6, 3)), rng.standard_normal((5, 3)) + 0.5
    assert evaluator.kid(a, b) == pytest.approx(brute_force_kid(a, b))
    # Unbiased: over many small samples of one distribution the mean is 0 (a V-statistic is not).
    same = [evaluator.kid(rng.standard_normal((10, 4)), rng.standard_normal((10, 4)))
            for _ in range(400)]
    assert abs(np.mean(same)) < 3 * np.std(same) / math.sqrt(400)
    # 1-d, N(0, 1) against N(1, 1) under (xy + 1)^3: E k(x, x') = 4, E k(y, y') = 32, E k(x, y) = 7.
    x, y = rng.standard_normal((3000, 1)), rng.standard_normal((3000, 1)) + 1
    assert evaluator.kid(x, y) == pytest.approx(4 + 32 - 2 * 7, rel=0.1)


def separable(n, seed):
    """Fashion-MNIST-shaped images whose class is their brightness: perfectly separable."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 10
    return (y[:, None, None] * 25 + rng.integers(0, 5, (n, 28, 28))).astype(np.uint8), y


def test_evaluator_scores_held_out_real_images_as_perfect(tmp_path):
    for split, seed in (("train", 0), ("t10k", 1)):
        write_idx(tmp_path, split, *separable(400, seed))
    ev = evaluator.Evaluator("fashion-mnist", tmp_path, epochs=25, log=lambda *a: None)
    assert ev.test_accuracy == 1.0 and list(tmp_path.glob("evaluator-*.pt"))
    held, y = separable(200, 2)
    scores = ev.score(np.repeat(held[..., None], 3, axis=3), y)    # as sample.py writes grey images
    assert scores["accuracy"] == 1.0 and scores["n"] == 200
    wrong = ev.score(np.repeat(held[..., None], 3, axis=3), (y + 1) % 10)
    assert wrong["accuracy"] == 0.0
    cached = evaluator.Evaluator("fashion-mnist", tmp_path)                # loaded, not retrained
    assert cached.score(np.repeat(held[..., None], 3, axis=3), y) == scores


def test_evaluate_command_writes_json(ckpt, tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate, "Evaluator", lambda *a, **k: type("E", (), dict(
        score=lambda self, images, labels: dict(accuracy=0.5, kid=1.0, n=len(labels))))())
    evaluate.main(["--ckpt", ckpt, "--per-class", "1", "--steps", "2",
                   "--json", str(tmp_path / "e.json")])
    scores = json.loads((tmp_path / "e.json").read_text())
    assert scores["n"] == 10 and scores["step"] == 6 and scores["steps"] == 2


# --------------------------------------------------------------------------------------------------
# benchmarks

def test_bench_script_reports_ratios_and_writes_only_where_asked(tmp_path, capsys, monkeypatch):
    from benchmarks import bench
    monkeypatch.chdir(tmp_path)
    bench.main(["--models", "XS/8:dense,XS/8:race:2in8", "--rounds", "1", "--warmup", "0",
                "--image-size", "16", "--batch-size", "2", "--json", str(tmp_path / "b.json")])
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert [r["model"] for r in rows] == ["XS/8:dense", "XS/8:race:2in8"]
    assert rows[1]["train_ratio"] == pytest.approx(rows[1]["train_ms"] / rows[0]["train_ms"])
    assert rows[1]["activated"] < rows[1]["params"] and rows[1]["train_ms"] > 0
    assert "XS/8:race:2in8" in capsys.readouterr().out
    assert os.listdir(tmp_path) == ["b.json"]


def test_reproduce_quick_runs_every_step_and_resumes(tmp_path, capsys, monkeypatch,
                                                    shapes_evaluator):
    from benchmarks import reproduce
    made, real_train = [], train.main                           # the classifier, trained once
    monkeypatch.setattr(reproduce, "Evaluator",
                        lambda *a, **k: made.append(k) or shapes_evaluator[0])
    methods = "race identity,race identity +threshold"
    argv = ["--quick", "--data-dir", str(tmp_path), "--methods", methods,
            "--out", str(tmp_path / "res"), "--runs", str(tmp_path / "runs")]
    reproduce.main(argv)
    out = capsys.readouterr().out
    assert "Table 3: threshold beats batch top-K at inference: accuracy" in out and "wrote" in out
    assert made[0]["cache_dir"] and not made[0]["cache_dir"].exists()  # the smoke run keeps none
    results = json.loads((tmp_path / "res" / "results.json").read_text())
    critical = json.loads((tmp_path / "res" / "summary.json").read_text())["critical_tokens"]
    assert set(critical) == set(methods.split(",")) and "experts per unit object fraction" in out
    assert critical["race identity"]["slopes"] == [results[f"race identity / seed {s}"][
        "experts_by_object"]["slope"] for s in (0, 1)]
    assert len(results["race identity / seed 0"]["heldout_mse_by_t"]) == 5
    table = (tmp_path / "res" / "summary.md").read_text()                  # benchmarks/README's
    assert "| race identity | 2 | " in table and "| Table 3: threshold beats batch top-K" in table
    # A rerun after an interruption: one score lost, another scored with other sampling settings,
    # every checkpoint on disk. Nothing is retrained; both are scored again from their checkpoints.
    lost = results.pop("race identity +threshold / seed 1")
    results["race identity / seed 1"]["sample_steps"] = 50
    results["race identity +threshold / seed 0"]["n"] = 1000                 # 100 per class
    (tmp_path / "res" / "results.json").write_text(json.dumps(results))
    trained = []
    monkeypatch.setattr(reproduce.train, "main", trained.append)
    reproduce.main(argv)
    again = json.loads((tmp_path / "res" / "results.json").read_text())
    assert trained == [] and again["race identity +threshold / seed 1"]["steps"] == lost["steps"]
    assert again["race identity / seed 1"]["sample_steps"] == 3                # --quick's
    assert again["race identity +threshold / seed 0"]["n"] == 20                # 2 per class
    assert again["race identity / seed 0"] == results["race identity / seed 0"]
    assert again["race identity / seed 0"]["recipe"]["schedule"] == "cosine"
    # A run of another recipe (here: the checkpoints of seed 1 made with DiT's schedule) is neither
    # kept nor resumed: it is trained anew.
    path = tmp_path / "runs" / "race_identity_seed1" / "ckpt.pt"
    ckpt = runs.load_checkpoint(path)                      # memory-mapped: replaced, not rewritten
    runs.save_checkpoint(path, {**ckpt, "args": {**ckpt["args"], "schedule": "linear"}})
    again["race identity / seed 1"]["recipe"]["schedule"] = "linear"
    (tmp_path / "res" / "results.json").write_text(json.dumps(again))
    monkeypatch.setattr(reproduce.train, "main", lambda a: trained.append(a) or real_train(a))
    reproduce.main(argv)
    assert [a[a.index("--out") + 1] for a in trained] == [str(tmp_path / "runs" /
                                                             "race_identity_seed1")]


def test_recipe_quick_pairs_each_lever_with_its_reference_and_resumes(tmp_path, capsys,
                                                                     monkeypatch, shapes_evaluator):
    from benchmarks import recipe
    monkeypatch.setattr(recipe, "Evaluator", lambda *a, **k: shapes_evaluator[0])
    monkeypatch.setattr(recipe, "SAMPLERS", {name: (method, 3, *rest) for name, (method, _, *rest)
                                             in list(recipe.SAMPLERS.items())[:2]})  # 3 steps
    argv = ["--quick", "--arms", "linear,cosine", "--sampler-arm", "cosine",
            "--out", str(tmp_path / "res"), "--runs", str(tmp_path / "runs")]
    recipe.main(argv)
    out = capsys.readouterr().out
    results = json.loads((tmp_path / "res" / "results.json").read_text())
    g2, g3 = recipe.SAMPLERS
    assert set(results) == {f"{arm} / {s} / seed {i}" for i in (0, 1)
                            for arm, s in [("linear", g2), ("cosine", g2), ("cosine", g3)]}
    assert results[f"cosine / {g2} / seed 1"]["recipe"]["schedule"] == "cosine"
    assert results[f"linear / {g2} / seed 1"]["recipe"]["seed"] == 1
    assert "| schedule: cosine instead of linear | " in out
    assert f"| sampler: {g3} instead of {g2} (on cosine) | " in out
    levers = json.loads((tmp_path / "res" / "summary.json").read_text())["levers"]
    assert len(levers) == 2 * len(recipe.METRICS)
    trained = []
    monkeypatch.setattr(recipe.train, "main", trained.append)
    recipe.main(argv)                                        # resumed: nothing trained or scored
    assert trained == [] and json.loads((tmp_path / "res" / "results.json").read_text()) == results


@pytest.mark.parametrize("script, argv, msg", [
    ("bench", ["--models", "S/2"], "expected SIZE/PATCH:ROUTING"),
    ("recipe", ["--arms", "linear,fast"], "unknown arms 'fast'"),
    ("bench", ["--models", "S/2:dense,XX/2:race"], "unknown model 'XX/2'"),
    ("bench", ["--memory", "--models", "S/2:race:9in8"],
     "top-k must be between 1 and the number of experts"),
    ("bench", ["--rounds", "0"], "must be positive"),
    ("reproduce", ["--methods", "dense,nonsense"], "unknown --methods 'nonsense'"),
    ("reproduce", ["--seeds", "1"], "--seeds at least 2")])
def test_benchmarks_refuse_bad_input_in_one_line(script, argv, msg, capsys):
    from benchmarks import bench, recipe, reproduce
    with pytest.raises(SystemExit) as e:
        {"bench": bench, "recipe": recipe, "reproduce": reproduce}[script].main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(f"{script}.py: error:") and msg in err
    assert err.count("\n") == 1, err                                    # no usage block before it


def test_live_bytes_counts_what_is_alive_and_its_peak():
    from benchmarks.bench import LiveBytes
    with LiveBytes() as live:
        a, b = torch.empty(1000), torch.empty(2000, dtype=torch.float64)     # 4000 + 16000 bytes
        view = b[:10].view(2, 5)                                             # no new storage
        del a
        c = torch.ones(250)                                                  # 1000 bytes
        assert (live.now, live.peak) == (17000, 20000)
        del b
        assert live.now == 17000                                             # the view keeps b
        del view, c
        assert live.now == 0


def test_bench_memory_on_fake_tensors_equals_the_count_on_real_tensors():
    """FakeTensors allocate nothing: their count must be the real step's, byte for byte, but for
    one CPU kernel: the CPU mse_loss's mean keeps the batch-sized buffer as its storage."""
    from benchmarks import bench
    args = argparse.Namespace(image_size=16, channels=4, num_classes=1000)
    mse_buffer = 4 * 4 * 16 * 16 * 4                                     # (B, C, H, W) fp32
    fake = bench.step_memory("XS/8:race:2in8", args, 4, True)
    real = bench.step_memory("XS/8:race:2in8", args, 4, True, fake=False)
    assert fake[0] == real[0] and real[1] - fake[1] in (0, mse_buffer - 4)
    state, peak = fake
    params = sum(p.numel() for p in bench.build("XS/8:race:2in8", args, "meta",
                                                learn_sigma=True).parameters())
    assert 20 * params <= state < 20 * params + 2**20    # weights, gradients, AdamW, the EMA
    assert peak > state
    [row] = bench.memory(["XS/8:race:2in8"], args, gpus=(0.001,), batches=(256,), limit=1)
    assert row["peak_gib"]["256_recompute"] < row["peak_gib"]["256"]      # activations dominate
    assert row["largest_micro_batch"] == {"0.001GiB": 0, "0.001GiB_recompute": 0}  # none fits


def test_paired_statistics_against_hand_computed_cases():
    from benchmarks.reproduce import holm, paired_test, t_cdf, t_quantile
    for p, df, table in ((0.975, 1, 12.706), (0.975, 2, 4.303), (0.975, 7, 2.365), (0.8, 7, 0.896)):
        assert t_quantile(p, df) == pytest.approx(table, abs=1e-3)       # printed t tables
    test = paired_test([1.0, 2.0, 3.0])                                   # mean 2, sd 1, n 3
    t = 2 / (1 / math.sqrt(3))
    assert test["t"] == pytest.approx(t) and test["df"] == 2
    assert test["p"] == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=1e-6)  # t(2)'s closed form
    half = 4.3027 / math.sqrt(3)                                          # t(2) 0.975 x se
    assert test["ci"] == pytest.approx((2 - half, 2 + half), abs=1e-3)
    assert t_cdf(1e5, 2) == pytest.approx(1 - 0.5e-10, abs=1e-12)      # closed form at df 2
    assert t_cdf(-2.0, 1) == pytest.approx(0.5 - math.atan(2.0) / math.pi)   # Cauchy at df 1
    assert t_cdf(0.0, 3) == 0.5
    levels, rejected = holm([0.01, 0.04, 0.03, 0.005])
    assert levels == pytest.approx([0.05 / 3, 0.05, 0.05 / 2, 0.05 / 4])
    assert rejected == [True, False, False, True]                        # 0.03 > 0.025 stops it


def test_a_claim_pairs_the_seeds_both_methods_have():
    from benchmarks import reproduce
    scores = {"race full recipe (+RSL)": [0.5, 0.6, 0.7, 0.8], "race 1in4": [0.4, 0.4]}
    results = {f"{n} / seed {s}": dict(accuracy=v, logp=0.0, kid=0.0, heldout_mse=0.0)
               for n, vs in scores.items() for s, v in enumerate(vs)}
    results["race 1in4 / seed 3"] = results["race 1in4 / seed 0"]      # seed 2 missing: not used
    assert reproduce.seeds_of(results, "race 1in4") == 2
    table, claims = reproduce.verdicts(results, list(scores))
    assert table["race full recipe (+RSL)"]["seeds"] == 4 and table["race 1in4"]["seeds"] == 2
    assert table["race full recipe (+RSL)"]["accuracy"][0] == pytest.approx(0.65)
    (claim,) = claims                                                     # Table 5: 2in8 > 1in4
    assert claim["accuracy"]["df"] == 1 and claim["accuracy"]["mean"] == pytest.approx(0.15)


def test_the_critical_token_slope_holds_position_and_timestep_fixed():
    from benchmarks.reproduce import within_cell_slope
    rng = np.random.default_rng(0)
    images, positions = 400, 16
    cells = np.broadcast_to(np.arange(positions), (images, positions))
    centre = np.exp(-((np.arange(positions) - 7.5) / 4) ** 2)            # objects sit in the middle
    fraction = (centre * rng.uniform(0, 1, (images, positions))).clip(0, 1)
    by_position = 1 + 2 * centre + 0.1 * rng.standard_normal((images, positions))
    only_position = within_cell_slope(by_position, fraction, cells)       # experts follow position
    assert only_position["raw_slope"] > 1 and only_position["ci"][0] < 0 < only_position["ci"][1]
    real = within_cell_slope(by_position + 0.5 * fraction, fraction, cells)
    assert real["slope"] == pytest.approx(0.5, abs=0.1) and real["ci"][0] > 0.3


def test_token_choice_gives_every_patch_the_same_experts():
    from benchmarks.reproduce import experts_by_object
    cfg = R.make_config("S/2", "2in8", routing="token", input_size=8, in_channels=3, depth=2,
                        hidden_size=32, num_heads=4, num_classes=10)
    model = randomize_zero_init(R.RaceDiT(cfg)).eval()
    result = experts_by_object(model, data.make_shapes(n=20, size=8), timesteps=(10, 500), n=20)
    assert result["slope"] == 0 and result["raw_slope"] == pytest.approx(0, abs=1e-9)


GPU_CHECK_STAGES = {"device", "torch", "seconds", "grouped_vs_loop", "grouped_mm_chosen",
                    "sync_free_step", "loss_first_last", "loss_falls", "bench",
                    "largest_xl2_4in32_batch", "largest_xl2_4in32_batch_recompute",
                    "largest_xl2_4in32_peak_gib", "largest_xl2_4in32_peak_gib_recompute",
                    "memory_counted"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what happens without CUDA")
def test_gpu_check_writes_every_stage_keeps_them_on_a_crash_and_needs_cuda_for_full_sizes(
        tmp_path, capsys, monkeypatch):
    from benchmarks import gpu_check
    expect_error(capsys, gpu_check.main, ["--json", str(tmp_path / "full.json")], "no CUDA device")
    assert not (tmp_path / "full.json").exists()
    result = gpu_check.main(["--tiny", "--json", str(tmp_path / "g.json")])
    assert set(result) == set(json.loads((tmp_path / "g.json").read_text())) == GPU_CHECK_STAGES
    assert result["grouped_vs_loop"]["ok"] and len(result["bench"]) == 3

    def crash(*a, **k):
        raise RuntimeError("a crash in the sync stage")
    monkeypatch.setattr(gpu_check, "Run", crash)
    with pytest.raises(RuntimeError, match="sync stage"):
        gpu_check.main(["--tiny", "--json", str(tmp_path / "crash.json")])
    kept = json.loads((tmp_path / "crash.json").read_text())
    assert "grouped_mm_chosen" in kept and "sync_free_step" not in kept


class NaNGrad(torch.autograd.Function):
    """Identity forward; backward writes NaN into one element of the gradient."""

    @staticmethod
    def forward(ctx, t):
        return t.view_as(t)

    @staticmethod
    def backward(ctx, g):
        return g.clone().index_fill_(0, torch.tensor([0]), float("nan"))


@pytest.mark.parametrize("broken", ["output", "input gradient", "weight gradient"])
def test_gpu_checks_grouped_stage_fails_on_a_nan_in_any_of_its_tensors(broken):
    from benchmarks import gpu_check
    cpu = torch.device("cpu")
    assert gpu_check.grouped_equals_loop(cpu, torch.float32)["ok"]          # the real kernel passes

    def nan_in(x, w, ends, grouped):
        if grouped and broken == "input gradient":
            x = NaNGrad.apply(x)
        if grouped and broken == "weight gradient":
            w = NaNGrad.apply(w)
        y = R.grouped_matmul(x, w, ends, grouped=grouped)
        return y.index_fill(0, torch.tensor([5]), float("nan")) if grouped and broken == "output" \
            else y
    result = gpu_check.grouped_equals_loop(cpu, torch.float32, nan_in)
    assert not result["ok"] and math.isnan(result["max_relative_error"])


def test_gpu_checks_grouped_stage_fails_on_an_unwritten_empty_expert_gradient():
    from benchmarks import gpu_check

    class Unwritten(torch.autograd.Function):  # the empty expert's weight gradient left as garbage
        @staticmethod
        def forward(ctx, w, empty):
            ctx.empty = empty
            return w.view_as(w)

        @staticmethod
        def backward(ctx, g):
            return g.clone().index_fill_(0, ctx.empty, 1e-30), None

    def unwritten(x, w, ends, grouped):
        empty = (torch.diff(ends, prepend=ends.new_zeros(1)) == 0).nonzero().flatten()
        return R.grouped_matmul(x, Unwritten.apply(w, empty) if grouped else w, ends,
                                grouped=grouped)
    result = gpu_check.grouped_equals_loop(torch.device("cpu"), torch.float32, unwritten)
    assert not result["ok"] and result["max_relative_error"] < 1e-5     # only the zero check fails
    assert result["empty_expert_grad_zero"] == dict(first=False, middle=False, last=False)


def test_gpu_check_largest_batch_stops_at_either_form_of_out_of_memory(tmp_path, monkeypatch):
    from benchmarks import gpu_check
    cpu = torch.device("cpu")
    errors = [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
              RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling "
                           "`cublasCreate(handle)`")]
    for error in [*errors, RuntimeError("mat1 and mat2 shapes cannot be multiplied")]:
        class Run:  # a stand-in that runs out of memory from batch 32 on
            def __init__(self, name, experts, batch, *rest):
                self.batch, self.model = batch, argparse.Namespace()
                self.opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1)

            def train_step(self, error=error):
                if self.batch >= 32:
                    raise error
        monkeypatch.setattr(gpu_check, "Run", Run)
        freed = []
        record = lambda run=None, freed=freed: freed.append(run)
        monkeypatch.setattr(gpu_check, "free_memory", record)
        if error in errors:
            assert gpu_check.largest_batch("XS/8", "2in8", 8, cpu, tmp_path, False, 4096) == (
                16, {})                                                   # peaks: CUDA only
            assert len(freed) == 6                                        # after each of 3 tries
        else:
            with pytest.raises(RuntimeError, match="shapes"):               # not memory: reported
                gpu_check.largest_batch("XS/8", "2in8", 8, cpu, tmp_path, False, 4096)


def test_a_torch_without_the_floors_api_fails_at_import_naming_the_floor():
    """F.grouped_mm is public from torch 2.10 (private before): on a torch without it,
    importing the model fails at once with the floor that requirements.txt and CI install."""
    floor = re.search(r"torch>=([0-9.]+)", (ROOT / "requirements.txt").read_text()).group(1)
    assert re.search(r"torch>=([0-9.]+)", (ROOT / ".ci" / "run").read_text()).group(1) == floor
    code = "import torch.nn.functional as F; del F.grouped_mm; import race_dit"
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    last = res.stderr.strip().splitlines()[-1]
    assert res.returncode == 1 and last.startswith("ImportError: race_dit needs torch >= " + floor)


def test_soak_reports_flat_memory_and_no_ema_graph(capsys):
    from benchmarks import soak
    rows, slopes = soak.main(["--steps", "6", "--every", "2"])
    assert [r["step"] for r in rows] == [2, 4, 6] and all(r["ema_nodes"] == 0 for r in rows)
    assert slopes["ema_nodes_per_step"] == 0 and "slopes after step 2" in capsys.readouterr().out


def test_samples_per_class_do_not_depend_on_the_batch_size():
    from support.evaluator import samples_per_class
    model = randomize_zero_init(R.RaceDiT(tiny("race", "2in8"))).eval()
    one, labels = samples_per_class(model, 3, 4, batch_size=12, cfg_scale=2.0)
    split, same = samples_per_class(model, 3, 4, batch_size=5, cfg_scale=2.0)
    assert list(labels) == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3] and (same == labels).all()
    assert one.dtype == np.uint8 and one.shape == (12, 8, 8, 3)
    # threshold selection: a sample's experts, hence its image, do not depend on its batch
    np.testing.assert_array_equal(one, split)
