"""Multimodal mixture-of-experts: encoders, routing, missing modalities, auxiliary losses, one fusion module.

One readable file in the spirit of nanoGPT's model.py. The published methods are presets, i.e. data
(``PRESETS``: dicts of ``MoEConfig`` fields), not subclasses:

- neuromoe: NeuroMoE (arXiv 2506.14970): one 3D ViT per MRI modality (4x4x4 patches), an MLP for tabular
  data, one expert per modality, a two-layer gate conditioned on the clinical features, dense softmax
  weights, balance regulariser R = (1/E) sum_k (mean w_k - 1/E)^2.
- permmoe: PerM-MoE (arXiv 2509.12234): CNN encoders, self-attention over modality tokens, one sparse
  router per modality over a shared expert pool, Flex-MoE's missing-modality bank, SMoE balancing
  plus the expert-specialisation (modality-combination) cross-entropy.
- flexmoe: Flex-MoE (seed notes): one noisy top-4-of-16 softmax router, d=128, missing-modality bank,
  cv^2(importance)+cv^2(load) on complete samples plus router-logit cross-entropy against the
  modality-combination id on incomplete ones, weight 1e-2.
- fusemoe: FuseMoE (NeurIPS 2024): per-modality routers over shared experts, Laplace gating
  (-||x - w_i||_2), noisy top-k, entropy regulariser; without the defects of its public code
  (routers are registered modules, noise only in training, the balance loss is used, absent
  modalities get a learned embedding instead of zeros).
- late / single: baselines (concatenate + MLP; one modality + MLP).

The noisy presets use Shazeer et al.'s (2017) learned noise, std softplus(x W_noise) + 1e-2 (the seed notes say
"noisy top-k" without saying fixed or learned; ``learned_noise=False`` gives a fixed ``noise_std``).
Flex-MoE's warm-up curriculum (5 epochs on samples ordered from most to fewest observed modalities) is not
implemented: train.py runs one schedule for every preset.

Shapes: B batch, M modalities, R routers, E experts, d model width. Volumes are (B, C, X, Y, Z),
tabular modalities (B, F); ``present`` is a (B, M) bool mask in ``MoEConfig.modalities`` order.
CPU budget: the CNN downsamples 2x per stage from its first conv; ``input_pool`` (e.g. 2) average-pools
volumes before any encoder, which the ViT needs at 3 mm on CPU (tokens and attention shrink 8x and 64x).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

AUX_NAMES = ("balance", "cv2", "switch", "z", "entropy", "specialization", "modality")
ENCODERS = {"volume": ("vit", "cnn", "mlp"), "tabular": ("mlp",)}


# ----------------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class ModalitySpec:
    """One input modality. ``shape`` excludes the batch: (C, X, Y, Z) for a volume, (F,) for tabular.
    ``encoder=None`` takes the config's ``volume_encoder`` for volumes and "mlp" for tabular data."""
    name: str
    kind: str
    shape: tuple
    encoder: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        if self.kind not in ENCODERS:
            raise ValueError(f"modality {self.name!r}: kind must be 'volume' or 'tabular', not {self.kind!r}")
        if len(self.shape) != (4 if self.kind == "volume" else 1) or min(self.shape) < 1:
            want = "(C, X, Y, Z)" if self.kind == "volume" else "(F,)"
            raise ValueError(f"modality {self.name!r}: shape {self.shape} is not {want}")
        if self.encoder is not None and self.encoder not in ENCODERS[self.kind]:
            raise ValueError(f"modality {self.name!r}: a {self.kind} takes encoder {ENCODERS[self.kind]}, "
                             f"not {self.encoder!r}")


