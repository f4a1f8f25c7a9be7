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


# Below this many held-out sub-volumes top-1 moves in coarse steps of 1/(2N) and a random
# encoder already finds most partners at the deep stages (4 gave top-1 1.0 at stages 3-4 at
# initialisation; the demo's 59 gave a random init 0.24-0.54), so learning cannot show.
MIN_HELD_OUT = 32


def held_out_warnings(n: int, initial: dict[str, float] | None = None,
                      flag: str = "--retrieval_n") -> list[str]:
    """Why view retrieval on `n` held-out sub-volumes cannot show learning (empty when
    nothing says so): too few of them, or `initial` (a `retrieval_by_stage` result before
    training) already at the ceiling at some stage."""
    warns = []
    if n < MIN_HELD_OUT:
        warns.append(f"view retrieval on {n} held-out sub-volumes: top-1 moves in steps of "
                     f"1/{2 * n} and a random encoder finds most partners among so few, so it "
                     f"can hardly show learning; list at least {MIN_HELD_OUT} (the first "
                     f"{flag} are used)")
    full = [s for s in range(1, 5)
            if initial and initial.get(f"retrieval_top1_stage{s}", 0) >= 0.95]
    if full:
        warns.append(f"view retrieval top-1 is already >= 0.95 before training at stage(s) "
                     f"{', '.join(map(str, full))}, with no room to show learning there; use more "
                     f"held-out sub-volumes (at least {MIN_HELD_OUT})")
    return warns
