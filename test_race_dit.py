"""Tests for race_dit.py (model, routing, losses, diffusion). CPU only, no network."""
import copy
import itertools
import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import race_dit as R
from conftest import batch, randomize_zero_init, tiny
from support.routing import ExpertsByTimestep, routing_stats
from support.runs import count_params

# --------------------------------------------------------------------------------------------------
# Configurations and parameter counts (S1, S2)

def test_dit_xl2_parameter_count_is_exact():
    with torch.device("meta"):
        model = R.RaceDiT(R.make_config("XL/2", learn_sigma=True))
    assert count_params(model) == (675_129_632, 675_129_632)


@pytest.mark.parametrize("name,experts,total,activated", [
    ("B/2", None, 0.127, 0.127), ("B/2", "4in32", 0.531, 0.135), ("M/2", "4in32", 1.106, 0.281),
    ("L/2", "4in32", 1.889, 0.479), ("XL/2", "4in32", 2.788, 0.707), ("XL/2", None, 0.669, 0.669)])
def test_blocks_only_counts_match_paper_table4(name, experts, total, activated):
    with torch.device("meta"):
        model = R.RaceDiT(R.make_config(name, experts))
    tot, act = count_params(model, blocks_only=True)
    # Table 4 rounds inconsistently (M/2 1.10658 -> 1.106, L/2 1.88849 -> 1.889): one unit in the
    # 3rd decimal.
    assert abs(tot / 1e9 - total) < 1e-3 and abs(act / 1e9 - activated) < 1e-3