@dataclass
class MoEConfig:
    modalities: list
    n_outputs: int = 2
    task: str = "classification"         # classification (logits, cross-entropy) | regression (MSE)
    fusion: str = "moe"                  # moe | late (concatenate + MLP) | single (one modality + MLP)
    single_modality: str | None = None   # for fusion="single"; default the first modality
    # encoders
    d_model: int = 64
    volume_encoder: str = "cnn"          # vit | cnn | mlp, for volume modalities whose spec says encoder=None
    vit_patch: int = 4
    vit_depth: int = 2
    vit_heads: int = 4
    cnn_channels: tuple = (16, 32, 64)
    mlp_hidden: int = 64
    encoder_dropout: float = 0.1
    grad_checkpoint: bool = False        # ViT blocks recompute activations in backward
    input_pool: int = 1                  # average-pool volumes by this factor per axis before encoding
    mixer_layers: int = 0                # transformer blocks over the M modality tokens before routing
    # routing and experts
    router: str = "joint"                # joint | per_modality | disjoint | conditioned
    condition_on: str = "clinical"       # tabular modality feeding the conditioned router
    n_experts: int = 4                   # per pool; "conditioned" uses one expert per modality instead
    expert_hidden: int = 128
    gate: str = "softmax"                # softmax (xW) | laplace (-||x-w||) | gaussian (-||x-w||^2)
    top_k: int | None = None             # None: dense softmax over all experts
    noise_std: float = 0.0               # Gaussian noise on gate scores, training only
    learned_noise: bool = False          # Shazeer et al.: std = noise_std * softplus(x W_noise) + 1e-2
    router_hidden: int = 0               # >0: Linear-ReLU-Dropout before the gate (NeuroMoE's 2-layer gate)
    router_dropout: float = 0.0
    missing: str = "learned"             # zeros | learned (one vector per modality) | bank (per combination)
    residual_experts: bool = True        # expert(x) = x + ffn(x): the MoE layer as a residual block (Switch, ST-MoE)
    # losses
    aux_weights: dict = field(default_factory=dict)  # name in AUX_NAMES -> coefficient
    balance_complete_only: bool = False  # Flex-MoE: cv2 on complete samples, specialisation on incomplete
    class_weights: tuple | None = None
    head_dropout: float = 0.0

    def __post_init__(self):
        self.modalities = [m if isinstance(m, ModalitySpec) else ModalitySpec(**m) for m in self.modalities]
        self.cnn_channels = tuple(self.cnn_channels)
        if self.class_weights is not None:
            self.class_weights = tuple(float(w) for w in self.class_weights)
        names = [m.name for m in self.modalities]
        choices = {"task": ("classification", "regression"), "fusion": ("moe", "late", "single"),
                   "router": ("joint", "per_modality", "disjoint", "conditioned"),
                   "gate": ("softmax", "laplace", "gaussian"), "missing": ("zeros", "learned", "bank"),
                   "volume_encoder": ENCODERS["volume"]}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"MoEConfig.{key}={getattr(self, key)!r}; choose one of {allowed}")
        if not names or len(set(names)) != len(names):
            raise ValueError(f"modalities must be non-empty with unique names, got {names}")
        if self.fusion == "single" and (self.single_modality not in (None, *names) or self.missing == "bank"):
            raise ValueError(f"fusion='single' needs single_modality in {names} (got {self.single_modality!r}) "
                             f"and missing 'zeros' or 'learned' (got {self.missing!r})")
        unknown = set(self.aux_weights) - set(AUX_NAMES)
        if unknown:
            raise ValueError(f"unknown aux_weights {sorted(unknown)}; known: {AUX_NAMES}")
        if self.input_pool < 1:
            raise ValueError(f"input_pool={self.input_pool} must be >= 1")
        if self.d_model % self.vit_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by vit_heads={self.vit_heads}")
        if self.fusion == "moe" and self.router == "conditioned":
            spec = {m.name: m for m in self.modalities}.get(self.condition_on)
            if spec is None or spec.kind != "tabular":
                raise ValueError(f"router='conditioned' needs a tabular modality {self.condition_on!r} "
                                 f"(condition_on) among {names}")
        n_exp = len(names) if self.router == "conditioned" else self.n_experts
        if self.top_k is not None and not 1 <= self.top_k <= n_exp:
            raise ValueError(f"top_k={self.top_k} must lie in 1..{n_exp} (number of experts)")
        if self.class_weights is not None and (self.task != "classification"
                                               or len(self.class_weights) != self.n_outputs):
            raise ValueError(f"class_weights needs task='classification' and {self.n_outputs} values")

    def to_dict(self) -> dict:
        """Plain data (JSON/YAML-friendly); ``MoEConfig(**d)`` rebuilds it."""
        d = asdict(self)
        d["modalities"] = [dict(asdict(m), shape=list(m.shape)) for m in self.modalities]
        d["cnn_channels"] = list(self.cnn_channels)
        d["class_weights"] = None if self.class_weights is None else list(self.class_weights)
        return d


# --------------------------------------------------------------------------------------------- encoders
def pad_to_multiple(x: torch.Tensor, p: int) -> torch.Tensor:
    """Zero-pad the trailing three (spatial) dims at their far end up to a multiple of p (MNI background is 0)."""
    pads = []
    for s in reversed(x.shape[-3:]):
        pads += [0, (-s) % p]
    return F.pad(x, pads)


