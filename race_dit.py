"""Race-DiT: DiT (Peebles & Xie, arXiv 2212.09748) whose MLPs are Mixture-of-Experts layers
routed by Expert Race (Yuan et al., arXiv 2503.16057). S1..S7: the sections of PAPER.md, the
paper's digest. Top to bottom: configuration, DiT blocks, the MoE layer (selection, dispatch and
its policy), the inference threshold and its calibration, the model, PLR and RSL, the diffusion."""
import itertools
import math
import re
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

if not hasattr(F, "grouped_mm"):  # the floor in requirements.txt
    raise ImportError("race_dit needs torch >= 2.10 (torch.nn.functional.grouped_mm); "
                      f"found {torch.__version__}")

# ---- Configuration -------------------------------------------------------------------------------

# name -> (depth, width, heads): S is DiT's, B..XL the paper's (S1); XS for CPUs; XSD: XS's compute
# at three times its depth (S5)
SIZES = {"XS": (6, 192, 3), "XSD": (18, 112, 2), "S": (12, 384, 6), "B": (12, 768, 12),
         "M": (16, 960, 16), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
# Config field -> its allowed values (the first: the Config default)
CHOICES = dict(routing=("race", "token", "expert", "dense"),
               gating=("identity", "softmax", "sigmoid"), plr_init=("xavier", "zero"),
               schedule=("linear", "cosine"), loss_weight=("none", "min-snr"),
               prediction=("eps", "v"))


@dataclass
class Config:
    input_size: int = 32          # spatial size of the (latent) image
    in_channels: int = 4
    patch_size: int = 2
    depth: int = 28
    hidden_size: int = 1152
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    class_dropout_prob: float = 0.1
    learn_sigma: bool = False     # True doubles the output channels (DiT's learned variance)
    routing: str = "race"         # race | token | expert | dense (S3)
    num_experts: int = 8          # E
    top_k: int = 2                # k: experts per token on average
    granularity: int = 0          # expert width = mlp_ratio * D / granularity (S2); 0 means k
    gating: str = "identity"      # identity | softmax | sigmoid (S3, Table 1)
    threshold_decay: float = 0.99  # EMA decay of the inference threshold (S4, chosen)
    plr_init: str = "xavier"      # xavier (DiT's for every Linear) | zero: the PLR head's (S5)
    # The diffusion the model is trained and sampled with (S7); the defaults are DiT's.
    schedule: str = "linear"      # linear (DiT) | cosine (IDDPM)
    loss_weight: str = "none"     # none (DiT) | min-snr: the MSE of step t weighed min(SNR, g)/SNR
    min_snr_gamma: float = 5.0    # g of min-snr
    prediction: str = "eps"       # eps (DiT) | v = sqrt(ab) eps - sqrt(1 - ab) x0 (Salimans & Ho)

    def __post_init__(self):
        def need(ok, msg):
            if not ok:
                raise ValueError(msg)
        for name, allowed in CHOICES.items():
            need(getattr(self, name) in allowed,
                 f"unknown {name} {getattr(self, name)!r}; choose from {allowed}")
        need(self.min_snr_gamma > 0, f"min-SNR gamma must be positive, got {self.min_snr_gamma}")
        need(self.patch_size >= 1, f"the patch size must be at least 1, got {self.patch_size}")
        need(self.input_size % self.patch_size == 0,
             f"image size {self.input_size} is not divisible by the patch size {self.patch_size}")
        need(self.hidden_size % self.num_heads == 0, "hidden size must be divisible by the heads")
        if self.routing != "dense":
            E, k, L = self.num_experts, self.top_k, (self.input_size // self.patch_size) ** 2
            need(1 <= k <= E, f"top-k must be between 1 and the number of experts (k={k}, E={E})")
            self.granularity = self.granularity or k
            width = int(self.mlp_ratio * self.hidden_size)
            need(width % self.granularity == 0,
                 f"MLP width {width} is not divisible by granularity {self.granularity}")
            need(self.routing != "expert" or k * L >= E,
                 f"expert-choice capacity k*L/E = {k}*{L}/{E} is below 1")

    @property
    def out_channels(self):
        return self.in_channels * (2 if self.learn_sigma else 1)

    @property
    def mlp_hidden(self):  # width of one expert (or of the dense MLP)
        width = int(self.mlp_ratio * self.hidden_size)
        return width // (1 if self.routing == "dense" else self.granularity)


def make_config(name="S/2", experts=None, **kw):
    """`make_config("XL/2", "4in32")` -> Config; experts=None (or routing="dense"): a dense DiT."""
    m = re.fullmatch(r"(?:DiT-)?(XSD|XS|S|B|M|L|XL)/(\d+)", name)
    if not m:
        raise ValueError(f"unknown model {name!r}; expected e.g. S/2 or XL/2 ({', '.join(SIZES)})")
    size = dict(zip(("depth", "hidden_size", "num_heads"), SIZES[m.group(1)]))
    kw = {**size, "patch_size": int(m.group(2)), **kw}
    if experts is None:
        kw.setdefault("routing", "dense")
    elif e := re.fullmatch(r"(\d+)in(\d+)", experts):
        kw.update(top_k=int(e.group(1)), num_experts=int(e.group(2)))
    else:
        raise ValueError(f"experts must look like 2in8 (k in E), got {experts!r}")
    return Config(**kw)


# ---- DiT building blocks (S1), named as the reference DiT's so that its checkpoints load ---------

def modulate(x, shift, scale):  # adaLN: x (B, L, D), shift/scale (B, D)
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def sincos_pos_embed(dim, grid):
    """Fixed 2D sin-cos embedding, (grid*grid, dim). Token r*grid+c: first half encodes the column
    c, second half the row r, each as [sin, cos] over dim/4 frequencies (DiT's layout)."""
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim // 4))   # (dim/4,)
    rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
    c, r = (pos.reshape(-1, 1) * omega for pos in (cols, rows))                   # (G*G, dim/4)
    # torch.tensor, not from_numpy: made on the default device (train.build's), not the host.
    return torch.tensor(np.concatenate([np.sin(c), np.cos(c), np.sin(r), np.cos(r)], axis=1),
                        dtype=torch.float32)


class PatchEmbed(nn.Module):
    def __init__(self, p, c, d):
        super().__init__()
        self.proj = nn.Conv2d(c, d, kernel_size=p, stride=p)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)                   # (B, C, H, W) -> (B, L, D)


def unpatchify(x, p, c):
    """(B, L, p*p*C) -> (B, C, H, W)."""
    B, g = x.shape[0], math.isqrt(x.shape[1])                             # L = g * g tokens
    return x.reshape(B, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(B, c, g * p, g * p)


class TimestepEmbedder(nn.Module):
    def __init__(self, d, freq_dim=256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, d), nn.SiLU(), nn.Linear(d, d))

    def forward(self, t):  # (B,) -> (B, D); [cos, sin] order as in DiT
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device) / half)   # (half,)
        ang = t.float()[:, None] * freqs[None]                                           # (B, half)
        return self.mlp(torch.cat([ang.cos(), ang.sin()], dim=-1).to(self.mlp[0].weight.dtype))


