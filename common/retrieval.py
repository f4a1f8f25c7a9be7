"""View retrieval, the label-free learning signal: for two augmented views of each held-out
sub-volume (``data_loader_ssl.retrieval_pairs``), how often does a view's nearest
neighbour among all 2N views, by a stage's pooled features, turn out to be its partner?
Logged by the trainer every epoch and used by the probes."""
from __future__ import annotations

import torch
from torch import nn


def view_retrieval(emb_a: torch.Tensor, emb_b: torch.Tensor, ks=(1, 5)) -> dict[str, float]:
    """Label-free learning signal: row i of `emb_a` and of `emb_b` ([N, C]) embed two views
    of sample i; for each of the 2N embeddings, where does its partner rank among the other
    2N - 1 by cosine similarity? Returns `top{k}` (the fraction with the partner among the k
    nearest) and its chance level `chance{k}` = k / (2N - 1). Ties count in expectation: a
    partner tied with t others is in the top k with probability (k - g) / (t + 1), g being
    the number strictly closer, so a constant embedding scores chance, not 1."""
    if emb_a.shape != emb_b.shape or emb_a.ndim != 2 or len(emb_a) < 2:
        raise ValueError(f"need two [N, C] tensors of one shape with N >= 2, got "
                         f"{tuple(emb_a.shape)} and {tuple(emb_b.shape)}")
    n = len(emb_a)
    e = torch.nn.functional.normalize(torch.cat([emb_a, emb_b]).double(), dim=1)
    sim = e @ e.T
    idx = torch.arange(2 * n)
    partner = (idx + n) % (2 * n)
    others = torch.ones_like(sim, dtype=torch.bool)
    others[idx, idx] = others[idx, partner] = False
    s_p = sim[idx, partner].unsqueeze(1)
    tol = 1e-9  # cosines of equal vectors can differ in the last bits
    closer = ((sim > s_p + tol) & others).sum(1).double()
    tied = (((sim - s_p).abs() <= tol) & others).sum(1).double()
    out = {}
    for k in ks:
        out[f"top{k}"] = float(((k - closer) / (tied + 1)).clamp(0, 1).mean())
        out[f"chance{k}"] = min(1.0, k / (2 * n - 1))
    return out


@torch.no_grad()
def retrieval_by_stage(backbone: nn.Module, pairs: tuple[torch.Tensor, torch.Tensor],
                       device: torch.device, batch_size: int = 16, ks=(1, 5)) -> dict[str, float]:
    """`view_retrieval` of the four pooled stage features of a frozen `ResNet3D` on the
    view pairs of `data_loader_ssl.retrieval_pairs`: `retrieval_top{k}_stage{s}` and
    `retrieval_chance{k}`."""
    was_training = backbone.training
    backbone.eval()
    embeds = []
    for views in pairs:
        stages = [[] for _ in range(4)]
        for start in range(0, len(views), batch_size):
            for s, f in enumerate(backbone(views[start:start + batch_size].to(device))):
                stages[s].append(f.float().cpu())  # host sync: once per batch, once per epoch
        embeds.append([torch.cat(s) for s in stages])
    backbone.train(was_training)
    out = {}
    for s in range(4):
        r = view_retrieval(embeds[0][s], embeds[1][s], ks)
        out |= {f"retrieval_top{k}_stage{s + 1}": r[f"top{k}"] for k in ks}
    return out | {f"retrieval_chance{k}": r[f"chance{k}"] for k in ks}