class Block(nn.Module):
    """Pre-norm transformer block; attention through F.scaled_dot_product_attention (flash/efficient kernels)."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        B, N, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, D))
        return x + self.mlp(self.ln2(x))


class ViT3D(nn.Module):
    """3D ViT: p^3 patch embedding, factorised learned 3D positional embedding (row + column + slice
    tables, summed), pre-norm blocks, mean pooling over patches (as NeuroMoE's encoders)."""

    def __init__(self, channels: int, spatial: tuple, d: int, patch: int, depth: int, heads: int,
                 grad_checkpoint: bool = False):
        super().__init__()
        self.patch, self.grad_checkpoint = patch, grad_checkpoint
        self.grid = tuple(math.ceil(s / patch) for s in spatial)
        self.embed = nn.Conv3d(channels, d, patch, stride=patch)
        self.pos = nn.ParameterList([nn.Parameter(torch.randn(g, d) * 0.02) for g in self.grid])
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        x = self.embed(pad_to_multiple(x, self.patch))                  # (B, d, gx, gy, gz)
        px, py, pz = self.pos
        pos = px[:, None, None] + py[None, :, None] + pz[None, None, :]  # (gx, gy, gz, d)
        x = x.flatten(2).transpose(1, 2) + pos.flatten(0, 2)             # (B, N, d)
        for blk in self.blocks:
            x = checkpoint(blk, x, use_reentrant=False) if self.grad_checkpoint and self.training else blk(x)
        return self.norm(x.mean(1))


class CNN3D(nn.Module):
    """Small 3D CNN: stride-2 conv + GroupNorm + GELU stages, global average pool. Any spatial size.
    GroupNorm, not BatchNorm: a sample's output must not depend on the rest of its batch."""

    def __init__(self, channels: int, d: int, widths: tuple = (16, 32, 64)):
        super().__init__()
        layers = []
        for w in widths:
            layers += [nn.Conv3d(channels, w, 3, stride=2, padding=1), nn.GroupNorm(min(8, w), w), nn.GELU()]
            channels = w
        self.net, self.out = nn.Sequential(*layers), nn.Linear(channels, d)

    def forward(self, x):
        return self.out(self.net(x).mean((2, 3, 4)))


def mlp(d_in: int, hidden: int, d_out: int, dropout: float = 0.0) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, d_out))


class AvgPool3d(nn.Module):
    """Average over p^3 blocks; a block at the far edge averages only its voxels (ceil_mode), so the
    output grid is ceil(s / p) per axis. Cheap way to fit 2 mm (or 3 mm on CPU) volumes in a time budget."""

    def __init__(self, spatial: tuple, p: int):
        super().__init__()
        self.kernel = tuple(min(p, s) for s in spatial)
        self.out_shape = tuple(math.ceil(s / p) for s in spatial)

    def forward(self, x):
        return F.avg_pool3d(x, self.kernel, ceil_mode=True)


def make_encoder(spec: ModalitySpec, cfg: MoEConfig) -> nn.Module:
    kind = spec.encoder or ("mlp" if spec.kind == "tabular" else cfg.volume_encoder)
    if kind == "mlp" and spec.kind == "tabular":
        return mlp(spec.shape[0], cfg.mlp_hidden, cfg.d_model, cfg.encoder_dropout)
    channels, spatial = spec.shape[0], spec.shape[1:]
    pool = AvgPool3d(spatial, cfg.input_pool) if cfg.input_pool > 1 else None
    spatial = pool.out_shape if pool else spatial
    if kind == "mlp":
        # Location-aware (each voxel its own weight), unlike the CNN's global average pool: for small cohorts,
        # where an effect sits in one region (atrophy, a tract), on voxel-standardised inputs.
        enc = nn.Sequential(nn.Flatten(), nn.Dropout(cfg.encoder_dropout),
                            mlp(channels * math.prod(spatial), cfg.mlp_hidden, cfg.d_model, cfg.encoder_dropout))
    elif kind == "vit":
        enc = ViT3D(channels, spatial, cfg.d_model, cfg.vit_patch, cfg.vit_depth, cfg.vit_heads, cfg.grad_checkpoint)
    else:
        enc = CNN3D(channels, cfg.d_model, tuple(cfg.cnn_channels))
    return nn.Sequential(pool, enc) if pool else enc


