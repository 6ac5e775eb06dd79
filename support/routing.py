"""
Routing statistics of a Race-DiT: what the MoE layers' selections (the `mask` of each layer's aux,
(B, L, E)) say about where compute goes. They measure a model rather than define it, so they live
in support/, not in race_dit.py: train.py logs them, sample.py draws them (Fig. 6, routing maps),
the benchmarks compare them.
"""
import torch


def experts_by_layer(aux):
    """Experts each token uses in each MoE layer, (layers, B, L)."""
    return torch.stack([a["mask"].float().sum(-1) for a in aux])


def experts_per_token(aux):
    """Experts per token averaged over the MoE layers, (B, L): where the routing sends compute."""
    return experts_by_layer(aux).mean(0)


def experts_per_image(aux):
    """Mean experts per token of each image in each MoE layer, (layers, B): the quantity of the
    paper's Fig. 6. Training logs bin it by timestep; sample.py averages it at every sampling
    step."""
    return experts_by_layer(aux).mean(-1)


class ExpertsByTimestep:
    """Diffusion.sample's on_step callback: mean experts per token of each layer at each sampling
    timestep (Fig. 6). Sums stay on the device, so collecting them adds no host synchronisation.
    At the step indices `map_steps` it also keeps each image's experts per token, maps[t]: a list
    of (B, L), one per batch. Under guidance both count the conditional half of the batch (which
    comes first): the images asked for, not their unconditional twins."""

    def __init__(self, map_steps=(), guided=False):
        self.sums, self.counts, self.maps = {}, {}, {}
        self.map_steps, self.guided = set(map_steps), guided

    def __call__(self, i, t, aux):
        if aux:
            aux = [{"mask": a["mask"].chunk(2)[0]} for a in aux] if self.guided else aux
            self.sums[t] = self.sums.get(t, 0) + experts_per_image(aux).mean(1)    # (layers,)
            self.counts[t] = self.counts.get(t, 0) + 1
            if i in self.map_steps:
                self.maps.setdefault(t, []).append(experts_per_token(aux))         # (B, L)

    def result(self):
        ts = sorted(self.sums, reverse=True)
        per_t = [(self.sums[t] / self.counts[t]).tolist() for t in ts]             # (T, layers)
        mean = [sum(v) / len(v) for v in per_t]
        return dict(timesteps=ts, per_layer=[list(v) for v in zip(*per_t)], mean=mean,
                    overall=sum(mean) / len(mean))


def layer_routing_stats(mask):
    """One layer's load per expert, MaxVio, combination usage and mean experts per token;
    mask (..., E)."""
    M = mask.reshape(-1, mask.shape[-1]).float()                          # (N, E)
    E = M.shape[1]
    load = M.sum(0)                                                       # (E,)
    with torch.autocast(M.device.type, enabled=False):                # exact counts: fp32, not bf16
        pair = (M.t() @ M)[torch.triu_indices(E, E, 1).unbind()]         # (E(E-1)/2,) co-selections
    cover = (pair.sort(descending=True).values.cumsum(0) < 0.95 * pair.sum()).sum() + 1
    usage = 100 * cover.item() / len(pair) if pair.sum() > 0 else 0.0
    return dict(load=load.tolist(), max_vio=((load.max() - load.mean()) / load.mean()).item(),
                comb_usage=usage, experts_per_token=M.sum(1).mean().item())


@torch.no_grad()
def routing_stats(aux, t=None, num_timesteps=1000, bins=10):
    """Per layer and averaged: load per expert, MaxVio, combination usage (% of expert pairs
    covering 95% of co-activations; S6, Table 2) and mean experts per token; per timestep bin
    when t is given."""
    layers = [layer_routing_stats(a["mask"]) for a in aux]
    mean = lambda key: sum(layer[key] for layer in layers) / len(layers)
    stats = dict(max_vio=mean("max_vio"), comb_usage=mean("comb_usage"),
                 experts_per_token=mean("experts_per_token"), layers=layers)
    if t is not None:
        per_image = experts_per_image(aux).mean(0)                        # (B,)
        b = (t * bins // num_timesteps).clamp(max=bins - 1)               # (B,) timestep bin
        width = num_timesteps // bins
        stats["experts_per_token_by_t"] = {
            f"{i * width}-{(i + 1) * width - 1}": per_image[b == i].mean().item()
            for i in range(bins) if (b == i).any()}
    return stats


@torch.no_grad()
def experts_per_token_at(model, diffusion, x0, y, timesteps, generator):
    """Experts per token (mean over MoE layers) of images x0 noised to each timestep, (T, B, L):
    where the routing sends compute on data, at fixed noise from `generator` (CPU)."""
    maps = []
    for t in timesteps:
        tt = torch.full((len(y),), t, device=x0.device)
        noise = torch.randn(x0.shape, generator=generator).to(x0.device)
        aux = model(diffusion.q_sample(x0, tt, noise), tt, y, return_aux=True)[1]
        maps.append(experts_per_token(aux))
    return torch.stack(maps)