def drop_labels(y, p, num_classes):
    """Classifier-free guidance training: each label becomes the null class with probability p."""
    return torch.where(torch.rand(y.shape, device=y.device) < p, num_classes, y)


class LabelEmbedder(nn.Module):
    def __init__(self, num_classes, d, dropout_prob):
        super().__init__()
        self.num_classes, self.dropout_prob = num_classes, dropout_prob
        self.embedding_table = nn.Embedding(num_classes + (dropout_prob > 0), d)  # last: null

    def forward(self, y):
        if self.training and self.dropout_prob > 0:
            y = drop_labels(y, self.dropout_prob, self.num_classes)
        return self.embedding_table(y)


class Attention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)                    # q, k, v: (B, heads, L, D/h)
        return self.proj(x.transpose(1, 2).reshape(B, L, D))


class Mlp(nn.Sequential):  # DiT's (timm's): the names fc1, act, fc2 as in its checkpoints
    def __init__(self, d, hidden):
        super().__init__(OrderedDict(fc1=nn.Linear(d, hidden), act=nn.GELU(approximate="tanh"),
                                     fc2=nn.Linear(hidden, d)))


# ---- The MoE layer (S2-S4) -----------------------------------------------------------------------

class MoE(nn.Module):
    """Router, E bias-free experts (stacked weights), PLR head (S2, S5). x (B, L, D) -> (out, aux):
    logits, mask of the selected pairs (B, L, E); race cutoff or None; training: plr (B, C, H, W)"""

    def __init__(self, cfg: Config):
        super().__init__()
        D, E, H = cfg.hidden_size, cfg.num_experts, cfg.mlp_hidden
        self.routing, self.gating, self.k, self.E = cfg.routing, cfg.gating, cfg.top_k, E
        self.decay = cfg.threshold_decay
        self.router = nn.Sequential(nn.Linear(D, D), nn.GELU(approximate="tanh"))  # h = GELU(Wx)
        self.scorer = nn.Linear(D, E)                                           # logits = scorer(h)
        # S5: predicts the diffusion target (patchified) from h; C channels: no learned variance
        self.plr_head = nn.Linear(D, cfg.patch_size ** 2 * cfg.in_channels)
        self.plr_layout = (cfg.patch_size, cfg.in_channels)
        bound = math.sqrt(6 / (D + H))  # xavier-uniform per expert, like the dense MLP's fc1/fc2
        self.w1 = nn.Parameter(torch.empty(E, D, H).uniform_(-bound, bound))
        self.w2 = nn.Parameter(torch.empty(E, H, D).uniform_(-bound, bound))
        # S4: at inference a race layer selects the pairs whose score passes its threshold, an EMA
        # of the training cutoffs ("threshold"), or the batch's top-K as in training ("topk").
        self.register_buffer("threshold", torch.zeros(()))
        self.register_buffer("threshold_updates", torch.zeros((), dtype=torch.long))
        self.select_by = "threshold"

    def gating_fn(self, logits):  # S3 / Table 1: the gating function turns logits into scores
        if self.gating == "softmax":
            return logits.softmax(-1)
        return logits.sigmoid() if self.gating == "sigmoid" else logits

    def select(self, scores, B, L):
        """The selected (token, expert) pairs as sorted indices into the expert-major flat grid of
        E * N scores (N = B * L tokens): pair (n, e) is index e * N + n, so that sorting groups the
        pairs by expert. With E = 2, N = 3 and pairs (token 0, expert 1), (2, 0), (1, 1):
        indices 1*3+0 = 3, 0*3+2 = 2, 1*3+1 = 4, sorted [2, 3, 4]; expert = index // N = [0, 1, 1],
        token = index % N = [2, 0, 1]. Returns (pairs, the race's cutoff or None)."""
        N, E, k = B * L, self.E, self.k
        st = scores.t()                                                   # (E, N)
        if self.routing == "race":
            if self.training or self.select_by == "topk":
                # Expert Race (S3): one top-K over all B*L*E scores, K = B*L*k exactly (ties too).
                vals, idx = st.reshape(-1).topk(N * k, sorted=False)
                return idx.sort().values, vals.min()
            # S4: each pair against the threshold, so a token's experts do not depend on its batch
            # (a host sync: the number of pairs is data dependent; inference only).
            return (st.reshape(-1) >= self.threshold).nonzero().squeeze(1), None
        if self.routing == "token":                                      # top-k experts per token
            e = scores.topk(k, dim=1).indices                             # (N, k)
            idx = e * N + torch.arange(N, device=scores.device)[:, None]
        else:  # expert-choice (S3, Fig. 3): expert e takes its C = k*L // E best tokens per image
            pos = st.view(E, B, L).topk(k * L // E, dim=2).indices        # (E, B, C) positions
            n = pos + L * torch.arange(B, device=scores.device)[None, :, None]
            idx = n + N * torch.arange(E, device=scores.device)[:, None, None]
        return idx.reshape(-1).sort().values, None

    def forward(self, x):
        B, L, D = x.shape
        N, E, xf = B * L, self.E, x.reshape(B * L, D)
        h = self.router(xf)                                               # (N, D)
        # Routing decisions at fp32 resolution: bf16 logits would tie at the race's cutoff and at
        # the threshold (S3, S4).
        with torch.autocast(x.device.type, enabled=False):
            logits = self.scorer(h.to(self.scorer.weight.dtype))         # (N, E)
        scores = self.gating_fn(logits)                                   # (N, E)
        pairs, cutoff = self.select(scores.detach(), B, L)               # (P,) sorted, expert-major
        expert, token = pairs // N, pairs % N                             # (P,), (P,)
        ends = torch.searchsorted(pairs, N * torch.arange(1, E + 1, device=x.device))  # (E,)
        # Dispatch: only the P selected pairs are computed, any load per expert (zero too). Gathered
        # in x's dtype (fp32 under autocast): backward adds a token's up to E gradients in fp32, as
        # for a dense matmul's input; cast at once, so that no fp32 copy of the P rows stays alive.
        tokens = xf.index_select(0, token).to(compute_dtype(xf))          # (P, D)
        hid = F.gelu(grouped_matmul(tokens, self.w1, ends), approximate="tanh")  # (P, H)
        out = grouped_matmul(hid, self.w2, ends)                          # (P, D)
        # Each output weighed by its pair's score (S3).
        pair_scores = scores.reshape(-1).index_select(0, token * E + expert)  # (P,)
        out = out * pair_scores.unsqueeze(1).to(out.dtype)                # (P, D)
        # Combined in (at least) fp32 and rounded once, as a dense MLP's output is: a bf16 sum
        # would round after each of a token's up to E adds.
        acc = torch.promote_types(out.dtype, torch.float32)
        y = torch.zeros(N, D, device=x.device, dtype=acc).index_add_(0, token, out.to(acc))
        mask = torch.zeros(E * N, dtype=torch.bool, device=x.device).index_fill_(0, pairs, True)
        layer_aux = dict(logits=logits.view(B, L, E), mask=mask.view(E, B, L).permute(1, 2, 0),
                         cutoff=cutoff)
        if self.training:  # S5's prediction in image layout, like the diffusion target
            layer_aux["plr"] = unpatchify(self.plr_head(h).view(B, L, -1), *self.plr_layout)
        return y.to(out.dtype).view(B, L, D), layer_aux


def grouped_matmul(x, w, ends, grouped=None):
    """x (P, Din), its rows grouped by expert (group e ends at row ends[e]) -> group e @ w[e] for
    each e, (P, Dout): one grouped GEMM where use_grouped_mm says so, else a loop over experts.
    Autocast skips grouped_mm: x and w are cast to its dtype here, as for an nn.Linear."""
    dtype = compute_dtype(x)
    x, w = x.to(dtype), w.to(dtype)
    if use_grouped_mm(x.device, dtype) if grouped is None else grouped:
        return F.grouped_mm(x, w, offs=ends.to(torch.int32))
    counts = torch.diff(ends, prepend=ends.new_zeros(1)).tolist()  # the one host sync of this path
    return torch.cat([xe @ we for xe, we in zip(x.split(counts), w)])


def compute_dtype(x):
    """The dtype x's matmuls run in: autocast's where it is enabled on x's device, else x's own."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def use_grouped_mm(device, dtype, capability=None, compiling=None):
    """The dispatch policy: where one F.grouped_mm beats the loop (timings: benchmarks/README.md).
    CUDA: Hopper (capability 9.x) in bf16 only, with no host sync; not Blackwell (10.x), where an
    expert without tokens gets an unwritten weight gradient (pytorch/pytorch#172439). CPU: bf16 and
    fp32 (no float64 kernel), not fp32 under torch.compile, whose shape function takes bf16 only."""
    if device.type == "cpu":
        compiling = torch.compiler.is_compiling() if compiling is None else compiling
        return dtype == torch.bfloat16 or (dtype == torch.float32 and not compiling)
    return (device.type == "cuda" and dtype == torch.bfloat16
            and (capability or torch.cuda.get_device_capability(device))[0] == 9)


# ---- The inference threshold (S4) ----------------------------------------------------------------

@torch.no_grad()
def update_threshold(layer, cutoff):
    """A training race's cutoff moves the layer's threshold: an EMA whose first update takes the
    cutoff (no host sync). Called by the model, not the layer: recompute would update it twice."""
    ema = layer.decay * layer.threshold + (1 - layer.decay) * cutoff
    layer.threshold.copy_(torch.where(layer.threshold_updates > 0, ema, cutoff))
    layer.threshold_updates += 1


def set_select_by(model, mode):
    """How race layers select at inference: "threshold" (S4) or "topk" (the batch's, as trained)."""
    if mode not in ("threshold", "topk"):
        raise ValueError(f"select_by must be 'threshold' or 'topk', got {mode!r}")
    for m in model.moe_layers():
        m.select_by = mode


@torch.no_grad()
def calibrate_thresholds(model, diffusion, batches):
    """S4 (chosen), for EMA copies, whose logits differ from the online model's: each race layer's
    threshold set to its mean batch top-K cutoff over training-like batches (x0, y)."""
    layers = [m for m in model.moe_layers() if m.routing == "race"]
    if not layers:
        return
    was_training, select_by = model.training, layers[0].select_by
    model.eval()
    set_select_by(model, "topk")
    cutoffs = []                                                          # per batch: (layers,)
    for x0, y in batches:
        t = torch.randint(0, diffusion.num_timesteps, (x0.shape[0],), device=x0.device)
        y = drop_labels(y, model.cfg.class_dropout_prob, model.cfg.num_classes)
        _, aux = model(diffusion.q_sample(x0, t, torch.randn_like(x0)), t, y, return_aux=True)
        cutoffs.append(torch.stack([a["cutoff"].float() for a in aux if a["cutoff"] is not None]))
    for m, cutoff in zip(layers, sum(cutoffs) / len(cutoffs)):
        m.threshold.copy_(cutoff)
    set_select_by(model, select_by)
    model.train(was_training)


# ---- The model -----------------------------------------------------------------------------------

class DiTBlock(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        D = cfg.hidden_size
        self.norm1 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(D, cfg.num_heads)
        self.norm2 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(D, cfg.mlp_hidden) if cfg.routing == "dense" else MoE(cfg)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))

    def forward(self, x, c):  # x (B, L, D), c (B, D) -> (x, MoE aux or None)
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1))
        h = modulate(self.norm2(x), shift2, scale2)
        h, layer_aux = self.mlp(h) if isinstance(self.mlp, MoE) else (self.mlp(h), None)
        return x + gate2.unsqueeze(1) * h, layer_aux