# ---------------------------------------------------------------------------------------------- routing
def gate_scores(x: torch.Tensor, w: torch.Tensor, kind: str) -> torch.Tensor:
    """(B, d), (E, d) -> (B, E): softmax-gate logits xW^T, laplace -||x - w_i||_2, gaussian -||x - w_i||_2^2."""
    if kind == "softmax":
        return x @ w.t()
    d2 = (x[:, None, :] - w[None]).pow(2).sum(-1)
    return -d2 if kind == "gaussian" else -d2.clamp_min(1e-12).sqrt()  # clamp: finite gradient at x = w


def top_k_softmax(logits: torch.Tensor, k: int | None) -> torch.Tensor:
    """Dense softmax (k None or >= E), else softmax over the k largest scores and exact zeros elsewhere."""
    if k is None or k >= logits.shape[-1]:
        return logits.softmax(-1)
    vals, idx = logits.topk(k, -1)
    probs = vals.softmax(-1)
    return torch.zeros_like(logits, dtype=probs.dtype).scatter(-1, idx, probs)


def prob_in_top_k(clean: torch.Tensor, noisy: torch.Tensor, noise_std, k: int) -> torch.Tensor:
    """P(expert i stays in the top k when its own noise is redrawn, the others' fixed): Shazeer et al.
    (2017) smooth load estimator, differentiable in the clean scores. noise_std: a float or (B, E). k < E."""
    top = noisy.topk(k + 1, -1).values
    thr_in, thr_out = top[:, k:k + 1], top[:, k - 1:k]   # the threshold an expert must beat, if in / if out
    is_in = noisy > thr_in
    return torch.where(is_in, torch.special.ndtr((clean - thr_in) / noise_std),
                       torch.special.ndtr((clean - thr_out) / noise_std))


class Routing(NamedTuple):
    logits: torch.Tensor    # (B, E) clean gate scores
    weights: torch.Tensor   # (B, E) routing weights: rows sum to 1, top_k non-zero when sparse
    load: torch.Tensor      # (B, E) per-sample load: dispatch indicator, or its smooth estimate under noise
    dispatch: torch.Tensor  # (B, E) bool: the experts selected (all of them when dense)


class Router(nn.Module):
    """Gate scores over E experts (optionally after a hidden layer), noise in training only (fixed std,
    or Shazeer et al.'s learned softplus(x W_noise), zero-initialised), dense or top-k softmax.
    Runs in float32 under autocast: distances and top-k in bf16 misroute."""

    def __init__(self, d_in: int, n_experts: int, cfg: MoEConfig):
        super().__init__()
        h = cfg.router_hidden
        self.pre = (nn.Sequential(nn.Linear(d_in, h), nn.ReLU(), nn.Dropout(cfg.router_dropout))
                    if h else nn.Identity())
        self.weight = nn.Parameter(torch.randn(n_experts, h or d_in) * (h or d_in) ** -0.5)
        self.noise_weight = (nn.Parameter(torch.zeros(n_experts, h or d_in))
                             if cfg.learned_noise and cfg.noise_std > 0 else None)
        self.gate, self.top_k, self.noise_std = cfg.gate, cfg.top_k, cfg.noise_std

    def forward(self, x: torch.Tensor) -> Routing:
        with torch.autocast(x.device.type, enabled=False):
            h = self.pre(x.float())
            logits = gate_scores(h, self.weight, self.gate)
            E = logits.shape[-1]
            sparse = self.top_k is not None and self.top_k < E
            noisy, std = logits, None
            if self.training and self.noise_std > 0:
                std = (self.noise_std * F.softplus(h @ self.noise_weight.t()) + 1e-2
                       if self.noise_weight is not None else self.noise_std)
                noisy = logits + torch.randn_like(logits) * std
            weights = top_k_softmax(noisy, self.top_k)
            # Selection from the indices, not weights > 0: a far expert's softmax weight can underflow to 0.
            dispatch = torch.ones_like(logits, dtype=torch.bool)
            if sparse:
                dispatch = torch.zeros_like(dispatch).scatter(-1, noisy.topk(self.top_k, -1).indices, True)
            load = prob_in_top_k(logits, noisy, std, self.top_k) if sparse and std is not None else dispatch.float()
        return Routing(logits, weights, load, dispatch)


def expert_ffn(d: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(d), nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d))


# -------------------------------------------------------------------------------------------- missing
def combination_index(present: torch.Tensor) -> torch.Tensor:
    """(B, M) bool -> (B,) id of the set of present modalities, sum_m present_m 2^m - 1, in 0..2^M - 2."""
    bits = (present.long() << torch.arange(present.shape[1], device=present.device)).sum(1)
    return bits - 1