def test_activated_count_is_router_plus_k_experts():
    cfg = R.make_config("B/2", "4in32")
    with torch.device("meta"):
        tot, act = count_params(R.RaceDiT(cfg), blocks_only=True)
    D, E, k = 768, 32, 4
    assert tot - act == 12 * (E - k) * 2 * D * (4 * D // k)


@pytest.mark.parametrize("kw,msg", [(dict(experts="9in8"), "top-k"),
                                    (dict(input_size=31), "divisible"),
                                    (dict(routing="foo"), "unknown routing"),
                                    (dict(gating="relu"), "gating")])
def test_bad_configurations_raise_clear_errors(kw, msg):
    kw = {**dict(experts="2in8"), **kw}
    with pytest.raises(ValueError, match=msg):
        R.make_config("S/2", kw.pop("experts"), **kw)
    with pytest.raises(ValueError, match="unknown model"):
        R.make_config("Q/2")


# --------------------------------------------------------------------------------------------------
# A dense configuration is the reference DiT: same state_dict names and the same function

def reference_dit(sd, x, t, y, p, heads, depth):
    """DiT's forward written directly from the DiT paper on a state_dict, independent of
    race_dit."""
    B, D = x.shape[0], sd["pos_embed"].shape[-1]
    h = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=p)
    h = h.flatten(2).transpose(1, 2) + sd["pos_embed"]
    freqs = torch.exp(-math.log(10000) * torch.arange(128) / 128)
    temb = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], 1)
    temb = F.silu(F.linear(temb, sd["t_embedder.mlp.0.weight"], sd["t_embedder.mlp.0.bias"]))
    temb = F.linear(temb, sd["t_embedder.mlp.2.weight"], sd["t_embedder.mlp.2.bias"])
    c = F.silu(temb + sd["y_embedder.embedding_table.weight"][y])
    ln = lambda v: F.layer_norm(v, (D,), eps=1e-6)
    for i in range(depth):
        w = lambda n, i=i: (sd[f"blocks.{i}.{n}.weight"], sd[f"blocks.{i}.{n}.bias"])
        mod = F.linear(c, *w("adaLN_modulation.1"))[:, None]
        sa, ca, ga, sm, cm, gm = mod.chunk(6, -1)
        a = ln(h) * (1 + ca) + sa
        q, k, v = F.linear(a, *w("attn.qkv")).reshape(B, -1, 3, heads, D // heads).unbind(2)
        att = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(D // heads), -1)
        o = torch.einsum("bhqk,bkhd->bqhd", att, v).reshape(B, -1, D)
        h = h + ga * F.linear(o, *w("attn.proj"))
        m = ln(h) * (1 + cm) + sm
        h = h + gm * F.linear(F.gelu(F.linear(m, *w("mlp.fc1")), approximate="tanh"), *w("mlp.fc2"))
    shift, scale = F.linear(c, sd["final_layer.adaLN_modulation.1.weight"],
                            sd["final_layer.adaLN_modulation.1.bias"])[:, None].chunk(2, -1)
    final = sd["final_layer.linear.weight"], sd["final_layer.linear.bias"]
    out = F.linear(ln(h) * (1 + scale) + shift, *final)
    G, C = int(math.isqrt(out.shape[1])), out.shape[-1] // (p * p)
    return torch.einsum("nhwpqc->nchpwq", out.reshape(B, G, G, p, p, C)).reshape(B, C, G * p, G * p)


def test_dense_config_loads_reference_dit_state_dict_and_computes_the_same_function():
    D, p, C, G, ncls = 32, 2, 4, 4, 10
    shapes = {"pos_embed": (1, G * G, D),
              "x_embedder.proj.weight": (D, C, p, p), "x_embedder.proj.bias": (D,),
              "t_embedder.mlp.0.weight": (D, 256), "t_embedder.mlp.0.bias": (D,),
              "t_embedder.mlp.2.weight": (D, D), "t_embedder.mlp.2.bias": (D,),
              "y_embedder.embedding_table.weight": (ncls + 1, D),
              "final_layer.linear.weight": (p * p * 2 * C, D),
              "final_layer.linear.bias": (p * p * 2 * C,),
              "final_layer.adaLN_modulation.1.weight": (2 * D, D),
              "final_layer.adaLN_modulation.1.bias": (2 * D,)}
    for i in range(2):
        shapes.update({f"blocks.{i}.attn.qkv.weight": (3 * D, D),
                       f"blocks.{i}.attn.qkv.bias": (3 * D,),
                       f"blocks.{i}.attn.proj.weight": (D, D), f"blocks.{i}.attn.proj.bias": (D,),
                       f"blocks.{i}.mlp.fc1.weight": (4 * D, D),
                       f"blocks.{i}.mlp.fc1.bias": (4 * D,),
                       f"blocks.{i}.mlp.fc2.weight": (D, 4 * D), f"blocks.{i}.mlp.fc2.bias": (D,),
                       f"blocks.{i}.adaLN_modulation.1.weight": (6 * D, D),
                       f"blocks.{i}.adaLN_modulation.1.bias": (6 * D,)})
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(s, generator=g) * 0.2 for k, s in shapes.items()}
    model = R.RaceDiT(R.Config(input_size=G * p, in_channels=C, patch_size=p, depth=2,
                               hidden_size=D, num_heads=4, num_classes=ncls, learn_sigma=True,
                               routing="dense"))
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == shapes
    model.load_state_dict(sd)
    x = torch.randn(3, C, 8, 8, generator=g)
    t, y = torch.tensor([0, 500, 999]), torch.tensor([1, 10, 3])
    with torch.no_grad():
        want = reference_dit(sd, x, t, y, p, 4, 2)
        torch.testing.assert_close(model.eval()(x, t, y), want, atol=1e-5, rtol=1e-5)


def test_pos_embed_layout_is_dits():
    D, G = 16, 3
    emb = R.sincos_pos_embed(D, G)
    omega = 1 / 10000 ** (np.arange(D // 4) / (D // 4))
    for r in range(G):
        for c in range(G):
            want = np.concatenate([np.sin(c * omega), np.cos(c * omega),
                                   np.sin(r * omega), np.cos(r * omega)])
            np.testing.assert_allclose(emb[r * G + c].numpy(), want, atol=1e-6)


@pytest.mark.parametrize("routing", R.CHOICES["routing"])
@pytest.mark.parametrize("learn_sigma", [False, True])
def test_fresh_model_outputs_zeros(routing, learn_sigma):
    cfg = tiny(routing, learn_sigma=learn_sigma)
    out = R.RaceDiT(cfg)(*batch(cfg))
    assert out.shape == (4, cfg.out_channels, 8, 8) and (out == 0).all()


@pytest.mark.parametrize("routing", R.CHOICES["routing"])
def test_an_empty_batch_gives_an_empty_prediction(routing):
    # a process of a split sampling run can get no samples; thresholds route, so that race too
    cfg = tiny(routing)
    model = R.RaceDiT(cfg).eval()
    x, t, y = (v[:0] for v in batch(cfg))
    assert model(x, t, y).shape == (0, cfg.out_channels, 8, 8)


# --------------------------------------------------------------------------------------------------
# Routing (S3): exact counts, ties, and the dispatch against a naive reference

def route(routing, experts="2in8", B=4, L=16, gating="identity", training=True, seed=0):
    cfg = tiny(routing, experts, gating=gating)
    torch.manual_seed(seed)
    layer = R.MoE(cfg).train(training)
    x = torch.randn(B, L, cfg.hidden_size)
    return layer, x, layer(x)


def test_race_selects_exactly_BLk_pairs_with_variable_experts_per_token():
    layer, x, (_, layer_aux) = route("race", "2in8")
    per_token = layer_aux["mask"].sum(-1)                                      # (B, L)
    assert layer_aux["mask"].sum() == 4 * 16 * 2
    assert per_token.min() == 0 and per_token.max() > 2                   # no per-token quota


def test_routing_statistics_under_guidance_count_the_conditional_half_alone():
    g = torch.Generator().manual_seed(0)
    masks = [torch.rand(6, 5, 8, generator=g) < 0.3 for _ in range(3)]    # 3 layers, (2B, L, E)
    collect = ExpertsByTimestep(map_steps=[4], guided=True)
    collect(3, 500, [dict(mask=m) for m in masks])                        # not a kept step
    collect(4, 600, [dict(mask=m) for m in masks])
    want = [sum(int(m[b, i].sum()) for m in masks) / 3 for b in range(3) for i in range(5)]
    assert list(collect.maps) == [600]
    assert collect.maps[600][0].flatten().tolist() == pytest.approx(want)
    # Fig. 6's means: the same three conditional images, each layer's mean experts per token
    per_layer = [m[:3].sum(-1).float().mean().item() for m in masks]
    assert collect.result()["per_layer"] == [pytest.approx([v, v]) for v in per_layer]


def test_race_cutoff_is_kth_largest_score():
    layer, x, (_, layer_aux) = route("race", "2in8")
    scores = layer.scorer(layer.router(x)).flatten().detach()
    assert layer_aux["cutoff"] == scores.sort(descending=True).values[4 * 16 * 2 - 1]


def test_race_selects_exactly_K_pairs_under_ties():
    layer = R.MoE(tiny("race", "2in8"))
    with torch.no_grad():
        layer.scorer.weight.zero_()
        layer.scorer.bias.zero_()                                          # every score equal
    _, layer_aux = layer(torch.randn(3, 16, 32))
    assert layer_aux["mask"].sum() == 3 * 16 * 2


def test_token_choice_gives_exactly_k_per_token():
    _, _, (_, layer_aux) = route("token", "2in8")
    assert (layer_aux["mask"].sum(-1) == 2).all()


def test_expert_choice_gives_exactly_kL_over_E_per_expert_per_image():
    _, _, (_, layer_aux) = route("expert", "2in8")
    assert (layer_aux["mask"].sum(1) == 2 * 16 // 8).all()                    # (B, E)


def test_routing_is_decided_in_fp32_under_bf16_autocast():
    """bf16 logits tie at the race cutoff and at the threshold; the scorer runs in fp32 under
    autocast, the race takes exactly the K largest fp32 scores, the threshold compares fp32 scores,
    and the selection-count matmuls of the losses stay in fp32."""
    torch.manual_seed(0)
    layer = randomize_zero_init(R.MoE(tiny("race", "2in8")), std=0.5)
    x = torch.randn(4, 16, 32)
    with torch.autocast("cpu", torch.bfloat16):
        _, layer_aux = layer(x)
        rsl = R.rsl_loss(layer_aux["logits"], layer_aux["mask"])
    logits = layer_aux["logits"]
    assert logits.dtype == torch.float32
    order = logits.detach().permute(2, 0, 1).flatten().sort(descending=True, stable=True).indices
    want = torch.zeros(logits.numel(), dtype=torch.bool)
    want[order[:4 * 16 * 2]] = True                                     # brute force: the K largest
    assert torch.equal(layer_aux["mask"], want.view(8, 4, 16).permute(1, 2, 0))
    assert torch.equal(rsl, R.rsl_loss(logits, layer_aux["mask"]))        # autocast changes nothing
    layer.eval().threshold.fill_(layer_aux["cutoff"].item())
    with torch.autocast("cpu", torch.bfloat16):
        _, layer_aux = layer(x)                # the same scores: the threshold at the race's cutoff
    race = want.view(8, 4, 16).permute(1, 2, 0)
    assert torch.equal(layer_aux["mask"], race)                           # no tied bin swept in


def reference_moe(layer, x):
    """The MoE from its weights alone, every step written out here: router, scores, gating, the
    selection of each routing, then every expert on every token, masked: sum_e mask * score *
    Expert_e(x). Returns (y, mask)."""
    B, L, _ = x.shape
    E, k, router = layer.E, layer.k, layer.router[0]
    h = F.gelu(x @ router.weight.T + router.bias, approximate="tanh")
    logits = h @ layer.scorer.weight.T + layer.scorer.bias                    # (B, L, E)
    s = dict(identity=logits, softmax=logits.softmax(-1), sigmoid=logits.sigmoid())[layer.gating]
    mask = torch.zeros(B, L, E, dtype=torch.bool)
    if layer.routing == "race" and (layer.training or layer.select_by == "topk"):
        mask = s >= s.flatten().sort(descending=True).values[B * L * k - 1]  # the K best pairs
    elif layer.routing == "race":
        mask = s >= layer.threshold
    elif layer.routing == "token":
        for b, i in itertools.product(range(B), range(L)):
            mask[b, i, s[b, i].argsort(descending=True)[:k]] = True
    else:                                   # expert-choice: each expert's k*L/E best of each image
        for b, e in itertools.product(range(B), range(E)):
            mask[b, s[b, :, e].argsort(descending=True)[:k * L // E], e] = True
    y = sum((mask[..., e] * s[..., e]).unsqueeze(-1)
            * (F.gelu(x @ layer.w1[e], approximate="tanh") @ layer.w2[e]) for e in range(E))
    return y, mask


@pytest.mark.parametrize("routing", ["race", "token", "expert"])
@pytest.mark.parametrize("gating", R.CHOICES["gating"])
@pytest.mark.parametrize("training", [True, False])
def test_dispatch_equals_an_independent_reference_forward_and_gradients(routing, gating, training,
                                                                      monkeypatch):
    """fp32 on CPU, through the grouped GEMM and through the loop over experts."""
    cfg = tiny(routing, "2in8", gating=gating)
    torch.manual_seed(1)
    layer = R.MoE(cfg).train(training)
    layer.threshold.fill_(0.0 if gating == "identity" else 0.2)
    x = torch.randn(3, 16, 32, requires_grad=True)
    want, want_mask = reference_moe(layer, x)
    g = torch.randn_like(want)
    params = [p for n, p in layer.named_parameters() if not n.startswith("plr_head")]
    ref_grads = torch.autograd.grad((want * g).sum(), [x, *params])
    for grouped in (True, False):
        monkeypatch.setattr(R, "use_grouped_mm", lambda *a, grouped=grouped: grouped)
        out, layer_aux = layer(x)
        assert torch.equal(layer_aux["mask"], want_mask)
        torch.testing.assert_close(out, want)
        for got, ref in zip(torch.autograd.grad((out * g).sum(), [x, *params]), ref_grads):
            torch.testing.assert_close(got, ref)


class DtypesOf(TorchFunctionMode):
    """Records the dtype of the tensor each call of the named functions reads or adds into."""

    def __init__(self, names):
        super().__init__()
        self.names, self.seen = names, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.names:
            self.seen.append((name, args[0].dtype))
        return func(*args, **(kwargs or {}))


def test_under_bf16_autocast_the_dispatch_gathers_and_combines_in_fp32():
    """The combine adds a token's k (up to E) expert outputs in fp32 and rounds once (bf16
    atomics on CUDA round after every add); the gather reads the fp32 input, so that its backward
    adds the k gradients into fp32 too. The experts themselves run in bf16."""
    cfg = tiny("race", "8in8", granularity=8)                     # every token takes every expert
    layer, x = R.MoE(cfg), torch.randn(2, 16, 32, requires_grad=True)
    with torch.autocast("cpu", torch.bfloat16), DtypesOf({"index_select", "index_add_"}) as mode:
        y, layer_aux = layer(x)
    assert layer_aux["mask"].all() and y.dtype == torch.bfloat16
    assert ("index_add_", torch.float32) in mode.seen and ("index_select", torch.float32) in \
        mode.seen and all(dtype == torch.float32 for _, dtype in mode.seen)
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32


def test_grouped_mm_only_where_it_has_its_fast_path():
    cuda, cpu, bf16 = torch.device("cuda", 0), torch.device("cpu"), torch.bfloat16
    assert R.use_grouped_mm(cuda, bf16, capability=(9, 0))
    assert R.use_grouped_mm(cpu, torch.float32) and R.use_grouped_mm(cpu, bf16)
    assert R.use_grouped_mm(cpu, bf16, compiling=True)
    assert not R.use_grouped_mm(cpu, torch.float32, compiling=True)       # torch.compile: bf16 only
    for device, dtype, cap in [(cuda, bf16, (8, 0)), (cuda, bf16, (10, 0)), (cuda, bf16, (12, 0)),
                               (cuda, torch.float32, (9, 0)), (cpu, torch.float64, None)]:
        assert not R.use_grouped_mm(device, dtype, capability=cap), (device, dtype, cap)


def test_compiled_training_step_equals_eager():
    """torch.compile traces with shape functions (aot_eager: the tracing of train.py --compile
    without code generation); in fp32 on a CPU the experts run as the loop: grouped_mm's accepts
    bf16 only."""
    cfg = tiny("race", "2in8", learn_sigma=True)
    diffusion, (x0, _, y) = R.Diffusion(), batch(cfg)
    t = torch.randint(0, 1000, (4,), generator=torch.Generator().manual_seed(1))
    noise = torch.randn_like(x0)
    runs = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = randomize_zero_init(R.RaceDiT(cfg))
        net = torch.compile(model, backend="aot_eager") if compiled else model
        losses, _ = diffusion.training_losses(net, x0, y, t=t, noise=noise)
        losses["loss"].backward()
        runs.append((losses, [p.grad for p in model.parameters() if p.requires_grad]))
    torch.testing.assert_close(runs[1], runs[0])


def test_a_compiled_recomputed_bf16_training_forward_is_one_graph():
    """torch.compile(fullgraph=True) of the model's training forward with --recompute under bf16
    autocast, where the experts run as one grouped GEMM: a host synchronisation (.item(),
    .tolist(), nonzero) would break the graph, and fullgraph makes a break an error."""
    cfg = tiny("race", "2in8", learn_sigma=True)
    model = R.RaceDiT(cfg)
    model.recompute = True
    x, t, y = batch(cfg)
    with torch.autocast("cpu", torch.bfloat16):
        assert R.use_grouped_mm(x.device, torch.bfloat16, compiling=True)
        out, aux = torch.compile(model, backend="aot_eager", fullgraph=True)(x, t, y,
                                                                             return_aux=True)
    assert out.isfinite().all() and len(aux) == cfg.depth


def test_grouped_gemm_path_equals_loop_path():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 8, generator=g, requires_grad=True)
    w = torch.randn(4, 8, 16, generator=g, requires_grad=True)
    ends = torch.tensor([3, 3, 7, 10])                                    # expert 1 gets no rows
    a = R.grouped_matmul(x, w, ends, grouped=True)
    b = R.grouped_matmul(x, w, ends, grouped=False)
    torch.testing.assert_close(a, b)
    ga = torch.autograd.grad(a, (x, w), torch.ones_like(a).contiguous())
    gb = torch.autograd.grad(b, (x, w), torch.ones_like(b))
    for u, v in zip(ga, gb):
        torch.testing.assert_close(u, v)


@pytest.mark.parametrize("routing", ["race", "token", "expert"])
def test_a_training_step_reads_no_tensor_back_to_the_host(routing, monkeypatch):
    """The CPU stand-in for torch.cuda.set_sync_debug_mode("error") (gpu_check.py runs that on a
    GPU): forward and backward of a training step, with and without recomputation, never read a
    tensor's value into Python; the loop over experts does (its group sizes), which is why the GPU
    chooser avoids it."""
    cfg = tiny(routing, "2in8", learn_sigma=True)
    model, diffusion, (x0, _, y) = R.RaceDiT(cfg), R.Diffusion(), batch(cfg)
    diffusion.training_losses(model, x0, y)                       # moves the schedule to the device

    def host_read(*args, **kwargs):
        raise AssertionError("a tensor was read on the host")
    for name in ("item", "tolist", "numpy", "cpu", "nonzero", "__bool__", "__int__", "__float__",
                 "__index__"):
        monkeypatch.setattr(torch.Tensor, name, host_read)
    for recompute in (False, True):
        model.recompute = recompute
        losses, _ = diffusion.training_losses(model, x0, y)
        losses["loss"].backward()
    monkeypatch.setattr(R, "use_grouped_mm", lambda *args: False)
    with pytest.raises(AssertionError, match="read on the host"):
        diffusion.training_losses(model, x0, y)


# --------------------------------------------------------------------------------------------------
# Inference threshold (S4)

@pytest.mark.parametrize("recompute", [False, True])
def test_threshold_is_ema_of_cutoff_updated_once_per_training_step(recompute):
    cfg = tiny("race", "2in8", threshold_decay=0.9)
    model, diffusion = randomize_zero_init(R.RaceDiT(cfg)), R.Diffusion()
    model.recompute = recompute       # backward recomputes each block: no second update
    cuts = []
    for seed in range(3):
        x0, _, y = batch(cfg, seed=seed)
        losses, aux = diffusion.training_losses(model, x0, y)
        losses["loss"].backward()
        cuts.append(torch.stack([a["cutoff"] for a in aux]))           # (layers,)
    want = cuts[0]
    for c in cuts[1:]:
        want = 0.9 * want + 0.1 * c
    torch.testing.assert_close(torch.stack([m.threshold for m in model.moe_layers()]), want.float())
    assert all(m.threshold_updates == 3 for m in model.moe_layers())


def test_activation_recomputation_gives_the_same_losses_and_gradients_and_saves_less():
    cfg = tiny("race", "2in8", learn_sigma=True)
    diffusion, x0, _, y = R.Diffusion(), *batch(cfg)
    t = torch.randint(0, 1000, (4,), generator=torch.Generator().manual_seed(1))
    noise = torch.randn_like(x0)
    runs = []
    for recompute in (False, True):
        torch.manual_seed(0)                                            # weights and label dropout
        model = randomize_zero_init(R.RaceDiT(cfg))
        model.recompute = recompute
        saved = []
        def pack(v, saved=saved):
            saved.append(v.nbytes)
            return v
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda v: v):
            losses, _ = diffusion.training_losses(model, x0, y, t=t, noise=noise)
        losses["loss"].backward()
        runs.append((losses, [p.grad for p in model.parameters() if p.requires_grad], sum(saved)))
    (l0, g0, s0), (l1, g1, s1) = runs
    torch.testing.assert_close(l1, l0, rtol=0, atol=0)
    torch.testing.assert_close(g1, g0, rtol=0, atol=0)
    assert s1 < s0 / 2, (s1, s0)


def test_eval_threshold_routing_is_batch_invariant_and_topk_is_not():
    cfg = tiny("race", "2in8")
    model = randomize_zero_init(R.RaceDiT(cfg))
    for m in model.moe_layers():
        m.threshold.fill_(0.05)
    model.eval()
    (xa, ta, ya), (xb, tb, yb) = batch(cfg, 3, seed=1), batch(cfg, 5, seed=2)
    cat = torch.cat([xa, xb]), torch.cat([ta, tb]), torch.cat([ya, yb])
    with torch.no_grad():
        torch.testing.assert_close(model(*cat)[:3], model(xa, ta, ya), rtol=1e-5, atol=1e-6)
        R.set_select_by(model, "topk")
        assert not torch.allclose(model(*cat)[:3], model(xa, ta, ya), rtol=1e-5, atol=1e-6)


def overfit(cfg, steps, images=8, lr=1e-3, seed=0, **loss_kw):
    torch.manual_seed(seed)
    model, diffusion = R.RaceDiT(cfg), R.Diffusion()
    x0, _, y = batch(cfg, images, seed=seed)
    x0 = x0.clamp(-1, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0)
    for _ in range(steps):
        losses, _ = diffusion.training_losses(model, x0, y, **loss_kw)
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
    return model, diffusion, x0, y


def mean_experts_per_token(model, diffusion, x0, y, seed):
    g = torch.Generator().manual_seed(seed)
    x0, y = x0.repeat(4, 1, 1, 1), y.repeat(4)
    t = torch.randint(0, 1000, (len(x0),), generator=g)
    model.eval()
    with torch.no_grad():
        xt = diffusion.q_sample(x0, t, torch.randn(x0.shape, generator=g))
        _, aux = model(xt, t, y, return_aux=True)
    return routing_stats(aux)["experts_per_token"]


def test_threshold_activates_about_k_experts_and_calibration_restores_a_perturbed_copy():
    cfg = tiny("race", "2in8", threshold_decay=0.9)
    model, diffusion, x0, y = overfit(cfg, 120)
    k = cfg.top_k
    assert abs(mean_experts_per_token(model, diffusion, x0, y, seed=5) - k) < 0.15 * k
    other = copy.deepcopy(model)
    with torch.no_grad():
        for m in other.moe_layers():
            m.scorer.bias += 0.5                              # shifts every logit: stale thresholds
    assert abs(mean_experts_per_token(other, diffusion, x0, y, seed=5) - k) > 0.15 * k
    R.calibrate_thresholds(other, diffusion, [(x0.repeat(4, 1, 1, 1), y.repeat(4))] * 8)
    assert abs(mean_experts_per_token(other, diffusion, x0, y, seed=5) - k) < 0.15 * k
    assert not other.training and other.moe_layers()[0].select_by == "threshold"     # mode restored


# --------------------------------------------------------------------------------------------------
# Auxiliary losses (S5, S6) and statistics

def test_rsl_is_one_for_uniform_routing_and_higher_for_collapsed_pairs():
    E, N = 4, 12
    logits = torch.zeros(N, E)                                            # P uniform
    pairs = [(0, 1), (2, 3), (0, 2), (1, 3), (0, 3), (1, 2)]              # every pair equally often
    uniform = torch.zeros(N, E, dtype=torch.bool)
    for n in range(N):
        uniform[n, list(pairs[n % 6])] = True
    assert R.rsl_loss(logits, uniform).item() == pytest.approx(1.0)
    collapsed = torch.zeros(N, E, dtype=torch.bool)
    collapsed[: N // 2, [0, 1]] = True
    collapsed[N // 2:, [2, 3]] = True                                  # a 2-in-4 acting like 1-in-2
    peaked = torch.where(collapsed, 3.0, 0.0)                     # router that follows the collapse
    assert R.rsl_loss(peaked, collapsed) > R.rsl_loss(peaked, uniform) + 0.1
    one = torch.zeros(N, E, dtype=torch.bool)
    one[torch.arange(N), torch.arange(N) % E] = True             # k = 1: no pairs, no division by 0
    assert R.rsl_loss(logits, one).item() == pytest.approx(1 / E)


def test_rsl_gradient_reaches_only_the_router():
    layer = R.MoE(tiny("race", "2in8"))
    x = torch.randn(4, 16, 32, requires_grad=True)
    _, layer_aux = layer(x)
    R.rsl_loss(layer_aux["logits"], layer_aux["mask"]).backward()
    for name, p in layer.named_parameters():
        touched = p.grad is not None and p.grad.abs().sum() > 0
        # not the experts nor the PLR head
        assert touched == name.startswith(("router", "scorer")), name
    assert x.grad.abs().sum() > 0                                       # through the router's input


def test_plr_gradient_reaches_every_layers_router():
    cfg = tiny("race", "2in8", depth=3)
    model = R.RaceDiT(cfg).train()
    x, t, y = batch(cfg)
    _, aux = model(x, t, y, return_aux=True)
    assert aux[0]["plr"].shape == x.shape                            # image layout, like the target
    R.plr_loss(aux, torch.randn_like(x)).backward()
    for m in model.moe_layers():
        assert m.router[0].weight.grad.abs().sum() > 0 and m.plr_head.weight.grad.abs().sum() > 0


def test_a_zero_initialised_plr_head_trains_itself_first():
    """plr_init="zero": every head predicts 0 at first, so PLR's first gradient reaches the heads
    but not the routers (the head's weights multiply the router's share); xavier reaches both."""
    for init, router_touched in (("zero", False), ("xavier", True)):
        model = R.RaceDiT(tiny("race", "2in8", depth=2, plr_init=init)).train()
        x, t, y = batch(model.cfg)
        _, aux = model(x, t, y, return_aux=True)
        target = torch.randn_like(x)
        loss = R.plr_loss(aux, target)
        if init == "zero":
            assert all((a["plr"] == 0).all() for a in aux)
            torch.testing.assert_close(loss, (target ** 2).mean())
        loss.backward()
        for m in model.moe_layers():
            assert m.plr_head.weight.grad.abs().sum() > 0
            assert (m.router[0].weight.grad.abs().sum() > 0) == router_touched


def test_loss_weights_zero_turn_terms_off():
    cfg = tiny("race", "2in8")
    model = R.RaceDiT(cfg)
    x, t, y = batch(cfg)
    noise = torch.randn_like(x)
    losses, _ = R.Diffusion().training_losses(model, x, y, plr_weight=0, rsl_weight=0,
                                              t=t, noise=noise)
    assert losses["loss"] == losses["mse"] and losses["plr"] > 0 and losses["rsl"] > 0
    full, _ = R.Diffusion().training_losses(model, x, y, plr_weight=0.1, rsl_weight=0.01,
                                            t=t, noise=noise)
    torch.testing.assert_close(full["loss"], full["mse"] + 0.1 * full["plr"] + 0.01 * full["rsl"])


def test_routing_stats_on_a_known_mask():
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)                         # 4 tokens, 4 experts
    mask[0, :, 0] = True                                                  # expert 0 on every token
    mask[0, 0, 1] = mask[0, 1, 1] = mask[0, 2, 2] = True                  # pairs (0,1) x2, (0,2) x1
    s = routing_stats([dict(mask=mask)], t=torch.tensor([999]))
    assert s["layers"][0]["load"] == [4, 2, 1, 0]
    assert s["max_vio"] == pytest.approx((4 - 7 / 4) / (7 / 4))
    assert s["comb_usage"] == pytest.approx(100 * 2 / 6)                 # both pairs needed for 95%
    assert s["experts_per_token"] == pytest.approx(7 / 4)
    assert s["experts_per_token_by_t"] == {"900-999": pytest.approx(7 / 4)}


# --------------------------------------------------------------------------------------------------
# Diffusion (S7)

def test_guidance_refuses_a_model_without_a_null_class():
    model = R.RaceDiT(tiny("race", "2in8", class_dropout_prob=0.0)).eval()   # no null class row
    x, t, y = batch(model.cfg)
    with pytest.raises(ValueError, match="trained with label dropout"):
        R.guided_forward(model, x, t, y, 2.0)


def test_the_balance_loss_is_computed_only_where_it_is_weighted():
    model = R.RaceDiT(tiny("token", "2in8"))
    x, t, y = batch(model.cfg)
    plain, _ = R.Diffusion().training_losses(model, x, y, t=t)
    torch.manual_seed(0)
    weighted, _ = R.Diffusion().training_losses(model, x, y, balance_weight=0.5, t=t)
    assert "balance" not in plain and weighted["balance"] > 0
    torch.testing.assert_close(weighted["loss"], weighted["mse"] + 0.1 * weighted["plr"]
                               + 0.01 * weighted["rsl"] + 0.5 * weighted["balance"])


def test_guidance_scale_one_equals_conditional_prediction():
    cfg = tiny("race", "2in8", learn_sigma=True)
    model = randomize_zero_init(R.RaceDiT(cfg)).eval()
    x, t, y = batch(cfg)
    with torch.no_grad():
        out, _ = R.guided_forward(model, x, t, y, 1.0)
        torch.testing.assert_close(out, model(x, t, y), rtol=1e-5, atol=1e-6)
        out4, _ = R.guided_forward(model, x, t, y, 4.0)
        assert not torch.allclose(out4[:, :3], out[:, :3]) and torch.equal(out4[:, 3:], out[:, 3:])


@pytest.mark.parametrize("method", ["ddpm", "ddim"])
def test_samplers_are_deterministic_and_batch_independent(method):
    torch.manual_seed(0)       # weights independent of the tests before (no pair near a threshold)
    cfg = tiny("race", "2in8")
    model = randomize_zero_init(R.RaceDiT(cfg)).eval()
    d = R.Diffusion()
    y = torch.tensor([0, 1, 2])
    a = d.sample(model, y, 5, method, cfg_scale=2.0, seed=1)
    b = d.sample(model, y, 5, method, cfg_scale=2.0, seed=1)
    c = d.sample(model, y[1:2], 5, method, cfg_scale=2.0, seed=1, first=1)   # sample 1 alone
    assert torch.equal(a, b) and a.isfinite().all() and a.shape == (3, 3, 8, 8)
    torch.testing.assert_close(c, a[1:2], rtol=1e-4, atol=1e-5)
    assert not torch.equal(d.sample(model, y, 5, method, cfg_scale=2.0, seed=2), a)


class GaussianOracle(torch.nn.Module):
    """The exact predictor for data x0 ~ N(0, s^2), with a = sqrt(ab), b = sqrt(1 - ab):
    E[eps | x_t] = b x_t / (a^2 s^2 + b^2), E[x0 | x_t] = a s^2 x_t / (a^2 s^2 + b^2), and
    E[v | x_t] = a E[eps | x_t] - b E[x0 | x_t]."""

    def __init__(self, s, diffusion, prediction="eps"):
        super().__init__()
        self.s, self.ab = s, torch.tensor(diffusion.alphas_cumprod, dtype=torch.float32)
        self.prediction = prediction

    def forward(self, x, t, y, return_aux=False):
        a, b = self.ab[t].view(-1, 1, 1, 1).sqrt(), (1 - self.ab[t].view(-1, 1, 1, 1)).sqrt()
        eps, x0 = b * x / (a ** 2 * self.s ** 2 + b ** 2), a * self.s ** 2 * x / (
            a ** 2 * self.s ** 2 + b ** 2)
        return (eps if self.prediction == "eps" else a * eps - b * x0), []


@pytest.mark.parametrize("schedule,prediction", [("linear", "eps"), ("cosine", "eps"),
                                                 ("cosine", "v")])
@pytest.mark.parametrize("method,steps", [("ddpm", 1000), ("ddim", 250)])
def test_samplers_with_the_exact_denoiser_reproduce_gaussian_data(method, steps, schedule,
                                                                  prediction):
    torch.manual_seed(0)
    d = R.Diffusion(R.Config(schedule=schedule, prediction=prediction))
    y = torch.zeros(64, dtype=torch.long)
    x = d.sample(GaussianOracle(0.5, d, prediction), y, steps, method, shape=(1, 16, 16))
    assert x.std().item() == pytest.approx(0.5, rel=0.02) and abs(x.mean().item()) < 0.01


def test_fixed_large_variance_is_dits_and_samples_the_gaussian():
    """variance="large": DiT's learn_sigma=False variance (IDDPM's fixed large), beta_t with the
    posterior's at t = 0, as its GaussianDiffusion builds it from the betas."""
    d = R.Diffusion()
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    ab = np.cumprod(1 - betas)
    ab_prev = np.append(1.0, ab[:-1])
    posterior = betas * (1 - ab_prev) / (1 - ab)
    np.testing.assert_allclose(d.tables["large_logvar"], np.log(np.append(posterior[1], betas[1:])),
                               rtol=1e-9)
    torch.manual_seed(0)
    y = torch.zeros(64, dtype=torch.long)
    x = d.sample(GaussianOracle(0.5, d), y, 250, "ddpm", shape=(1, 16, 16), variance="large")
    assert x.std().item() == pytest.approx(0.5, rel=0.02) and abs(x.mean().item()) < 0.01


def iddpm_cosine_alphas_cumprod(T=1000, s=0.008):
    """IDDPM's cosine schedule (Nichol & Dhariwal 2021, eq. 17) as its betas_for_alpha_bar builds
    it, one step at a time: beta_i = min(1 - f((i+1)/T) / f(i/T), 0.999),
    f(u) = cos((u + s) / (1 + s) * pi / 2)^2."""
    f = lambda u: math.cos((u + s) / (1 + s) * math.pi / 2) ** 2
    ab, out = 1.0, []
    for i in range(T):
        ab *= 1 - min(1 - f((i + 1) / T) / f(i / T), 0.999)
        out.append(ab)
    return np.array(out)


def test_the_cosine_schedule_is_iddpms_and_keeps_more_steps_at_a_readable_snr():
    d = R.Diffusion(R.Config(schedule="cosine"))
    np.testing.assert_allclose(d.alphas_cumprod, iddpm_cosine_alphas_cumprod(), rtol=1e-10)
    assert d.tables["betas"][-1] == pytest.approx(0.999)                 # the clip binds at the end
    snr = lambda ab: ab / (1 - ab)
    below = lambda d, level: (snr(d.alphas_cumprod) < level).mean()
    # steps at an SNR below 0.1: about half of the linear schedule's, a fifth of the cosine one's
    assert below(R.Diffusion(), 0.1) == pytest.approx(0.5, abs=0.03)
    assert below(d, 0.1) == pytest.approx(0.2, abs=0.03)


class FixedOutput(torch.nn.Module):
    """A stand-in model whose prediction is a given tensor, whatever its input."""

    def __init__(self, out):
        super().__init__()
        self.out = out

    def forward(self, x, t, y, return_aux=False):
        return self.out, []


def test_min_snr_weighs_each_samples_mse_by_its_hand_computed_snr():
    t = torch.tensor([0, 10, 300, 999])
    g = torch.Generator().manual_seed(0)
    x0, noise, out = (torch.randn(4, 3, 4, 4, generator=g) for _ in range(3))
    per_sample = ((out - noise) ** 2).mean((1, 2, 3)).double()
    # DiT's betas written out: beta_i = 1e-4 + i (0.02 - 1e-4) / 999; SNR = ab / (1 - ab)
    ab = [math.prod(1 - (1e-4 + i * (0.02 - 1e-4) / 999) for i in range(s + 1)) for s in t]
    snr = torch.tensor([a / (1 - a) for a in ab], dtype=torch.float64)
    weights = snr.clamp(max=5) / snr                    # 5e-4 at t = 0 (SNR 1e4), 1 where SNR < 5
    assert weights[0] == pytest.approx(5 / 9999) and weights[-1] == 1
    losses, _ = R.Diffusion(R.Config(loss_weight="min-snr")).training_losses(
        FixedOutput(out), x0, None, t=t, noise=noise)
    assert losses["loss"].item() == pytest.approx((weights * per_sample).mean().item(), rel=1e-6)
    assert losses["mse"].item() == pytest.approx(per_sample.mean().item(), rel=1e-6)  # unweighted
    plain, _ = R.Diffusion().training_losses(FixedOutput(out), x0, None, t=t, noise=noise)
    assert plain["loss"].item() == pytest.approx(per_sample.mean().item(), rel=1e-6)
    # v-prediction: the target is sqrt(ab) eps - sqrt(1 - ab) x0, its weight min(SNR, 5) / (SNR + 1)
    a, b = (torch.tensor(v, dtype=torch.float64).view(-1, 1, 1, 1) ** 0.5
            for v in (ab, [1 - v for v in ab]))
    per_sample_v = ((out - (a * noise - b * x0)) ** 2).mean((1, 2, 3))
    v_losses, _ = R.Diffusion(R.Config(loss_weight="min-snr", prediction="v")).training_losses(
        FixedOutput(out), x0, None, t=t, noise=noise)
    assert v_losses["mse"].item() == pytest.approx(per_sample_v.mean().item(), rel=1e-6)
    weights_v = snr.clamp(max=5) / (snr + 1)
    assert v_losses["loss"].item() == pytest.approx((weights_v * per_sample_v).mean().item(),
                                                    rel=1e-6)


def test_a_config_without_diffusion_fields_keeps_dits_diffusion():
    old = {k: v for k, v in dataclasses.asdict(tiny()).items()
           if k not in ("schedule", "loss_weight", "min_snr_gamma", "prediction")}  # an old one
    d = R.Diffusion(R.Config(**old))
    assert (d.loss_weight, d.prediction) == ("none", "eps")
    np.testing.assert_array_equal(d.alphas_cumprod, R.Diffusion().alphas_cumprod)
    with pytest.raises(ValueError, match="unknown schedule"):
        tiny(schedule="sigmoid")


# DiT's space_timesteps(1000, [n]) written out: a stride of 999 / (n - 1) rounded half to even, so
# 499.5 -> 500, 166.5 -> 166, 832.5 -> 832, 55.5 -> 56, 624.375 -> 624 (strides exact in binary).
DIT_TIMESTEPS = {
    1: [0], 2: [0, 999], 3: [0, 500, 999], 4: [0, 333, 666, 999], 5: [0, 250, 500, 749, 999],
    7: [0, 166, 333, 500, 666, 832, 999], 9: [0, 125, 250, 375, 500, 624, 749, 874, 999],
    10: [0, 111, 222, 333, 444, 555, 666, 777, 888, 999],
    19: [0, 56, 111, 166, 222, 278, 333, 388, 444, 500, 555, 610, 666, 722, 777, 832, 888, 944,
         999],
    25: [0, 42, 83, 125, 166, 208, 250, 291, 333, 375, 416, 458, 500, 541, 583, 624, 666, 708, 749,
         791, 832, 874, 916, 957, 999]}


def test_respacing_equals_dits_timesteps_and_keeps_every_count():
    d = R.Diffusion()
    for steps, want in DIT_TIMESTEPS.items():
        assert list(d.respaced(steps)[0]) == want, steps
    for steps in range(2, 1001):                                     # every count: n distinct steps
        ts = d.respaced(steps)[0]
        assert len(ts) == steps and ts[0] == 0 and ts[-1] == 999 and (np.diff(ts) > 0).all(), steps
    ts, sched = d.respaced(1000)
    assert list(ts) == list(range(1000))
    np.testing.assert_allclose(sched["betas"], np.linspace(1e-4, 0.02, 1000))


def test_q_sample_takes_square_roots_in_float64_as_dit():
    """DiT's _extract_into_tensor: sqrt(ab) and sqrt(1 - ab) computed in float64, then cast; a bf16
    input still gets noise at t = 0, where 1 - ab is 1e-4."""
    ab = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64))
    a, b = (torch.from_numpy(v).float().view(-1, 1, 1, 1) for v in (np.sqrt(ab), np.sqrt(1 - ab)))
    t = torch.arange(1000)
    x0, noise = torch.randn(1000, 2, 3, 3), torch.randn(1000, 2, 3, 3)
    assert torch.equal(R.Diffusion().q_sample(x0, t, noise), a * x0 + b * noise)
    x0, noise = x0[:1].bfloat16(), noise[:1].bfloat16()
    xt = R.Diffusion().q_sample(x0, t[:1], noise)
    assert xt.dtype == torch.float32
    torch.testing.assert_close(xt - a[0] * x0.float(), b[0] * noise.float())  # 0.01 * noise, not 0


def reference_vb(out, x0, xt, t, betas):
    """IDDPM's variational-bound term, written from the paper's formulas in float64: KL between
    Gaussians for t > 0 and the discretized-Gaussian decoder NLL at t = 0, in bits per dimension,
    mean over batch."""
    C = x0.shape[1]
    alphas = 1 - betas
    ab = torch.cumprod(alphas, 0)
    ab_prev = torch.cat([torch.ones(1, dtype=ab.dtype), ab[:-1]])
    post_var = betas * (1 - ab_prev) / (1 - ab)
    post_log = torch.log(torch.cat([post_var[1:2], post_var[1:]]))
    g = lambda a: a[t].view(-1, 1, 1, 1)
    eps, v = out[:, :C].detach(), out[:, C:]
    x0_hat = torch.sqrt(1 / g(ab)) * xt - torch.sqrt(1 / g(ab) - 1) * eps
    coef1 = g(betas) * torch.sqrt(g(ab_prev)) / (1 - g(ab))
    coef2 = (1 - g(ab_prev)) * torch.sqrt(g(alphas)) / (1 - g(ab))
    mu_q, mu_p = coef1 * x0 + coef2 * xt, coef1 * x0_hat + coef2 * xt
    frac = (v + 1) / 2
    log_p = frac * torch.log(g(betas)) + (1 - frac) * g(post_log)
    kl = 0.5 * (-1.0 + log_p - g(post_log) + torch.exp(g(post_log) - log_p)
                + (mu_q - mu_p) ** 2 * torch.exp(-log_p))
    phi = lambda z: 0.5 * (1.0 + torch.tanh((2.0 / math.pi) ** 0.5 * (z + 0.044715 * z ** 3)))
    sd = torch.exp(0.5 * log_p)
    hi, lo = phi((x0 - mu_p + 1 / 255) / sd), phi((x0 - mu_p - 1 / 255) / sd)
    logp = torch.where(x0 < -0.999, torch.log(hi.clamp(min=1e-12)),
                       torch.where(x0 > 0.999, torch.log((1 - lo).clamp(min=1e-12)),
                                   torch.log((hi - lo).clamp(min=1e-12))))
    bits = torch.where(t.view(-1, 1, 1, 1) == 0, -logp, kl).mean(dim=(1, 2, 3)) / math.log(2.0)
    return bits.mean()


def test_learned_sigma_hybrid_loss_and_gradients_equal_the_reference():
    cfg = tiny("race", "2in8", learn_sigma=True, class_dropout_prob=0.0)
    model = randomize_zero_init(R.RaceDiT(cfg)).double()
    x0, _, y = batch(cfg, 6, seed=3)
    x0 = x0.double().clamp(-1, 1)
    x0[0, 0, 0, :2] = torch.tensor([-1.0, 1.0])                        # the open-ended decoder bins
    t, noise = torch.tensor([0, 0, 1, 10, 500, 999]), torch.randn_like(x0)
    d = R.Diffusion()
    losses, _ = d.training_losses(model, x0, y, plr_weight=0, rsl_weight=0, t=t, noise=noise)
    assert losses["vb"] > 0
    params = lambda m: [p for p in m.parameters() if p.requires_grad]
    grads = torch.autograd.grad(losses["loss"], params(model), allow_unused=True)
    ref_model = copy.deepcopy(model)
    xt = d.q_sample(x0, t, noise)
    out = ref_model(xt, t, y)
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    ref = F.mse_loss(out[:, :3], noise) + reference_vb(out, x0, xt, t, betas)
    torch.testing.assert_close(losses["loss"], ref)
    ref_grads = torch.autograd.grad(ref, params(ref_model), allow_unused=True)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    for name, p, a, b in zip(names, params(model), grads, ref_grads):
        zero = torch.zeros_like(p)                                # the PLR head: 0 * plr, or unused
        torch.testing.assert_close(zero if a is None else a, zero if b is None else b, msg=name)


def test_vb_trains_only_the_variance_channels():
    cfg = tiny("dense", learn_sigma=True)
    model = randomize_zero_init(R.RaceDiT(cfg))
    x0, t, y = batch(cfg)
    losses, _ = R.Diffusion().training_losses(model, x0.clamp(-1, 1), y, t=t)
    w = model.final_layer.linear.weight                                 # rows: (p, p, 2C) per token
    per_channel = torch.autograd.grad(losses["vb"], w)[0].view(4, 6, -1).abs().sum((0, 2))   # (2C,)
    assert (per_channel[:3] == 0).all() and (per_channel[3:] > 0).all()  # eps channels: no gradient


def test_tiny_race_dit_overfits_a_handful_of_images():
    cfg = tiny("race", "2in8")
    d = R.Diffusion()
    x0, _, y = batch(cfg, 8)
    g = torch.Generator().manual_seed(3)
    t = torch.randint(0, 1000, (64,), generator=g)
    noise = torch.randn(64, *x0.shape[1:], generator=g)

    def held_loss(model):
        model.eval()
        with torch.no_grad():
            x = x0.clamp(-1, 1).repeat(8, 1, 1, 1)
            return d.training_losses(model, x, y.repeat(8), t=t, noise=noise)[0]["mse"]
    before = held_loss(R.RaceDiT(cfg))
    model, *_ = overfit(cfg, 300, lr=2e-3)
    after = held_loss(model)
    assert after < 0.5 * before, (before, after)


