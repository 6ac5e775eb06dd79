"""
Data sources for train.py and tools/evaluate.py, and the maps between data and model space
(to_model_input, to_uint8, the VAE of latent data). Each source is a Dataset of (uint8 image
(C, H, W) or float latent moments, label) with `num_classes` from the dataset's definition, checked
in full when it is loaded: every file's header and every label, so that a bad file is reported
before training starts.

    shapes          built in: 10 classes of coloured shapes, generated from a seed
    cifar10         the official python archive or its extracted folder (never unpickles code)
    fashion-mnist   idx .gz files
    a folder path   one subfolder per class, ADM-style center crop
    latents         DiT-style VAE latents: moments.npy and labels.npy
                    (tools/extract_latents.py writes them)
"""
import gzip
import hashlib
import io
import pickle
import tarfile
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from support.runs import UserError, atomic_write

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR_MD5 = "c58f30108f718f92721af3b95e74349a"
FMNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FMNIST_MD5 = {"train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
              "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
              "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
              "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310"}
SOURCES = ("shapes", "cifar10", "fashion-mnist", "latents")
LATENT_SCALE = 0.18215  # Stable Diffusion VAE latent scale, as in DiT


class ArrayDataset(torch.utils.data.Dataset):
    def __init__(self, x, y, num_classes, where, latent=False):
        self.x, self.num_classes, self.latent = x, num_classes, latent
        self.y = check_labels(y, len(x), num_classes, where)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return torch.from_numpy(np.array(self.x[i])), int(self.y[i])


def check_labels(y, n, num_classes, where):
    """Labels must be integers in 0..num_classes-1, one per example."""
    y = np.asarray(y)
    if y.ndim != 1 or len(y) != n:
        raise UserError(f"{where}: {len(y)} labels for {n} examples")
    if y.dtype.kind not in "iu":
        raise UserError(f"{where}: labels must be integers, got {y.dtype}")
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise UserError(f"{where}: labels must be in 0..{num_classes - 1}, "
                        f"found {y.min()}..{y.max()}")
    return y.astype(np.int64)


