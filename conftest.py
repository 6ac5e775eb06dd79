"""Helpers shared by the test files: tiny model configurations and batches, and a tiny trained
run."""
import torch

import race_dit as R

FAST = ["--model", "XS/8", "--batch-size", "8", "--log-every", "2", "--sample-steps", "3",
        "--eval", "off", "--grid-per-class", "8"]


def tiny(routing="race", experts="2in8", **kw):
    kw = {**dict(input_size=8, in_channels=3, depth=2, hidden_size=32, num_heads=4, num_classes=4),
          **kw}
    return R.make_config("S/2", experts if routing != "dense" else None, routing=routing, **kw)


def randomize_zero_init(model, std=0.1, seed=0):
    """Fresh models output 0 (adaLN-Zero); give the zero-initialised layers weights to test
    functions."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and (p == 0).all():
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def batch(cfg, B=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
    t = torch.randint(0, 1000, (B,), generator=g)
    return x, t, torch.randint(0, cfg.num_classes, (B,), generator=g)


def run_train(out, *extra, steps=4):
    import train
    train.main([*FAST, "--steps", str(steps), "--out", str(out), *extra])