class MissingModality(nn.Module):
    """Fill the embeddings of absent modalities: zeros, one learned vector per modality, or a bank with
    one learned vector per (combination of present modalities, absent modality) pair (Flex-MoE)."""

    def __init__(self, mode: str, n_modalities: int, d: int):
        super().__init__()
        self.mode, M = mode, n_modalities
        if mode == "learned":
            self.table = nn.Parameter(torch.randn(M, d) * 0.02)
        elif mode == "bank":
            # index[c, m]: the table row for modality m absent in combination c; -1 where m is present.
            index = torch.full((2 ** M - 1, M), -1, dtype=torch.long)
            absent = [(c, m) for c in range(2 ** M - 1) for m in range(M) if not (c + 1) >> m & 1]
            for row, (c, m) in enumerate(absent):
                index[c, m] = row
            self.register_buffer("index", index, persistent=False)
            self.table = nn.Parameter(torch.randn(len(absent), d) * 0.02)

    def forward(self, emb: torch.Tensor, present: torch.Tensor, combo: torch.Tensor) -> torch.Tensor:
        if self.mode == "zeros":
            fill = torch.zeros_like(emb)
        elif self.mode == "learned":
            fill = self.table.expand_as(emb)
        else:
            fill = self.table[self.index[combo].clamp_min(0)]   # (B, M, d); present slots are discarded
        return torch.where(present[..., None], emb, fill.to(emb.dtype))


# ------------------------------------------------------------------------------------ auxiliary losses
def balance_loss(weights: torch.Tensor) -> torch.Tensor:
    """NeuroMoE: R = (1/E) sum_k (mean_b w_bk - 1/E)^2 for routing weights (B, E)."""
    E = weights.shape[-1]
    return (weights.mean(0) - 1.0 / E).pow(2).mean()


