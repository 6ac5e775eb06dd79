"""
The evaluator of samples: a small classifier trained on the same data (shapes, Fashion-MNIST,
CIFAR-10) scores class-conditional samples by the class accuracy, the mean log-probability of the
class asked for, and the KID (kernel inception distance: an unbiased MMD^2 under a cubic kernel)
between samples and the test split in the classifier's 64-d features, with its spread over disjoint
subsets. The KID is a proxy for sample quality, NOT FID: other network, other features. The
classifier is trained on images whose colours are re-drawn at random, so that it reads shapes: on
the built-in shapes it is checked to score near chance on discs in the classes' colours and near
100% on real shapes in random colours (the probes, printed when it is trained). It is trained once
per (data, image size, seed) on the training split and cached beside the data; the test split is
used only for its accuracy and the KID reference.
"""
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import race_dit as R
from support.data import load_data, make_shapes, to_uint8, to_unit
from support.runs import atomic_write, require

SUPPORTED = ("shapes", "cifar10", "fashion-mnist")
# training epochs by data set: Fashion-MNIST needs 20 to pass 90% on its test split
EPOCHS = {"shapes": 10, "cifar10": 10, "fashion-mnist": 20}


class Classifier(nn.Module):
    """Three 3x3 conv stages and a global average pool (any image size), 64 features, a linear
    head."""

    def __init__(self, channels, num_classes, width=32):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
            nn.Flatten())
        self.head = nn.Linear(64, num_classes)

    def forward(self, x):  # uint8 (B, C, H, W) -> features (B, 64), logits (B, classes)
        f = self.body(to_unit(x))
        return f, self.head(f)


def recolour(x, g):
    """uint8 RGB images (B, 3, H, W) -> float, each image's channels mixed by its own random
    non-negative 3x3 matrix (rows summing to a gain in 0.5..1.5): no colour names a class."""
    m = torch.rand(len(x), 3, 3, generator=g)
    m = m / m.sum(2, keepdim=True) * (0.5 + torch.rand(len(x), 3, 1, generator=g))
    return torch.einsum("bij,bjhw->bihw", m, x.float()).clamp(0, 255)