def center_crop(img, size):
    """ADM's center crop: halve with BOX while large, BICUBIC to the short side, crop the middle.
    16-bit greyscale is scaled to 8 bits (Pillow's RGB conversion would clip it to white)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        grey = (np.asarray(img, dtype=np.float64) / 257).clip(0, 255)
        img = Image.fromarray(grey.astype(np.uint8))
    img = img.convert("RGB")
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(s // 2 for s in img.size), Image.BOX)
    scale = size / min(img.size)
    img = img.resize(tuple(round(s * scale) for s in img.size), Image.BICUBIC)
    a = np.asarray(img)
    top, left = (a.shape[0] - size) // 2, (a.shape[1] - size) // 2
    return np.array(a[top:top + size, left:left + size])


class FolderDataset(torch.utils.data.Dataset):
    """One subfolder per class (classes in sorted order). Every image is decoded once at load time,
    so a corrupt or truncated file is reported before training rather than in the middle of it."""
    EXT = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

    def __init__(self, root, size, check=True):
        root = Path(root)
        classes = sorted(d.name for d in root.iterdir() if d.is_dir())
        self.items = [(f, c) for c, d in enumerate(classes) for f in sorted((root / d).rglob("*"))
                      if f.suffix.lower() in self.EXT]
        if not self.items:
            raise UserError(f"no images found in class folders under {root}")
        self.size, self.latent, self.num_classes = size, False, len(classes)
        self.y = np.array([c for _, c in self.items])
        for f, _ in self.items if check else []:
            self.read(f, draft=True)

    def read(self, f, draft=False):
        try:
            with Image.open(f) as img:
                # JPEG: decode at reduced resolution, enough to find a broken file quickly
                if draft:
                    img.draft("RGB", (self.size, self.size))
                img.load()
                return center_crop(img, self.size)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise UserError(f"{f} is not a readable image ({e}); remove or replace it") from None

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return torch.from_numpy(self.read(self.items[i][0])).permute(2, 0, 1), self.items[i][1]


def make_shapes(n=10_000, size=32, seed=0, shapes=None, random_colours=False):
    """Built-in data: 10 classes, each a fixed shape in a fixed colour (disc, square, ring, diamond,
    cross, triangle, two discs, and square patches of horizontal stripes, vertical stripes or
    checks) with random position, size and brightness on a noisy dark background. Deterministic by
    seed; rendered in chunks so that memory stays bounded at large sizes. The object masks are kept
    (`masks`, (n, size, size)). Probes of what a classifier reads: `shapes` (n,) draws other shapes
    in the classes' colours; `random_colours` gives every object a random colour."""
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.arange(n) % 10)
    cx, cy, r = rng.uniform(0.35, 0.65, (3, n, 1, 1)) * np.array([1, 1, 0.5])[:, None, None, None]
    ph = rng.uniform(0, 2 * np.pi, (n, 1, 1))
    light = rng.uniform(0.7, 1.0, (n, 1, 1, 1))
    colours = np.array([[230, 40, 40], [40, 200, 60], [60, 90, 240], [240, 220, 40],
                        [240, 240, 240], [240, 130, 20], [170, 60, 220], [40, 220, 220],
                        [230, 60, 170], [150, 110, 60]])
    colour = colours[y]                                                    # (n, 3)
    if random_colours:  # a stream of its own: the images are otherwise the same
        colour = np.random.default_rng([seed, 1]).uniform(40, 255, (n, 3))
    drawn = y if shapes is None else np.asarray(shapes)
    g = (np.arange(size) + 0.5) / size
    img = np.empty((n, 3, size, size), np.uint8)
    object_masks = np.empty((n, size, size), bool)
    for lo in range(0, n, 512):
        s = slice(lo, lo + 512)
        dx, dy, r_ = g[None, None, :] - cx[s], g[None, :, None] - cy[s], r[s]      # (n', S, S) each
        d, box = np.hypot(dx, dy), np.maximum(abs(dx), abs(dy))
        masks = [d < r_, box < r_ * 0.85, abs(d - r_) < r_ / 3, abs(dx) + abs(dy) < r_,
                 (np.minimum(abs(dx), abs(dy)) < r_ / 3) & (box < r_),
                 (dy < r_ * 0.8) & (abs(dx) < (dy + r_) * 0.6),
                 ((np.hypot(dx - r_ * 0.7, dy) < r_ * 0.45)
                  | (np.hypot(dx + r_ * 0.7, dy) < r_ * 0.45)),
                 (box < r_) & (np.sin(dy * 40 + ph[s]) > 0),               # textured square patches
                 (box < r_) & (np.sin(dx * 40 + ph[s]) > 0),
                 (box < r_) & ((np.sin(dx * 30 + ph[s]) > 0) ^ (np.sin(dy * 30) > 0))]
        mask = np.choose(drawn[s, None, None], masks)                       # each image its shape
        noise = rng.uniform(0, 40, (len(mask), 1, size, size))
        img[s] = (mask[:, None] * colour[s, :, None, None] * light[s] + noise).clip(0, 255)
        object_masks[s] = mask
    ds = ArrayDataset(img, y, 10, "shapes")
    ds.masks = object_masks                        # where the object is: the critical-token measure
    return ds


def download(url, dest, md5):
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            data = response.read()
    except OSError as e:
        raise UserError(f"{dest.name} is not in {dest.parent} and could not be downloaded ({e}); "
                        f"fetch {url} and put it there") from None
    if hashlib.md5(data).hexdigest() != md5:
        raise UserError(f"{url} arrived corrupted (md5 mismatch); try again")
    dest.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(dest, lambda tmp: tmp.write_bytes(data))