class FinalLayer(nn.Module):
    def __init__(self, d, p, c_out):
        super().__init__()
        self.norm_final = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(d, p * p * c_out)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class RaceDiT(nn.Module):
    """DiT (S1) with MoE layers unless cfg.routing == "dense": model(x (B, C, H, W), t (B,), y (B,))
    -> prediction (B, C_out, H, W) [, per-layer MoE aux]. Training forwards move S4's threshold."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg, D = cfg, cfg.hidden_size
        self.x_embedder = PatchEmbed(cfg.patch_size, cfg.in_channels, D)
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = LabelEmbedder(cfg.num_classes, D, cfg.class_dropout_prob)
        # a Parameter without gradient, as in DiT: reference checkpoints and parameter counts match
        self.pos_embed = nn.Parameter(sincos_pos_embed(D, cfg.input_size // cfg.patch_size)[None],
                                      requires_grad=False)
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.depth))
        self.final_layer = FinalLayer(D, cfg.patch_size, cfg.out_channels)
        self.recompute = False  # activation recomputation: about 1/3 more compute, far less memory
        self.initialize_weights()

    def initialize_weights(self):  # DiT's initialisation (S1)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # adaLN-Zero: every block starts as the identity and the model outputs zero.
        zero = [b.adaLN_modulation[-1] for b in self.blocks]
        zero += [m.plr_head for m in self.moe_layers() if self.cfg.plr_init == "zero"]
        for layer in zero + [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def moe_layers(self):
        return [b.mlp for b in self.blocks if isinstance(b.mlp, MoE)]

    def forward(self, x, t, y, return_aux=False):
        h = self.x_embedder(x) + self.pos_embed                           # (B, L, D)
        c = self.t_embedder(t) + self.y_embedder(y)                       # (B, D)
        aux = []
        for block in self.blocks:
            if self.recompute and torch.is_grad_enabled():  # keep the input; backward recomputes
                h, layer_aux = torch.utils.checkpoint.checkpoint(block, h, c, use_reentrant=False,
                                                             preserve_rng_state=False)
            else:
                h, layer_aux = block(h, c)
            if layer_aux is not None:
                if self.training and layer_aux["cutoff"] is not None:           # S4
                    update_threshold(block.mlp, layer_aux["cutoff"].detach().float())
                aux.append(layer_aux)
        out = unpatchify(self.final_layer(h, c), self.cfg.patch_size, self.cfg.out_channels)
        return (out, aux) if return_aux else out


def guided_forward(model, x, t, y, cfg_scale):
    """Classifier-free guidance, conditional and unconditional in one forward, on the prediction's
    channels (a learned variance is the conditional half's). Returns (out, aux)."""
    if model.cfg.class_dropout_prob <= 0:
        raise ValueError("guidance needs the null class of a model trained with label dropout")
    null, C = torch.full_like(y, model.cfg.num_classes), x.shape[1]
    out, aux = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]), return_aux=True)
    cond, uncond = out.chunk(2)
    eps = uncond[:, :C] + cfg_scale * (cond[:, :C] - uncond[:, :C])
    return torch.cat([eps, cond[:, C:]], dim=1), aux


