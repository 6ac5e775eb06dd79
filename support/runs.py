"""
What keeps a run's files safe and its failures short, for every script: errors that end a script as
one line on stderr, the argument parser, atomic writes, the run-folder lock, the checkpoint file
(its size, what a resume must match) and the model it holds, the precision of --precision, and
peak memory (train.py, sample.py, the benchmarks).
"""
import argparse
import contextlib
import dataclasses
import errno
import fcntl
import json
import math
import os
import re
import resource
import sys
import tempfile
from pathlib import Path

import torch

import race_dit as R

CKPT_FORMAT = "race-dit-checkpoint-v2"  # v2: granularity, scorer, recompute
CKPT_KEYS = ("model", "ema", "opt", "step", "config", "args", "rng")


class UserError(Exception):
    """Bad input: reported as one line on stderr and exit status 2."""


class Diverged(Exception):
    """A non-finite loss or weight: one line on stderr and exit status 3."""


class WriteFailed(Exception):
    """A write the operating system refused (any OSError in atomic_write): one line, exit 2."""


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line on stderr (exit 2), like every other error here, and which
    takes no abbreviations: a flag's old name must fail, not match a new one by its prefix."""

    def __init__(self, **kw):
        kw.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(allow_abbrev=False, **kw)

    def error(self, message):
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def checked(kind, ok, message):
    """An argparse type: kind(text), refused unless ok(value); argparse names the flag, so a bad
    value is one line before any work, e.g. "argument --steps: must be positive"."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {kind.__name__} value: {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(message)
        return value
    return parse


POSITIVE = checked(int, lambda v: v > 0, "must be positive")
AT_LEAST_ZERO = checked(int, lambda v: v >= 0, "must be zero or positive")
POSITIVE_NUMBER = checked(float, lambda v: math.isfinite(v) and v > 0, "must be a positive number")
WEIGHT = checked(float, lambda v: math.isfinite(v) and v >= 0, "must be a number >= 0")
DECAY = checked(float, lambda v: 0 <= v < 1, "must be in [0, 1)")
STEPS = checked(int, lambda v: 1 <= v <= 1000, "must be in 1..1000")
SEED = checked(int, lambda v: 0 <= v < 2**31, "must be in 0..2147483647")


def require(ok, message):
    if not ok:
        raise UserError(message)


WRITE_FAILURES = {
    errno.ENOSPC: "no space left on device; free some space and rerun",
    errno.EDQUOT: "disk quota exceeded; free some space and rerun",
    errno.EFBIG: "a file is larger than the file system or the file-size limit (ulimit -f) allows; "
                 "write to another file system or raise the limit"}


def os_error_in(e):
    """The OSError that e is, or was raised from or while handling (torch.save reports one as a
    RuntimeError of its zip writer raised while handling it); None if there is none."""
    while e is not None and not isinstance(e, OSError):
        e = e.__cause__ or e.__context__
    return e


def write_failure(e):
    """What the disk refused, if e is, or came from, a write that failed for space or size (None
    otherwise): the failures of any write, atomic_write's or an append."""
    e = os_error_in(e)
    return WRITE_FAILURES.get(e.errno) if e is not None else None


def run_main(prog, fn, lock=None):
    """Run fn(), within the context `lock` if given; a UserError, Diverged, WriteFailed or a write
    the disk refused becomes one line on stderr and a non-zero exit."""
    try:
        with lock or contextlib.nullcontext():
            return fn()
    except (UserError, Diverged, WriteFailed) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(3 if isinstance(e, Diverged) else 2)
    except Exception as e:
        failure = write_failure(e)
        if failure is None:
            raise
        print(f"{prog}: error: {failure}: files written before are intact", file=sys.stderr)
        sys.exit(2)


def atomic_write(path, write):
    """write(tmp_path), then rename over path: an interrupted or failed write (kill, full disk)
    leaves the old file intact and no temporary file behind. Every file the project writes goes
    through here."""
    path = Path(path)
    # suffix kept: np.save adds one
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except Exception as e:
        error = os_error_in(e)
        if error is None:
            raise
        why = WRITE_FAILURES.get(error.errno) or error.strerror or str(error)
        raise WriteFailed(f"writing {path} failed: {why}; files written before are intact") from e
    finally:
        tmp.unlink(missing_ok=True)


def writable_folder(path, what):
    """Fail before any work when an output's folder is missing or read-only."""
    folder = Path(path).resolve().parent
    if not folder.is_dir():
        raise UserError(f"{what}: the folder {folder} does not exist; "
                        "create it or choose another path")
    try:  # a real write: permission bits alone do not tell for root or a read-only file system
        tempfile.TemporaryFile(dir=folder).close()
    except OSError:
        raise UserError(f"{what}: the folder {folder} is not writable; "
                        "choose another path") from None


@contextlib.contextmanager
def locked(folder):
    """An exclusive lock on a run folder while the block runs. A second run on the same folder fails
    at once; the kernel drops the lock of a killed process, so no stale lock can block."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / "LOCK", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UserError(f"{folder} is in use by another running process; "
                        "wait for it or choose another --out") from None
    try:
        yield
    finally:
        os.close(fd)


def save_checkpoint(path, state):
    """Atomically, through a Python file object, so that a full disk surfaces as its OSError."""
    def write(tmp):
        with open(tmp, "wb") as f:
            torch.save({"format": CKPT_FORMAT, **state}, f)
    atomic_write(path, write)


def load_checkpoint(path):
    """A train.py checkpoint, memory-mapped (only what is read is loaded), with every key
    checked."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except FileNotFoundError:
        raise UserError(f"no checkpoint at {path}") from None
    except Exception as e:
        raise UserError(f"{path} is not a readable checkpoint "
                        f"({type(e).__name__}: {str(e)[:120]})") from None
    if isinstance(ckpt, dict) and ckpt.get("format") == "race-dit-checkpoint-v1":
        raise UserError(f"{path} was written by an earlier race-dit (checkpoint format v1, before "
                        "the renames split -> granularity and gate -> scorer); train it anew")
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise UserError(f"{path} is not a race-dit checkpoint (written by this project's train.py)")
    missing = [k for k in CKPT_KEYS if k not in ckpt]
    require(not missing, f"{path} is incomplete: it has no {', '.join(missing)}")
    return ckpt