class ArraysOnly(pickle.Unpickler):
    """Unpickles CIFAR's batches (dicts of bytes, lists and numpy arrays) and refuses every other
    global, so a crafted file cannot run code. (_codecs.encode: how Python 3 pickles bytes.)"""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def load_cifar10(root, split="train"):
    """The official python archive (cifar-10-python.tar.gz) or its extracted
    cifar-10-batches-py/."""
    root = Path(root)
    folder, archive = root / "cifar-10-batches-py", root / "cifar-10-python.tar.gz"
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    if folder.is_dir():
        raw = [(folder / n).read_bytes() for n in names]
    else:
        if not archive.is_file():
            download(CIFAR_URL, archive, CIFAR_MD5)
        with tarfile.open(archive) as tar:
            files = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
            missing = [n for n in names if n not in files]
            if missing:
                raise UserError(f"{archive} has no {', '.join(missing)}; "
                                "is it cifar-10-python.tar.gz?")
            raw = [tar.extractfile(files[n]).read() for n in names]
    batches = [ArraysOnly(io.BytesIO(b), encoding="bytes").load() for b in raw]
    x = np.concatenate([np.asarray(b[b"data"], dtype=np.uint8) for b in batches])
    if x.ndim != 2 or x.shape[1] != 3072:
        raise UserError(f"{root}: CIFAR-10 batches hold (N, 3072) images, found {x.shape}")
    y = np.concatenate([np.asarray(b[b"labels"]) for b in batches])
    return ArrayDataset(x.reshape(-1, 3, 32, 32), y, 10, f"cifar10 in {root}")


def read_idx(path, magic, dims):
    """An idx .gz file: big-endian magic and sizes, then uint8 data; checked before it is used."""
    data = gzip.open(path).read()
    head = np.frombuffer(data[:4 * (2 + len(dims))], ">i4")                # magic, count, dims
    if len(head) != 2 + len(dims) or head[0] != magic or list(head[2:]) != dims:
        raise UserError(f"{path} is not an idx file of shape (N, {dims}) (header {head.tolist()})")
    n = int(head[1])
    body = np.frombuffer(data, np.uint8, offset=4 * len(head))
    if body.size != n * int(np.prod(dims)):
        raise UserError(f"{path} is truncated: {body.size} bytes for {n} items")
    return body.reshape(n, *dims)


def load_fashion_mnist(root, split="train"):
    """idx .gz files from root, else Debian's dataset-fashion-mnist, else downloaded into root."""
    prefix = "train" if split == "train" else "t10k"
    files = [f"{prefix}-images-idx3-ubyte.gz", f"{prefix}-labels-idx1-ubyte.gz"]
    system = Path("/usr/share/datasets/fashion-mnist")
    where = next((d for d in [Path(root), system] if all((d / f).is_file() for f in files)), None)
    if where is None:
        for f in files:
            download(FMNIST_URL + f, Path(root) / f, FMNIST_MD5[f])
        where = Path(root)
    images = read_idx(where / files[0], 2051, [28, 28])
    labels = read_idx(where / files[1], 2049, [])
    return ArrayDataset(images[:, None], labels, 10, f"fashion-mnist in {where}")


def load_latents(root, num_classes):
    """DiT-style VAE latents: moments.npy float (N, 2, 2C, h, w) holding [mean | logvar] for each
    image and its horizontal flip, memory-mapped; labels.npy int (N,)."""
    root = Path(root)
    if not (root / "moments.npy").is_file() or not (root / "labels.npy").is_file():
        raise UserError(f"no moments.npy and labels.npy in {root}; "
                        "tools/extract_latents.py writes them")
    moments = np.load(root / "moments.npy", mmap_mode="r")
    if (moments.ndim != 5 or moments.shape[1] != 2 or moments.shape[2] % 2
            or moments.dtype.kind != "f"):
        raise UserError(f"{root}/moments.npy must be float (N, 2, 2C, h, w), got {moments.dtype} "
                        f"{moments.shape}")
    return ArrayDataset(moments, np.load(root / "labels.npy"), num_classes,
                        f"{root}/labels.npy", True)