# ---- PLR (S5), RSL (S6) and the token-choice baseline's balance loss, from the per-layer aux -----

def plr_loss(aux, target):
    """S5: each MoE layer's prediction of the diffusion target (B, C, H, W) from its router's
    hidden state, MSE averaged over layers (needs training-mode aux)."""
    return sum(F.mse_loss(a["plr"].float(), target) for a in aux) / len(aux)


def rsl_loss(logits, mask):
    """S6: L_RSL = (1/N) sum_ij W_ij (P^T P)_ij, P = softmax(logits) (N, E), W from the selection
    counts M^T M (no gradient): the diagonal balances each expert's load, the off-diagonal each
    pair's. In fp32 under autocast too, so that the counts are exact."""
    E = logits.shape[-1]
    with torch.autocast(logits.device.type, enabled=False):
        P = logits.reshape(-1, E).float().softmax(-1)                     # (N, E)
        M = mask.reshape(-1, E).float()                                   # (N, E)
        Mp = M.t() @ M                                                  # (E, E) load / co-selection
        eye = torch.eye(E, dtype=torch.bool, device=M.device)
        diag, off = Mp.diagonal().sum(), Mp.masked_fill(eye, 0).sum()
        # clamp: with k = 1 there are no pairs and `off` is 0
        W = torch.where(eye, E * Mp / diag.clamp(min=1), (E * E - E) * Mp / off.clamp(min=1))
        return (W * (P.t() @ P)).sum() / P.shape[0]


