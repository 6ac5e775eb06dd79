"""
Encode a class-folder image dataset (e.g. ImageNet train/) with the Stable Diffusion VAE into the
latent format `train.py --data latents` reads (needs `pip install diffusers` and the VAE weights):

    python tools/extract_latents.py /path/to/imagenet/train latents/ --image-size 256

moments.npy, float16 (N, 2, 8, s/8, s/8): for each image [0] and its horizontal flip [1], the VAE
posterior [mean (4 channels) | log-variance (4 channels)]; labels.npy, int64 (N,), the class
folder's index in sorted order. Both files are written atomically.
"""
import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from support.data import FolderDataset, load_vae, to_unit  # noqa: E402
from support.runs import Parser, atomic_write, require, run_main  # noqa: E402


@torch.no_grad()
def extract_latents(folder, out_dir, image_size, encode, device, batch=64, workers=4):
    """encode(x in [-1, 1]) -> (mean, logvar), each (B, C, size/8, size/8)."""
    ds, out_dir = FolderDataset(folder, image_size, check=False), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    moments, tmp = None, out_dir / f".moments.{os.getpid()}.npy"
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=workers)
    try:
        for i, (x, _) in enumerate(loader):
            x = to_unit(x.to(device))
            # (B,2,2C,h,w)
            both = torch.stack([torch.cat(encode(v), dim=1) for v in (x, x.flip(-1))], dim=1)
            if moments is None:
                shape = (len(ds), *both.shape[1:])
                moments = np.lib.format.open_memmap(tmp, "w+", np.float16, shape)
            moments[i * batch:i * batch + len(x)] = both.cpu().numpy()
            print(f"encoded {min((i + 1) * batch, len(ds))}/{len(ds)}", flush=True)
        moments.flush()
        os.replace(tmp, out_dir / "moments.npy")
    finally:
        tmp.unlink(missing_ok=True)
    atomic_write(out_dir / "labels.npy",
                 lambda t: np.save(t, ds.y.astype(np.int64), allow_pickle=False))


def main(argv=None):
    p = Parser(prog="extract_latents.py", description=__doc__)
    p.add_argument("folder", help="one subfolder per class")
    p.add_argument("out", help="where moments.npy and labels.npy go")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--vae", default="stabilityai/sd-vae-ft-ema",
                   help="a diffusers name or local path")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=4)
    args = p.parse_args(argv)

    def run():
        require(args.image_size % 8 == 0 and args.image_size > 0,
                "--image-size must be a multiple of 8")
        require(Path(args.folder).is_dir(), f"{args.folder} is not a folder of class folders")
        device = "cuda" if torch.cuda.is_available() else "cpu"
        vae = load_vae(args.vae, device)
        encode = lambda x: (lambda d: (d.mean, d.logvar))(vae.encode(x).latent_dist)
        extract_latents(args.folder, args.out, args.image_size, encode, device, args.batch_size,
                        args.workers)
    run_main("extract_latents.py", run)


if __name__ == "__main__":
    main()