def kid(a, b):
    """Unbiased MMD^2 between feature sets a (m, d) and b (n, d) under the kernel (x.y / d + 1)^3
    (Binkowski et al., 2018): 0 in expectation when both come from one distribution."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    k = lambda u, v: (u @ v.T / a.shape[1] + 1) ** 3
    within = lambda kk: (kk.sum() - np.trace(kk)) / (len(kk) * (len(kk) - 1))
    return float(within(k(a, a)) + within(k(b, b)) - 2 * k(a, b).mean())


def shape_probes(net, image_size, n=1000):
    """On the built-in shapes: the accuracy on discs drawn in each class's colour (chance is 0.1:
    a classifier of shapes calls them all discs) and on real shapes in random colours."""
    accuracy = lambda ds: float((net(torch.from_numpy(ds.x))[1].argmax(1).numpy() == ds.y).mean())
    with torch.no_grad():
        colour_only = make_shapes(n, image_size, seed=2, shapes=np.zeros(n, int))
        recoloured = make_shapes(n, image_size, seed=3, random_colours=True)
        return dict(colour_only=accuracy(colour_only), recoloured=accuracy(recoloured))


class Evaluator:
    """A classifier of the data's training split (trained once, cached) and test-split features;
    score(images, labels) -> class accuracy, mean log-probability of the class asked for, KID."""

    def __init__(self, data, data_dir="data", image_size=32, seed=0, epochs=None, log=print,
                 cache_dir=None, reference=2000):
        require(data in SUPPORTED, f"the evaluator needs one of {', '.join(SUPPORTED)} "
                                   f"(a test split), not {data!r}")
        test = load_data(data, data_dir, image_size, "test")
        self.channels, size = test[0][0].shape[0], test[0][0].shape[-1]   # the data's own size
        cache = Path(cache_dir or data_dir) / f"evaluator-{data}-{size}-seed{seed}.pt"
        with torch.random.fork_rng():                                # the caller's RNG is untouched
            torch.manual_seed(seed)
            self.net = Classifier(self.channels, test.num_classes).eval()
        if cache.exists():
            saved = torch.load(cache, map_location="cpu", weights_only=True)
            self.net.load_state_dict(saved["net"])
            self.test_accuracy, self.probes = saved["test_accuracy"], saved["probes"]
            self.scale, self.ref = saved["scale"].numpy(), saved["ref"].numpy()
            return
        tick = time.time()
        train_set = load_data(data, data_dir, image_size, "train")
        x, y = torch.from_numpy(np.array(train_set.x)), torch.from_numpy(train_set.y)
        g = torch.Generator().manual_seed(seed)
        self.net.train()
        opt = torch.optim.Adam(self.net.parameters(), lr=2e-3)
        for _ in range(epochs or EPOCHS[data]):
            for idx in torch.randperm(len(x), generator=g).split(128):
                flip = torch.rand(len(idx), 1, 1, 1, generator=g) < 0.5
                xb = torch.where(flip, x[idx].flip(-1), x[idx])  # flips: the generator's too
                xb = recolour(xb, g) if self.channels == 3 else xb
                loss = F.cross_entropy(self.net(xb)[1], y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        self.net.eval()
        feats, logits = self.features(np.asarray(test.x))
        self.test_accuracy = float((logits.argmax(1) == test.y).mean())
        self.probes = shape_probes(self.net, image_size) if data == "shapes" else {}
        # KID in units of each feature's spread on real data; features (almost) dead on real data
        # are left out, since dividing by their tiny spread would let them dominate.
        std = feats.std(0)
        self.scale = np.where(std > 0.01 * np.median(std), std, np.inf)
        pick = np.random.default_rng(seed).permutation(len(feats))[:reference]
        self.ref = feats[pick] / self.scale                               # (reference, 64)
        state = dict(net=self.net.state_dict(), test_accuracy=self.test_accuracy,
                     probes=self.probes, scale=torch.from_numpy(self.scale),
                     ref=torch.from_numpy(self.ref))
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(cache, lambda tmp: torch.save(state, tmp))
        probes = "".join(f", {k} {v:.3f}" for k, v in self.probes.items())
        log(f"evaluator: trained a {data} classifier (seed {seed}) in {time.time() - tick:.0f} s, "
            f"test accuracy {self.test_accuracy:.3f}{probes}; cached in {cache}")

    @torch.no_grad()
    def features(self, x):
        """uint8 images (N, C, H, W) -> features (N, 64), logits (N, classes) as numpy."""
        chunks = np.array_split(x, max(1, len(x) // 500))
        out = [self.net(torch.from_numpy(np.array(b))) for b in chunks]
        return torch.cat([f for f, _ in out]).numpy(), torch.cat([lg for _, lg in out]).numpy()

    def score(self, images, labels, subsets=4):
        """images: uint8 (N, H, W, 3) as sample.py and train.py write them; labels (N,) the classes
        asked for. Returns the class accuracy, the mean log-probability of the class asked for, and
        the KID of all samples against the reference with a standard error: the spread of the KIDs
        of `subsets` disjoint parts (each against its own part of the reference) over
        sqrt(subsets)."""
        x = images.transpose(0, 3, 1, 2)[:, :self.channels]           # grey samples were replicated
        feats, logits = self.features(x)
        feats = feats / self.scale
        logp = torch.from_numpy(logits).log_softmax(1)[torch.arange(len(x)), labels]
        parts = [kid(feats[i::subsets], self.ref[i::subsets]) for i in range(subsets)]
        se = float(np.std(parts, ddof=1)) / math.sqrt(subsets)  # the KID's variance goes as 1/n
        return dict(accuracy=float((logits.argmax(1) == labels).mean()), logp=float(logp.mean()),
                    kid=kid(feats, self.ref), kid_se=se, n=len(x),
                    classifier_test_accuracy=self.test_accuracy, **self.probes)


@torch.no_grad()
def samples_per_class(model, per_class, steps, batch_size=250, **sample_args):
    """per_class samples of every class, in class order, by the model's own diffusion in batches
    (a sample's noise depends on its index alone, not on the batch) -> (uint8 images, labels)."""
    labels = torch.arange(model.cfg.num_classes).repeat_interleave(per_class)
    d = R.Diffusion(model.cfg)
    images = np.concatenate([to_uint8(d.sample(model, labels[i:i + batch_size], steps, first=i,
                                               clip_x0=True, **sample_args))
                             for i in range(0, len(labels), batch_size)])
    return images, labels.numpy()