def balance_loss(logits, mask):
    """Token-choice's switch balance loss E sum_e f_e mean P_e (f_e: e's share of selections)."""
    P = logits.reshape(-1, logits.shape[-1]).float().softmax(-1)          # (N, E)
    M = mask.reshape(P.shape).float()                                     # (N, E)
    return P.shape[1] * ((M.sum(0) / M.sum().clamp(min=1)) * P.mean(0)).sum()


# ---- Gaussian diffusion (S7): DDPM on 1000 steps -------------------------------------------------

def alphas_cumprod(name, T=1000):
    """Alpha-bar at t = 0..T-1, float64 (S7). linear: DiT's betas, 1e-4..0.02. cosine: IDDPM's
    f(t) / f(0), f(t) = cos^2((t/T + s) / (1 + s) * pi/2), s = 0.008, each beta clipped at 0.999."""
    if name == "linear":
        return np.cumprod(1 - np.linspace(1e-4, 0.02, T, dtype=np.float64))
    f = np.cos((np.arange(T + 1, dtype=np.float64) / T + 0.008) / 1.008 * math.pi / 2) ** 2
    return np.cumprod(1 - np.minimum(1 - f[1:] / f[:-1], 0.999))


def schedule(ab):
    """Per-step tables of a (respaced) schedule from its alpha-bar (T,), in float64: roots and
    differences before any cast, as DiT (1 - ab in fp32 cancels at small t)."""
    ab_prev = np.append(1.0, ab[:-1])
    betas = 1 - ab / ab_prev
    post_var = betas * (1 - ab_prev) / (1 - ab)                   # variance of q(x_{t-1} | x_t, x0)
    # post_var is 0 at t = 0: DiT (IDDPM) takes its value at t = 1 there, for both variances
    clipped_log = lambda v: np.log(np.append(post_var[1], v[1:]) if len(ab) > 1 else betas)
    return dict(ab=ab, ab_prev=ab_prev, betas=betas, log_betas=np.log(betas),
                small_logvar=clipped_log(post_var),   # the posterior's: "fixed small" (IDDPM)
                large_logvar=clipped_log(betas),        # "fixed large": DiT's without learn_sigma
                sqrt_ab=np.sqrt(ab), sqrt_1m_ab=np.sqrt(1 - ab),                       # q(x_t | x0)
                sqrt_recip_ab=np.sqrt(1 / ab), sqrt_recipm1_ab=np.sqrt(1 / ab - 1),    # x0 from eps
                coef_x0=betas * np.sqrt(ab_prev) / (1 - ab),                        # posterior mean
                coef_xt=(1 - ab_prev) * np.sqrt(1 - betas) / (1 - ab))