def cv_squared(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Squared coefficient of variation, unbiased variance / mean^2 (Shazeer et al. 2017)."""
    if x.numel() <= 1:
        return x.new_zeros(())
    x = x.float()
    return x.var() / (x.mean() ** 2 + eps)


def switch_loss(probs: torch.Tensor, dispatch: torch.Tensor) -> torch.Tensor:
    """Switch Transformer load balancing E * sum_i f_i P_i: f_i the fraction of dispatch slots sent to
    expert i (each sample's slots share 1), P_i the mean router probability. (B, E) each."""
    d = dispatch.float()
    f = (d / d.sum(-1, keepdim=True).clamp_min(1)).mean(0)
    return probs.shape[-1] * (f * probs.float().mean(0)).sum()


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """Router z-loss (ST-MoE): mean_b logsumexp_i(logits_bi)^2."""
    return torch.logsumexp(logits.float(), -1).pow(2).mean()


def entropy(p: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return -(p * p.clamp_min(1e-12).log()).sum(dim)


def entropy_regulariser(probs: torch.Tensor) -> torch.Tensor:
    """FuseMoE: mean over routers of H(p_r) minus H(mean over routers of p_r), per sample, averaged over
    the batch. probs (B, R, E); identically 0 for one router."""
    return (entropy(probs).mean(-1) - entropy(probs.mean(-2))).mean()


def specialization_loss(logits: torch.Tensor, combo: torch.Tensor, mask: torch.Tensor | None = None):
    """Flex-MoE / PerM-MoE: cross-entropy of router logits (B, E) against the modality-combination id,
    taken modulo E when there are more combinations than experts; over the rows in ``mask``."""
    target = combo % logits.shape[-1]
    if mask is not None:
        logits, target = logits[mask], target[mask]
    if target.numel() == 0:
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), target)


# ----------------------------------------------------------------------------------------------- model
class MoEOutput(NamedTuple):
    prediction: torch.Tensor               # (B, n_outputs): logits or regression values
    loss: torch.Tensor | None              # task loss + aux_loss, when targets are given
    aux_loss: torch.Tensor                 # weighted total of the auxiliary losses
    aux_losses: dict                       # name -> unweighted value (every name in AUX_NAMES for MoE)
    routing_weights: dict                  # router name -> (B, E) weights; empty for late/single
    expert_outputs: torch.Tensor | None    # (B, R, E, d)


class MultimodalMoE(nn.Module):
    """encoders -> missing-modality fill -> [mixer] -> routers + experts -> head.

    Router topologies: joint (one router on the fused concatenation of modality embeddings), per_modality
    (a router per modality token over one shared expert pool, FuseMoE/PerM-MoE), disjoint (a router and
    an expert pool per modality), conditioned (NeuroMoE: one expert per modality, weighted by a gate on
    the clinical features). All experts run on every token (tiny FFNs: dispatch costs more than it saves);
    sparse weights zero the unselected ones. Experts are residual (x + ffn(x), ``residual_experts``), as the MoE
    layers of Switch/ST-MoE sit in a residual block. The head is linear, so for "conditioned" the prediction is
    exactly NeuroMoE's weighted sum of per-expert predictions, sum_i w_i head(expert_i(x_i)).
    """

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        specs = cfg.modalities
        if cfg.fusion == "single":
            name = cfg.single_modality or specs[0].name
            self.used = [i for i, s in enumerate(specs) if s.name == name]
        else:
            self.used = list(range(len(specs)))
        self.names = [specs[i].name for i in self.used]
        M, d = len(self.used), cfg.d_model
        self.encoders = nn.ModuleDict({specs[i].name: make_encoder(specs[i], cfg) for i in self.used})
        self.missing = MissingModality(cfg.missing, M, d)
        self.mixer = nn.Sequential(*[Block(d, cfg.vit_heads) for _ in range(cfg.mixer_layers)])
        self.router_names, self.expert_names = [], []
        head_in = d
        if cfg.fusion == "moe":
            E, h = cfg.n_experts, cfg.expert_hidden
            if cfg.router == "joint":
                self.fuse = nn.Linear(M * d, d)
                self.routers = nn.ModuleList([Router(d, E, cfg)])
                self.experts = nn.ModuleList([nn.ModuleList(expert_ffn(d, h) for _ in range(E))])
                self.router_names = ["joint"]
            elif cfg.router in ("per_modality", "disjoint"):
                self.routers = nn.ModuleList(Router(d, E, cfg) for _ in range(M))
                pools = 1 if cfg.router == "per_modality" else M
                self.experts = nn.ModuleList(nn.ModuleList(expert_ffn(d, h) for _ in range(E))
                                             for _ in range(pools))
                self.router_names, head_in = list(self.names), M * d
            else:  # conditioned: gate input = clinical features (zeroed when absent) + the presence mask,
                # so the gate can move weight off the experts of absent modalities
                self.cond = self.names.index(cfg.condition_on)
                n_feat = specs[self.used[self.cond]].shape[0]
                self.routers = nn.ModuleList([Router(n_feat + M, M, cfg)])
                self.experts = nn.ModuleList([nn.ModuleList(expert_ffn(d, h) for _ in range(M))])
                self.router_names, E = ["conditioned"], M
            self.expert_names = list(self.names) if cfg.router == "conditioned" else [f"e{i}" for i in range(E)]
            self.head = nn.Sequential(nn.Dropout(cfg.head_dropout), nn.Linear(head_in, cfg.n_outputs))
        else:  # late: concatenate + MLP; single: one modality + MLP
            self.head = mlp(M * d, cfg.expert_hidden, cfg.n_outputs, cfg.head_dropout)
        cw = None if cfg.class_weights is None else torch.tensor(cfg.class_weights, dtype=torch.float32)
        self.register_buffer("class_weights", cw)
        # aux_weights["modality"]: a linear head per modality embedding, trained on the label too (deep supervision)
        # so that every encoder learns what its modality alone says; the fused prediction does not use them
        self.modality_heads = (nn.ModuleList(nn.Linear(d, cfg.n_outputs) for _ in self.used)
                               if cfg.aux_weights.get("modality") else None)

    # -- pieces
    def encode(self, inputs: dict, present: torch.Tensor) -> torch.Tensor:
        """(B, M, d) embeddings; each encoder sees only its present samples (absent inputs may be anything,
        NaN included, or left out of ``inputs`` when absent in the whole batch); absent rows are zeros."""
        B, d = present.shape[0], self.cfg.d_model
        out = torch.zeros(B, len(self.used), d, device=present.device)
        for j, (i, name) in enumerate(zip(self.used, self.names)):
            idx = present[:, j].nonzero().squeeze(1)
            if idx.numel() == 0:
                continue
            if name not in inputs:
                raise KeyError(f"modality {name!r} is marked present for {idx.numel()} samples but not in inputs")
            x = inputs[name]
            if tuple(x.shape[1:]) != self.cfg.modalities[i].shape or x.shape[0] != B:
                raise ValueError(f"modality {name!r}: input shape {tuple(x.shape)} != (B={B}, "
                                 f"*{self.cfg.modalities[i].shape}) from its ModalitySpec")
            out[:, j] = out[:, j].index_copy(0, idx, self.encoders[name](x.index_select(0, idx)).float())
        return out

    def route(self, tokens: torch.Tensor, inputs: dict, present: torch.Tensor):
        """tokens (B, M, d) -> fused (B, head_in), routings per router, expert outputs (B, R, E, d)."""
        cfg = self.cfg
        # residual experts: a gated sum of x + ffn(x) is x + the gated sum of ffn(x) (the weights sum to 1), so
        # the layer starts as the identity and a noisy gate cannot erase what the encoders found
        run = (lambda f, x: x + f(x)) if cfg.residual_experts else (lambda f, x: f(x))  # noqa: E731
        if cfg.router == "joint":
            x = self.fuse(tokens.flatten(1))
            routings = [self.routers[0](x)]
            outs = torch.stack([run(f, x) for f in self.experts[0]], 1)[:, None]
        elif cfg.router in ("per_modality", "disjoint"):
            routings = [r(tokens[:, m]) for m, r in enumerate(self.routers)]
            pool = lambda m: self.experts[0 if cfg.router == "per_modality" else m]  # noqa: E731
            outs = torch.stack([torch.stack([run(f, tokens[:, m]) for f in pool(m)], 1)
                                for m in range(tokens.shape[1])], 1)
        else:
            name, B = self.names[self.cond], tokens.shape[0]
            p = present[:, self.cond]
            raw = inputs.get(name)
            raw = (torch.where(p[:, None], raw, 0.0) if raw is not None   # where: NaN-safe
                   else tokens.new_zeros(B, self.cfg.modalities[self.used[self.cond]].shape[0]))
            routings = [self.routers[0](torch.cat([raw.float(), present.float()], 1))]
            outs = torch.stack([run(f, tokens[:, m]) for m, f in enumerate(self.experts[0])], 1)[:, None]
        weights = torch.stack([r.weights for r in routings], 1)                # (B, R, E)
        fused = torch.einsum("bre,bred->brd", weights.to(outs.dtype), outs).flatten(1)
        return fused, routings, outs

    def aux(self, routings: list, present: torch.Tensor, combo: torch.Tensor) -> dict:
        """Unweighted auxiliary losses, each averaged over routers."""
        complete = present.all(1)
        rows = complete if self.cfg.balance_complete_only else torch.ones_like(complete)
        spec_rows = ~complete if self.cfg.balance_complete_only else None
        parts = {k: [] for k in AUX_NAMES if k not in ("entropy", "modality")}
        for r in routings:
            E = r.weights.shape[-1]
            sparse = self.cfg.top_k is not None and self.cfg.top_k < E
            dispatch = r.dispatch if sparse else F.one_hot(r.weights.argmax(-1), E)  # dense: top-1
            parts["balance"].append(balance_loss(r.weights))
            parts["cv2"].append(cv_squared(r.weights[rows].sum(0)) + cv_squared(r.load[rows].sum(0)))
            parts["switch"].append(switch_loss(r.logits.softmax(-1), dispatch))
            parts["z"].append(z_loss(r.logits))
            parts["specialization"].append(specialization_loss(r.logits, combo, spec_rows))
        out = {k: torch.stack(v).mean() for k, v in parts.items()}
        out["entropy"] = entropy_regulariser(torch.stack([r.weights for r in routings], 1))
        return out

    def task_loss(self, prediction: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.cfg.task == "classification":
            return F.cross_entropy(prediction.float(), targets.long(), weight=self.class_weights)
        return F.mse_loss(prediction.float(), targets.float().view_as(prediction))

    def modality_loss(self, encoded: torch.Tensor, present: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean over modalities of the task loss of each modality's own head, on the samples that have it."""
        parts = []
        for j, head in enumerate(self.modality_heads):
            rows = present[:, j]
            if bool(rows.any()):
                parts.append(self.task_loss(head(encoded[rows, j]), targets[rows]))
        return torch.stack(parts).mean() if parts else encoded.new_zeros(())

    # -- forward
    def forward(self, inputs: dict, present: torch.Tensor, targets: torch.Tensor | None = None) -> MoEOutput:
        cfg = self.cfg
        present = present.to(torch.bool)
        if present.ndim != 2 or present.shape[1] != len(cfg.modalities):
            raise ValueError(f"present must be (B, {len(cfg.modalities)}) in order "
                             f"{[m.name for m in cfg.modalities]}, got {tuple(present.shape)}")
        if not bool(present.any(1).all()):
            raise ValueError(f"{int((~present.any(1)).sum())} samples have none of the modalities "
                             f"{[m.name for m in cfg.modalities]}")
        present = present[:, self.used]   # "single": its one modality may be absent (learned/zero fill)
        combo = combination_index(present)
        encoded = self.encode(inputs, present)
        tokens = self.mixer(self.missing(encoded, present, combo))
        zero = tokens.new_zeros(())
        if cfg.fusion == "moe":
            fused, routings, expert_outputs = self.route(tokens, inputs, present)
            aux_losses = self.aux(routings, present, combo)
            routing_weights = {n: r.weights for n, r in zip(self.router_names, routings)}
        else:
            fused, expert_outputs, aux_losses, routing_weights = tokens.flatten(1), None, {}, {}
        if self.modality_heads is not None or cfg.fusion == "moe":
            aux_losses["modality"] = (self.modality_loss(encoded, present, targets)
                                      if self.modality_heads is not None and targets is not None else zero)
        aux_loss = sum((w * aux_losses[k] for k, w in cfg.aux_weights.items() if w), zero)
        prediction = self.head(fused)
        loss = None
        if targets is not None:
            loss = self.task_loss(prediction, targets) + aux_loss
        return MoEOutput(prediction, loss, aux_loss, aux_losses, routing_weights, expert_outputs)


# --------------------------------------------------------------------------------------------- presets
PRESETS: dict[str, dict] = {
    # NeuroMoE: ViT (4^3 patches) per MRI modality, 30 % dropout in the tabular encoder, a two-layer
    # ReLU/dropout gate on the clinical features, dense softmax over one expert per modality, R_balance.
    "neuromoe": dict(fusion="moe", router="conditioned", condition_on="clinical", gate="softmax", top_k=None,
                     router_hidden=64, router_dropout=0.3, volume_encoder="vit", vit_patch=4,
                     encoder_dropout=0.3, missing="learned", aux_weights={"balance": 1.0}),
    # PerM-MoE: CNN encoders, self-attention over modality tokens, a sparse router per modality over
    # shared experts, missing-modality bank, SMoE balancing + expert-specialisation cross-entropy.
    "permmoe": dict(fusion="moe", router="per_modality", gate="softmax", n_experts=8, top_k=2, noise_std=1.0,
                    learned_noise=True, volume_encoder="cnn", mixer_layers=1, missing="bank",
                    aux_weights={"cv2": 1e-2, "specialization": 1e-2}),
    # Flex-MoE: one noisy top-4-of-16 softmax router, d=128, bank, cv^2 on complete samples and
    # combination cross-entropy on incomplete ones, weight 1e-2.
    "flexmoe": dict(fusion="moe", router="joint", gate="softmax", n_experts=16, top_k=4, noise_std=1.0,
                    learned_noise=True, d_model=128, volume_encoder="cnn", mixer_layers=1, missing="bank",
                    balance_complete_only=True, aux_weights={"cv2": 1e-2, "specialization": 1e-2}),
    # FuseMoE: per-modality Laplace routers over a shared pool, noisy top-k, entropy regulariser; the
    # balance loss its code dropped is kept, absent modalities get a learned embedding, not zeros.
    "fusemoe": dict(fusion="moe", router="per_modality", gate="laplace", n_experts=8, top_k=2, noise_std=1.0,
                    learned_noise=True, volume_encoder="cnn", missing="learned",
                    aux_weights={"entropy": 1e-2, "cv2": 1e-2}),
    "late": dict(fusion="late", volume_encoder="cnn", missing="learned"),
    "single": dict(fusion="single", volume_encoder="cnn", missing="learned"),
}

def preset_config(preset_name: str, modalities: list, n_outputs: int, task: str = "classification",
                  **overrides) -> MoEConfig:
    if preset_name not in PRESETS:
        raise ValueError(f"unknown preset {preset_name!r}; known: {sorted(PRESETS)}")
    known = {f.name for f in fields(MoEConfig)}
    bad = set(overrides) - known
    if bad:
        raise ValueError(f"unknown MoEConfig fields {sorted(bad)}")
    kw = {**PRESETS[preset_name], **overrides}
    return MoEConfig(modalities=list(modalities), n_outputs=n_outputs, task=task, **kw)


def build_model(preset_name: str, modalities: list, n_outputs: int, task: str = "classification",
                **overrides) -> MultimodalMoE:
    """A model from a preset; ``overrides`` replace any MoEConfig field (e.g. d_model=32, top_k=1)."""
    return MultimodalMoE(preset_config(preset_name, modalities, n_outputs, task, **overrides))