def load_data(data, data_dir="data", image_size=32, split="train", num_classes=1000):
    """data: shapes | cifar10 | fashion-mnist | latents | a folder of class folders. `num_classes`
    applies to latents (ImageNet: 1000); the others define their own."""
    try:
        if data == "shapes":
            return make_shapes(size=image_size, seed=0 if split == "train" else 1)
        if data == "cifar10":
            return load_cifar10(data_dir, split)
        if data == "fashion-mnist":
            return load_fashion_mnist(data_dir, split)
        if data == "latents":
            return load_latents(data_dir, num_classes)
        if not Path(data).is_dir():
            raise UserError(f"--data {data!r} is neither one of {', '.join(SOURCES)} nor a folder")
        return FolderDataset(data, image_size)
    except (OSError, EOFError, KeyError, ValueError, TypeError, pickle.UnpicklingError,
            tarfile.TarError, zlib.error) as e:
        raise UserError(f"could not read {data} data from {data_dir}: {e}") from None


def to_unit(x):
    """uint8 images (B, C, H, W) -> float in [-1, 1], the model's scale."""
    return x.float() / 127.5 - 1


def first_examples(ds, n, device):
    """The data set's first n examples (all, if fewer), stacked on the device: raw x and labels."""
    items = [ds[i] for i in range(min(n, len(ds)))]
    return (torch.stack([x for x, _ in items]).to(device),
            torch.tensor([y for _, y in items], device=device))


def to_model_input(x, ds):
    """A raw batch on its device -> x0 on the model's scale: images to [-1, 1] with random
    horizontal flips; latents: pick the image or its flip, sample the VAE posterior, scale by
    LATENT_SCALE. Every random tensor is made on x's device, so that the step copies nothing from
    the host."""
    if ds.latent:
        pick = torch.randint(0, 2, (len(x), 1, 1, 1), device=x.device)   # the image or its flip
        x = torch.where(pick == 1, x[:, 1], x[:, 0]).float()             # (B, 2C, h, w)
        mean, logvar = x.chunk(2, dim=1)
        return (mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)) * LATENT_SCALE
    x = to_unit(x)
    return torch.where(torch.rand(len(x), 1, 1, 1, device=x.device) < 0.5, x.flip(-1), x)


def to_uint8(x):
    """Model-space images (B, C, H, W) in [-1, 1] -> uint8 (B, H, W, 3), grey replicated to RGB."""
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return np.repeat(x, 3, axis=3) if x.shape[3] == 1 else x


def load_vae(name, device):
    """The Stable Diffusion VAE through diffusers (optional dependency, imported only here)."""
    try:
        from diffusers.models import AutoencoderKL
    except ImportError:
        raise UserError("latents need diffusers to be encoded or decoded: "
                        "pip install diffusers") from None
    try:
        return AutoencoderKL.from_pretrained(name).to(device).eval()
    except (OSError, ValueError) as e:
        raise UserError(f"could not load the VAE {name!r}: {str(e)[:160]}") from None


class BatchOrder(torch.utils.data.Sampler):
    """Index lists for steps start, start+1, ...: a fresh permutation per epoch seeded by
    (seed, epoch); each step's global batch (batch x world x accum) split into each rank's `accum`
    micro-batches, so any step's batches can be recomputed on resume."""

    def __init__(self, n, batch, seed, start, rank=0, world=1, accum=1):
        self.n, self.batch, self.seed, self.start = n, batch, seed, start
        self.rank, self.world, self.accum = rank, world, accum

    def __iter__(self):
        per_epoch, step, perm = self.n // (self.batch * self.world * self.accum), self.start, None
        while True:
            epoch, i = divmod(step, per_epoch)
            if i == 0 or perm is None:
                gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
                perm = torch.randperm(self.n, generator=gen)
            for m in range(self.accum):
                lo = ((i * self.accum + m) * self.world + self.rank) * self.batch
                yield perm[lo:lo + self.batch].tolist()
            step += 1