class Diffusion:
    """DDPM on 1000 steps (S7), a Config's recipe (DiT's by default): schedule linear | cosine,
    loss_weight none (DiT's) | min-snr (Hang et al. 2023: step t's MSE counts as the x0 MSE times
    min(SNR(t), gamma): nearly clean steps stop dominating), prediction eps | v."""

    def __init__(self, cfg: Config = None):
        cfg = cfg or Config()
        self.num_timesteps = 1000
        self.loss_weight, self.prediction = cfg.loss_weight, cfg.prediction
        self.alphas_cumprod = alphas_cumprod(cfg.schedule, self.num_timesteps)
        self.tables = schedule(self.alphas_cumprod)
        snr = self.alphas_cumprod / (1 - self.alphas_cumprod)                   # (T,)
        # min-SNR in the target's units: the eps MSE is the x0 MSE times SNR, v's SNR / (SNR + 1)
        self.tables["min_snr_weight"] = (np.minimum(snr, cfg.min_snr_gamma)
                                         / (snr + (cfg.prediction == "v")))
        self.on_device = {}  # (name, device) -> float64 tensor: the schedule moves to a device once

    def _at(self, name, t, x):  # table `name` at t (B,) -> (B, 1, 1, 1) in x's dtype, >= fp32
        key = (name, x.device)
        if key not in self.on_device:
            self.on_device[key] = torch.from_numpy(self.tables[name]).to(x.device)
        dtype = torch.promote_types(x.dtype, torch.float32)
        return self.on_device[key][t].to(dtype).view(-1, *[1] * (x.dim() - 1))

    def q_sample(self, x0, t, noise):
        return self._at("sqrt_ab", t, x0) * x0 + self._at("sqrt_1m_ab", t, x0) * noise

    def target(self, x0, t, noise):
        """What the model predicts: epsilon, or v = sqrt(ab) eps - sqrt(1 - ab) x0."""
        return noise if self.prediction == "eps" else (
            self._at("sqrt_ab", t, x0) * noise - self._at("sqrt_1m_ab", t, x0) * x0)

    def eps_from(self, pred, xt, t):
        """Epsilon from the prediction (B, C, H, W) at x_t, t (B,): itself, or sqrt(ab) v +
        sqrt(1 - ab) x_t."""
        return pred if self.prediction == "eps" else (
            self._at("sqrt_ab", t, xt) * pred + self._at("sqrt_1m_ab", t, xt) * xt)

    def p_step(self, out, xt, t, at, clip_x0=False, variance="small"):
        """p(x_{t-1} | x_t) from the output (B, C or 2C, H, W) at x_t, t (B,); `at`: the tables at
        t, floats or (B, 1, 1, 1). -> epsilon, x0 (clipped if asked), mean, log variance: learned
        (IDDPM: the output in [-1, 1] interpolates log beta and the posterior's), small or large."""
        C = xt.shape[1]
        eps = self.eps_from(out[:, :C], xt, t)
        x0 = at["sqrt_recip_ab"] * xt - at["sqrt_recipm1_ab"] * eps
        if clip_x0:
            x0 = x0.clamp(-1, 1)
            eps = (xt - at["sqrt_ab"] * x0) / at["sqrt_1m_ab"]
        mean = at["coef_x0"] * x0 + at["coef_xt"] * xt
        if out.shape[1] == 2 * C:
            frac = (out[:, C:] + 1) / 2
            logvar = frac * at["log_betas"] + (1 - frac) * at["small_logvar"]
        else:                                                             # x's shape
            logvar = torch.zeros_like(xt) + at[f"{variance}_logvar"]
        return eps, x0, mean, logvar

    def training_losses(self, model, x0, y, plr_weight=0.1, rsl_weight=0.01, balance_weight=0.0,
                        t=None, noise=None):
        """-> (losses, aux): 'loss' to minimise and its terms unweighted: 'mse', 'vb' (learned
        variance), for MoE models the means over layers of 'rsl', 'plr', 'balance' (if weighted)."""
        B, C = x0.shape[:2]
        t = torch.randint(0, self.num_timesteps, (B,), device=x0.device) if t is None else t
        noise = torch.randn_like(x0) if noise is None else noise
        xt = self.q_sample(x0, t, noise)
        out, aux = model(xt, t, y, return_aux=True)
        out = out.to(torch.promote_types(out.dtype, torch.float32))  # bf16 autocast: losses in fp32
        target = self.target(x0, t, noise)                                # (B, C, H, W)
        if self.loss_weight == "none":
            losses = dict(mse=F.mse_loss(out[:, :C], target))
            loss = losses["mse"]
        else:  # min-snr: each sample's MSE weighed by its step's weight; "mse" stays unweighted
            per_sample = ((out[:, :C] - target) ** 2).flatten(1).mean(1)           # (B,)
            losses = dict(mse=per_sample.mean())
            loss = (self._at("min_snr_weight", t, per_sample) * per_sample).mean()
        if out.shape[1] == 2 * C:  # DiT's hybrid loss: the bound trains the variance, not the mean
            frozen = torch.cat([out[:, :C].detach(), out[:, C:]], dim=1)
            losses["vb"] = self.vb(frozen, x0.to(out.dtype), xt.to(out.dtype), t)
        if aux:  # the MoE terms: means over the layers
            losses["rsl"] = sum(rsl_loss(a["logits"], a["mask"]) for a in aux) / len(aux)  # S6
        if aux and balance_weight > 0:
            losses["balance"] = sum(balance_loss(a["logits"], a["mask"]) for a in aux) / len(aux)
        if aux and "plr" in aux[0]:                                                     # S5
            losses["plr"] = plr_loss(aux, target)
        weights = dict(vb=1.0, rsl=rsl_weight, balance=balance_weight, plr=plr_weight)  # + `loss`
        losses["loss"] = sum((weights[k] * v for k, v in losses.items() if k in weights), loss)
        return losses, aux

    def vb(self, out, x0, xt, t):
        """The variational bound's term in bits per dimension, averaged (DiT, IDDPM): KL(q(x_{t-1} |
        x_t, x0) || p(x_{t-1} | x_t)) for t > 0, the decoder's NLL of x0 at t = 0."""
        names = "sqrt_recip_ab sqrt_recipm1_ab coef_x0 coef_xt small_logvar log_betas".split()
        at = {name: self._at(name, t, xt) for name in names}  # p_step's tables, each (B, 1, 1, 1)
        _, _, mean, logvar = self.p_step(out, xt, t, at)
        true_mean, true_logvar = at["coef_x0"] * x0 + at["coef_xt"] * xt, at["small_logvar"]
        kl = 0.5 * (-1 + logvar - true_logvar + (true_logvar - logvar).exp()
                    + (true_mean - mean) ** 2 * (-logvar).exp())
        # the decoder's: 8-bit bins of width 2/255, open-ended at -1 and 1, under the tanh
        # approximation of the normal CDF (IDDPM)
        cdf = lambda z: 0.5 * (1 + torch.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z ** 3)))
        inv, log = torch.exp(-0.5 * logvar), lambda p: p.clamp(min=1e-12).log()
        upper, lower = cdf(inv * (x0 - mean + 1 / 255)), cdf(inv * (x0 - mean - 1 / 255))
        nll = -torch.where(x0 < -0.999, log(upper),
                           torch.where(x0 > 0.999, log(1 - lower), log(upper - lower)))
        per_sample = torch.where(t.view(-1, 1, 1, 1) == 0, nll, kl).flatten(1).mean(1) / math.log(2)
        return per_sample.mean()

    def respaced(self, steps):
        """DiT's respacing (space_timesteps, one section): a stride of (T-1)/(steps-1) accumulated
        in floating point, rounded half to even. Returns (timesteps, their schedule)."""
        if not 1 <= steps <= self.num_timesteps:
            raise ValueError(f"steps must be in 1..{self.num_timesteps}, got {steps}")
        stride = (self.num_timesteps - 1) / max(steps - 1, 1)
        ts = np.array(sorted({round(p) for p in itertools.accumulate([stride] * (steps - 1),
                                                                    initial=0.0)}))
        return ts, schedule(self.alphas_cumprod[ts])

    @torch.no_grad()
    def sample(self, model, y, steps=250, method="ddpm", cfg_scale=1.0, seed=0, first=0,
               clip_x0=False, on_step=None, variance="small", shape=None):
        """Ancestral DDPM or deterministic DDIM on respaced steps for labels y (B,). Sample i's
        noise comes from a CPU generator seeded by (seed, first + i) alone: the same in any batch.
        on_step(i, t, aux) follows each model call; variance: p_step's (S7); shape: the model's."""
        if method not in ("ddpm", "ddim"):
            raise ValueError(f"sampler must be 'ddpm' or 'ddim', got {method!r}")
        shape = shape or (model.cfg.in_channels, model.cfg.input_size, model.cfg.input_size)
        dev, B = y.device, y.shape[0]
        gens = [torch.Generator().manual_seed(seed * 1_000_003 + first + i) for i in range(B)]
        randn = lambda: torch.stack([torch.randn(*shape, generator=g) for g in gens]).to(dev)
        ts, sched = self.respaced(steps)
        x = randn()
        for i in reversed(range(len(ts))):
            at = {name: float(table[i]) for name, table in sched.items()}  # float64 scalars
            t = torch.full((B,), int(ts[i]), device=dev, dtype=torch.long)
            out, aux = (guided_forward(model, x, t, y, cfg_scale) if cfg_scale != 1
                        else model(x, t, y, return_aux=True))
            if on_step is not None:
                on_step(i, int(ts[i]), aux)
            eps, x0, mean, logvar = self.p_step(out.float(), x, t, at, clip_x0, variance)
            if method == "ddim":
                x = math.sqrt(at["ab_prev"]) * x0 + math.sqrt(1 - at["ab_prev"]) * eps
            else:
                x = mean + torch.exp(0.5 * logvar) * randn() if i > 0 else mean
        return x