def check_resume(ckpt, cfg, args, world):
    """What defines the run must match the checkpoint; lr, loss weights, --steps and logging may
    change."""
    saved = dataclasses.asdict(R.Config(**ckpt["config"]))  # fields it lacks: their defaults
    diff = [f"{k}={v} in the checkpoint, {getattr(cfg, k)} now" for k, v in saved.items()
            if getattr(cfg, k) != v]
    diff += [f"{k}={ckpt['args'].get(k)} in the checkpoint, {getattr(args, k)} now"
             for k in ("data", "image_size", "batch_size", "grad_accum", "seed")
             if ckpt["args"].get(k) != getattr(args, k)]
    if len(ckpt["rng"]) != world:
        diff.append(f"{len(ckpt['rng'])} processes in the checkpoint, {world} now")
    require(not diff, f"{Path(args.out) / 'ckpt.pt'} is from another configuration: "
                      f"{'; '.join(diff)}")


def restore(ckpt, model, ema, opt, rank, device):
    """An exact resume: the model, its EMA copy, AdamW and this process's RNG streams from a
    train.py checkpoint; returns its step. AdamW's host tensors (its step counts) are copied:
    load_state_dict keeps them as given, views of the mapped file."""
    model.load_state_dict(ckpt["model"])
    ema.load_state_dict(ckpt["ema"])
    opt.load_state_dict(ckpt["opt"])
    for state in opt.state.values():
        state.update({k: v.clone() for k, v in state.items() if v.device.type == "cpu"})
    rng = ckpt["rng"][rank]
    torch.set_rng_state(rng["cpu"])
    if device.type == "cuda" and rng["cuda"] is not None:
        torch.cuda.set_rng_state(rng["cuda"], device)
    return ckpt["step"]


WRITE_RATE = 50e6  # bytes/s: a slow network disk


def checkpoint_bytes(cfg):
    """The tensor bytes of this configuration's checkpoint, computed on meta: model and EMA state,
    and AdamW's two moments and step count for every trained parameter."""
    with torch.device("meta"):
        model = R.RaceDiT(cfg)
    state = sum(t.nbytes for t in model.state_dict().values())
    return 2 * state + sum(2 * p.nbytes + 4 for p in model.parameters() if p.requires_grad)


def load_model(path, online=False, size=None):
    """(model in eval mode, checkpoint) from a train.py checkpoint (the EMA weights unless online),
    or from a bare reference DiT state_dict (e.g. DiT-XL-2-256x256.pt) given its size, e.g.
    "XL/2"."""
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        sd = None  # load_checkpoint below names the problem
    if isinstance(sd, dict) and "pos_embed" in sd:
        require(size, f"{path} is a bare DiT state_dict: pass its size, e.g. --model XL/2")
        ckpt = dict(args=dict(data="latents"), step=0, ema=sd, model=sd)
        patch = int(size.split("/")[-1]) if re.fullmatch(r".*/[0-9]+", size) else 0
        config = dict(input_size=math.isqrt(sd["pos_embed"].shape[1]) * patch, learn_sigma=True,
                      in_channels=sd["x_embedder.proj.weight"].shape[1],
                      num_classes=sd["y_embedder.embedding_table.weight"].shape[0] - 1)
    else:
        ckpt = load_checkpoint(path)
    try:
        cfg = R.Config(**ckpt["config"]) if "config" in ckpt else R.make_config(size, **config)
        model = R.RaceDiT(cfg)
        model.load_state_dict(ckpt["model" if online else "ema"])
    except (TypeError, ValueError, RuntimeError) as e:
        raise UserError(f"{path} does not match this model: "
                        f"{str(e).splitlines()[0][:200]}") from None
    return model.eval(), ckpt


def use_bf16(precision, device):
    """--precision (train.py, sample.py, bench.py): bf16 autocast for bf16, and for auto on CUDA;
    fp32 otherwise (auto on a CPU: bf16 autocast is slower there for the small models a CPU
    runs)."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def autocast_for(precision, device):
    """A context factory for --precision; on CUDA, TF32 matmuls are allowed too, as in DiT."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return lambda: torch.autocast(device.type, torch.bfloat16, enabled=use_bf16(precision, device))


def keep_metrics(path, upto):
    """Keep the records of steps <= upto (the checkpoint's step): a restart redoes the others. A
    line cut by a kill mid-write is dropped too."""
    kept = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            if json.loads(line)["step"] <= upto:
                kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            pass
    atomic_write(path, lambda tmp: tmp.write_text("".join(kept)))


def peak_memory_gib(device):
    """Peak allocated CUDA memory, or the process's peak resident memory on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def count_params(model, blocks_only=False):
    """(total, activated) parameters used at inference; the training-only PLR heads are left out.
    Activated counts one token's average use: the router and k experts, not E (S2, Table 4)."""
    total = activated = 0
    for name, p in (model.blocks if blocks_only else model).named_parameters():
        if "plr_head" in name:
            continue
        total += p.numel()
        expert = name.endswith((".w1", ".w2"))
        activated += p.numel() * model.cfg.top_k // model.cfg.num_experts if expert else p.numel()
    return total, activated
