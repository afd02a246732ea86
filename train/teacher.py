"""Teacher distillation (paper Sec. 3.1): a patch network T^ learns local descriptors from a
pretrained ImageNet network P on natural-image patches.

Loss = lambda_k L_k + lambda_c L_c + lambda_m L_m with
- L_k (knowledge distillation): || D(T^(p)) - P(p) ||^2, D a linear decoder 128 -> dim(P), divided
  by dim(P);
- L_c (compactness): the mean squared off-diagonal entry of the descriptor correlation matrix over
  the minibatch.
  Both are per-entry means so that lambda_k = lambda_c = 1 weighs them comparably. The paper writes
  the plain sums; measured here (p=17, 300 steps), its signed sum of c_ij drove itself to its lower bound
  -d and cut the share of P's variance the decoder recovers from 0.21 to 0.08, and the sum of c_ij^2
  (floor ~d^2/batch) swamped L_k entirely (README: departures);
- L_m (triplet, optional): max(0, delta + d+ - d-), d- the smaller distance to either of anchor and
  positive. As the paper samples them: the positive is the anchor patch slightly shifted, its
  luminance changed and Gaussian noise added; the negative a random patch of a different photo.

Two kinds of distillation target P(p) (`--target`):
- `patch`, the paper's: P's global descriptor of the patch itself, resized to `backbone_input`
  pixels. P's descriptors do not change during training, so they are computed once for a fixed pool
  of patches; T^ then trains over that pool, one patch network pass per descriptor.
- `dense`: P's mid-level feature maps (strides 8 and 16) of the whole natural image, enlarged by
  DENSE_RF / p first so that the stride-8 features' receptive field (about 67 px) spans about a
  p x p patch, brought back to the image's pixels; P's feature at a pixel is the target of the patch
  whose part the network reads is centred on it (patchnet.Geometry). T^ then trains in its dense
  (FDFE) form on windows of the images, which yields a descriptor per pixel at a fraction of the
  per-patch cost (p=17: about 6 MFLOP against 160 per descriptor), so a CPU budget covers far more
  of the images. Targets are standardized per channel
  so that every channel of P weighs the same (mean and std of the first pool of images). The maps are
  computed once per image, as it comes into the image pool (teacher_images: a folder of any size
  streams through a pool of bounded memory).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from ustudents.engines.model import normalize_input
from ustudents.engines.patchnet import DESCRIPTOR_DIM, PatchNet, geometry

from .backbones import FEATURE_STRIDES, build_backbone
from .progress import progress
from .students import MAX_LR, MAX_SEED
from .teacher_images import (POOL_IMAGES, POOL_REFRESH, SKIMAGE_SOURCE, ImagePool, TeacherError, natural_image_files,
                             none_readable)

TARGETS = ("dense", "patch")
SCHEDULES = ("constant", "cosine")
MIN_BACKBONE_INPUT = 32  # P's coarsest feature map has stride 32
DEFAULT_BATCH = {"patch": 64, "dense": 8}  # patches (the paper's 64) or windows of crop x crop descriptors per step
DENSE_RF = 64  # dense targets: images are enlarged by DENSE_RF / p before P sees them (see above)
STD_FLOOR = 1e-3  # dense targets: a channel's std is at least this share of the median channel's
LOSS_HISTORY_POINTS = 40  # losses a teacher's record keeps (read every 50 steps): the whole curve, thinned
DENSE_MAX_PIXELS = 2048 * 2048  # dense targets: pyramid levels P would see larger than this are left out (memory)
# The triplet positives' augmentation (the paper gives no amounts): a luminance gain drawn from
# [1 - LUMINANCE, 1 + LUMINANCE] and Gaussian noise of this std, on pixels in [0, 1]
TRIPLET_LUMINANCE = 0.1
TRIPLET_NOISE = 0.02


@dataclass
class TeacherConfig:
    p: int = 65
    backbone: str = "efficientnet-lite0"
    backbone_weights: str | None = None
    backbone_input: int = 128  # target "patch": patches are resized to this side before P sees them
    target: str = "dense"  # "dense" or "patch" (the paper's; module docstring)
    crop: int = 32  # target "dense": side of each training window's output, pixels
    target_strides: tuple[int, ...] = FEATURE_STRIDES  # target "dense": which of P's maps (README: Teachers)
    images: str = SKIMAGE_SOURCE
    pool_images: int = POOL_IMAGES  # images held at once; a folder of more streams through (teacher_images)
    pool_refresh: int = POOL_REFRESH  # steps per image replaced while streaming; 0: never
    patches: int = 6000  # target "patch": size of the fixed patch pool whose P descriptors are cached
    steps: int = 1500
    batch: int | None = None  # patches or windows per step; None: DEFAULT_BATCH of the target
    lr: float = 2e-4  # paper: Adam, lr 2e-4, weight decay 1e-5
    # "constant" (the paper's) or "cosine": lr decays from `lr` to 0 over the steps, which lets a
    # short budget settle instead of ending on the noise of its last batches
    schedule: str = "constant"
    weight_decay: float = 1e-5
    lambda_k: float = 1.0
    lambda_c: float = 1.0
    lambda_m: float = 0.0
    margin: float = 1.0  # delta of the triplet loss
    seed: int = 0
    device: str = "cpu"
    amp: bool = True  # bfloat16 autocast: several times faster on CPUs with AVX512-BF16 and on GPUs


def sample_patches(levels: list[torch.Tensor], p: int, n: int, gen: torch.Generator,
                   shift: int = 0, idx: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """n random p x p patches (n, 3, p, p) in [0, 1], from the levels `idx` names (random ones when
    None); with shift > 0 also copies translated by up to `shift` pixels, else an empty tensor."""
    out, shifted = [], []
    if idx is None:
        idx = torch.randint(len(levels), (n,), generator=gen)
    for i in idx.tolist():
        img = levels[i]
        h, w = img.shape[1:]
        r = int(torch.randint(shift, h - p - shift + 1, (1,), generator=gen))
        c = int(torch.randint(shift, w - p - shift + 1, (1,), generator=gen))
        out.append(img[:, r:r + p, c:c + p])
        if shift:
            dr, dc = torch.randint(-shift, shift + 1, (2,), generator=gen).tolist()
            shifted.append(img[:, r + dr:r + dr + p, c + dc:c + dc + p])
    flips = torch.rand(n, generator=gen) < 0.5  # horizontal flips double the content for free
    patches = torch.stack(out)
    patches[flips] = patches[flips].flip(-1)
    if shift:
        pos = torch.stack(shifted)
        pos[flips] = pos[flips].flip(-1)
        return patches, pos
    return patches, torch.empty(0)


def sample_triplets(levels: list[torch.Tensor], photos: list[int], p: int, n: int, gen: torch.Generator,
                    shift: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """n (anchor, positive, negative) patches for the triplet loss, each (n, 3, p, p) in [0, 1]: the
    positive is the anchor shifted by up to `shift` pixels (flipped with it), its luminance scaled
    and noise added; the negative comes from a level of another photo (`photos[i]`: level i's
    photo). Needs levels of at least two photos."""
    idx = torch.randint(len(levels), (n,), generator=gen)
    anchors, positives = sample_patches(levels, p, n, gen, shift=shift, idx=idx)
    gain = 1 + TRIPLET_LUMINANCE * (2 * torch.rand(n, 1, 1, 1, generator=gen) - 1)
    positives = (positives * gain + TRIPLET_NOISE * torch.randn(positives.shape, generator=gen)).clamp(0, 1)
    photo = torch.tensor(photos)
    others = [(photo != photo[i]).nonzero()[:, 0] for i in idx.tolist()]
    negative_idx = torch.stack([o[torch.randint(len(o), (1,), generator=gen)[0]] for o in others])
    negatives, _ = sample_patches(levels, p, n, gen, idx=negative_idx)
    return anchors, positives, negatives


def knowledge_distillation_loss(decoded: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L_k: || D(T^(p)) - P(p) ||^2 / dim(P), averaged over the batch."""
    return (decoded - target).square().mean()


def compactness_loss(desc: torch.Tensor) -> torch.Tensor:
    """L_c: mean squared off-diagonal correlation between descriptor dimensions in the batch."""
    z = (desc - desc.mean(0)) / (desc.std(0) + 1e-6)
    c = z.T @ z / (desc.shape[0] - 1)
    d = c.shape[0]
    return (c.square().sum() - c.diagonal().square().sum()) / (d * (d - 1))


def triplet_loss(anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, margin: float) -> torch.Tensor:
    """L_m: max(0, delta + d+ - d-), d- the smaller of the anchor's and positive's distance to the negative."""
    d_pos = (anchor - positive).square().sum(1)
    d_neg = torch.minimum((anchor - negative).square().sum(1), (positive - negative).square().sum(1))
    return F.relu(margin + d_pos - d_neg).mean()


@torch.no_grad()
def backbone_descriptors(backbone: nn.Module, patches: torch.Tensor, size: int, batch: int = 128) -> torch.Tensor:
    out = []
    for i in progress(range(0, len(patches), batch), desc="  P descriptors", unit="batch", leave=False):
        x = F.interpolate(patches[i:i + batch], size=(size, size), mode="bilinear", align_corners=False)
        out.append(backbone(x))
    return torch.cat(out)


@torch.no_grad()
def p_maps(backbone: nn.Module, levels: list[torch.Tensor], p: int,
           strides: tuple[int, ...] = FEATURE_STRIDES) -> list[torch.Tensor]:
    """Per level (3, H, W): P's maps at `strides` (8 and/or 16) of the level enlarged by DENSE_RF / p,
    resized to (H, W) and concatenated; float16 to halve the cache. `levels` must be small enough
    for P (`dense_levels`)."""
    device = next(backbone.buffers()).device
    maps = []
    for level in progress(levels, desc="  P feature maps", unit="image", leave=False):
        size = level.shape[1:]
        x = F.interpolate(level[None].to(device), scale_factor=DENSE_RF / p, mode="bilinear", align_corners=False,
                          antialias=DENSE_RF < p)
        maps.append(torch.cat([F.interpolate(m, size=size, mode="bilinear", align_corners=False)
                               for m in backbone.feature_maps(x, strides)], 1)[0].half().cpu())
    return maps


def rehearse_step(cfg: TeacherConfig, backbone: nn.Module, window: int) -> None:
    """A step's largest allocations, on blank input and a throwaway network, before the photos load
    and P's maps of them are made (minutes at p = 65): a --batch or --backbone-input too large for
    this machine fails now with the one-line out-of-memory error, not after those minutes. The random
    numbers the run draws stay as they were (the teacher's initialization: a distillation reproduces)."""
    device = next(backbone.buffers()).device
    with torch.random.fork_rng(devices=[]):  # the throwaway network's initialization draws from the CPU's
        net = PatchNet(cfg.p, n=1).to(device)
    blank = lambda n, side: normalize_input(torch.zeros(n, 3, side, side, device=device))  # noqa: E731
    if cfg.target == "patch":  # P's descriptors of the patch pool, a batch of them at a time (backbone_descriptors)
        with torch.no_grad():
            backbone(blank(min(cfg.patches, 128), cfg.backbone_input))
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp):
        outs = [net.dense(blank(cfg.batch, window)) if cfg.target == "dense" else net(blank(cfg.batch, cfg.p))]
        if cfg.lambda_m > 0:  # the triplets' anchors, positives and negatives, in the same graph as a step's
            outs.append(net(blank(3 * cfg.batch, cfg.p)))
    sum(out.float().square().mean() for out in outs).backward()


def channel_stats(maps: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std over every pixel of every map, accumulated in float64."""
    n = sum(m[0].numel() for m in maps)
    total = sum(m.double().sum((1, 2)) for m in maps)
    squares = sum(m.double().square().sum((1, 2)) for m in maps)
    mean = total / n
    std = (squares / n - mean.square()).clamp_min(0).sqrt() + 1e-6
    # a channel (near) constant over these maps, e.g. one a ReLU zeroes on the first pool's images,
    # would blow a later image's value past float16's range: no std below a thousandth of the median
    std = std.clamp_min(STD_FLOOR * float(std.median()))
    return mean.float(), std.float()


def standardize_(maps: list[torch.Tensor], mean: torch.Tensor, std: torch.Tensor) -> list[torch.Tensor]:
    """Standardize the maps in place of the list: each raw map is let go as its standardized one is
    made, so the pool's first pass never holds both."""
    for i, m in enumerate(maps):
        maps[i] = ((m.float() - mean[:, None, None]) / std[:, None, None]).half()
    return maps


def dense_targets(backbone: nn.Module, levels: list[torch.Tensor], p: int,
                  strides: tuple[int, ...] = FEATURE_STRIDES) -> list[torch.Tensor]:
    """P's maps of each level (`p_maps`), standardized per channel over all of them."""
    maps = p_maps(backbone, levels, p, strides)
    return standardize_(maps, *channel_stats(maps))


def dense_levels(levels: list[torch.Tensor], p: int, window: int) -> list[torch.Tensor]:
    """The pyramid levels of an image that a dense target can use: at least one training window in
    size, and no larger than DENSE_MAX_PIXELS once enlarged for P. Where every level is larger (a photo
    of more than about 4.7 megapixels at p=17), the smallest is shrunk to fit: such a photo was passed
    over as too small, and a folder of them refused with "pass larger images"."""
    most = DENSE_MAX_PIXELS / (DENSE_RF / p) ** 2  # pixels of a level that P may see enlarged
    kept = [t for t in levels if min(t.shape[1:]) >= window and t.shape[1] * t.shape[2] <= most]
    if kept or not levels:
        return kept
    smallest = min(levels, key=lambda t: t.shape[1] * t.shape[2])
    if smallest.shape[1] * smallest.shape[2] <= most:  # too small for a window, not too large
        return []
    f = math.sqrt(most / (smallest.shape[1] * smallest.shape[2]))
    h, w = int(smallest.shape[1] * f), int(smallest.shape[2] * f)
    return [F.interpolate(smallest[None], size=(h, w), mode="area")[0]] if min(h, w) >= window else []


def sample_windows(levels: list[torch.Tensor], targets: list[torch.Tensor], p: int, crop: int, n: int,
                   gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n random training windows: images (n, 3, crop + rf - 1, crop + rf - 1) and the targets of the
    patches centred on their dense outputs' pixels (n, C_P, crop, crop)."""
    g = geometry(p)
    side = crop + g.rf - 1
    images, wanted = [], []
    for i in torch.randint(len(levels), (n,), generator=gen).tolist():
        h, w = levels[i].shape[1:]
        r = int(torch.randint(h - side + 1, (1,), generator=gen))
        c = int(torch.randint(w - side + 1, (1,), generator=gen))
        images.append(levels[i][:, r:r + side, c:c + side])
        # the dense output at (i, j) is the patch whose top-left is (r + i, c + j); what the network reads
        # of it is centred pad_before further (patchnet.Geometry)
        r, c = r + g.pad_before, c + g.pad_before
        wanted.append(targets[i][:, r:r + crop, c:c + crop])
    return torch.stack(images), torch.stack(wanted).float()


def thinned(points: list, n: int) -> list:
    """At most about n of `points`, evenly spaced, the last always among them (the record's curve)."""
    kept = points[::max(1, -(-len(points) // n))]
    return kept if not points or kept[-1] is points[-1] else kept + points[-1:]


def lr_scheduler(opt: torch.optim.Optimizer, schedule: str, steps: int):
    """None for a constant learning rate; for "cosine", a scheduler (stepped once per step) that
    decays the optimizer's lr to 0 over `steps`."""
    return torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps) if schedule == "cosine" else None


def train_teacher(cfg: TeacherConfig) -> tuple[dict[str, torch.Tensor], dict]:
    """Distil one teacher. Returns its PatchNet(1) state dict and a record for the model card."""
    t0 = time.time()
    torch.set_flush_denormal(True)  # see students.train_students: denormals make CPU Adam crawl
    device = torch.device(cfg.device)
    if cfg.target not in TARGETS:
        raise TeacherError(f"unknown target {cfg.target!r}; choose one of {', '.join(TARGETS)}")
    if cfg.schedule not in SCHEDULES:
        raise TeacherError(f"unknown schedule {cfg.schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if not 0 < cfg.lr <= MAX_LR:  # NaN too; inf diverged only after P's targets were computed
        raise TeacherError(f"--lr {cfg.lr:g}: a learning rate must be more than 0, and at most {MAX_LR:g}")
    if not cfg.target_strides or not set(cfg.target_strides) <= set(FEATURE_STRIDES):
        raise TeacherError(f"--target-strides {','.join(map(str, cfg.target_strides))}: choose one or more of P's "
                           f"map strides {','.join(map(str, FEATURE_STRIDES))}")
    if not 0 <= cfg.weight_decay <= 1:  # NaN too; Adam adds it to the gradient, where more drowns the loss's
        raise TeacherError(f"--weight-decay {cfg.weight_decay:g}: must be from 0 to 1 (paper: 1e-5)")
    for option, weight in (("--lambda-k", cfg.lambda_k), ("--lambda-c", cfg.lambda_c), ("--lambda-m", cfg.lambda_m),
                           ("--margin", cfg.margin)):
        if not 0 <= weight < math.inf:  # a negative weight rewards the loss it should lower; NaN poisons every step
            raise TeacherError(f"{option} {weight:g}: must be 0 or more")
    if cfg.lambda_k == 0 and cfg.lambda_m == 0:
        raise TeacherError("--lambda-k 0 and --lambda-m 0: the teacher would learn nothing of P (the compactness "
                           "loss alone only decorrelates); give --lambda-k (default 1) or --lambda-m a weight")
    if not 0 <= cfg.seed <= MAX_SEED:  # before seeding: a larger one was "Overflow when unpacking long long"
        raise TeacherError(f"--seed {cfg.seed}: must be from 0 to {MAX_SEED}")
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    if cfg.steps < 1:
        raise TeacherError(f"--steps {cfg.steps}: distillation needs at least 1 step")
    if cfg.batch is not None and cfg.batch < 1:
        raise TeacherError(f"--batch {cfg.batch}: must be at least 1")
    if cfg.crop < 1:
        raise TeacherError(f"--crop {cfg.crop}: a training window needs at least 1 output pixel a side")
    if cfg.batch is None:
        cfg = replace(cfg, batch=DEFAULT_BATCH[cfg.target])
    per_step = cfg.batch if cfg.target == "patch" else cfg.batch * cfg.crop ** 2
    if per_step < 2:  # the compactness loss correlates descriptors with each other: one alone is NaN
        raise TeacherError(f"--batch {cfg.batch}" + ("" if cfg.target == "patch" else f" --crop {cfg.crop}") +
                           f": {per_step} descriptor per step; the compactness loss needs at least 2")
    if cfg.target == "patch" and cfg.patches < 2:
        raise TeacherError(f"--patches {cfg.patches}: the patch pool needs at least 2 patches")
    if cfg.target == "patch" and cfg.backbone_input < MIN_BACKBONE_INPUT:
        raise TeacherError(f"--backbone-input {cfg.backbone_input}: P needs patches of at least {MIN_BACKBONE_INPUT} "
                           "pixels a side (its coarsest map has stride 32)")
    if cfg.pool_images < 1:
        raise TeacherError(f"--pool-images {cfg.pool_images}: the pool must hold at least 1 image")
    if cfg.pool_images < 2 and cfg.lambda_m > 0:  # its negatives come from another photo than their anchors'
        raise TeacherError(f"--pool-images {cfg.pool_images} with --lambda-m {cfg.lambda_m:g}: the triplet loss takes "
                           "its negatives from another image than their anchors', so the pool must hold 2 at least")
    if cfg.pool_refresh < 0:
        raise TeacherError(f"--pool-refresh {cfg.pool_refresh}: steps per replaced image, 0 (never) or more")
    files = natural_image_files(cfg.images)
    # before the photos load (a minute at p = 65): a resnet18 without --backbone-weights, or a bad file
    backbone = build_backbone(cfg.backbone, cfg.backbone_weights).to(device)
    window = cfg.crop + geometry(cfg.p).rf - 1
    rehearse_step(cfg, backbone, window)
    usable = (lambda levels: dense_levels(levels, cfg.p, window)) if cfg.target == "dense" else (lambda levels: levels)
    images = ImagePool(files, cfg.p, cfg.pool_images, cfg.seed, usable)
    if not images.levels:
        if len(images.unreadable) == len(files):
            raise none_readable(cfg.images, len(files))
        if cfg.target == "dense":
            raise TeacherError(f"{cfg.images}: no image holds a training window of --crop {cfg.crop} plus the p={cfg.p} "
                               "patch (--target dense); pass a smaller --crop or larger images")
        raise TeacherError(f"{cfg.images}: no image is at least {cfg.p + 8} pixels a side (p={cfg.p} and a margin); "
                           "use larger images")
    # the triplet loss's positives are shifted copies: they need p + 2 shifts of room, not the pyramid's p + 8
    shift = max(1, cfg.p // 8)

    def triplet_levels() -> tuple[list[torch.Tensor], list[int]]:
        """The levels with room for the shifted positives, and the photo of each; none unless they
        come from two photos at least (a negative is from another photo than its anchor's)."""
        roomy = [(t, i) for t, i in zip(images.levels, images.photos) if min(t.shape[1:]) >= cfg.p + 2 * shift]
        return ([t for t, _ in roomy], [i for _, i in roomy]) if len({i for _, i in roomy}) >= 2 else ([], [])

    if cfg.lambda_m > 0 and not triplet_levels()[0]:
        raise TeacherError(f"{cfg.images}: the triplet loss (--lambda-m {cfg.lambda_m:g}) at p={cfg.p} needs two images "
                           f"at least {cfg.p + 2 * shift} pixels a side (its negatives come from another image than "
                           "their anchors'), and fewer are; use more or larger images, or --lambda-m 0")
    if cfg.target == "dense":
        maps = p_maps(backbone, images.levels, cfg.p, cfg.target_strides)
        mean, std = channel_stats(maps)  # of the first pool: the images streamed in later are standardized alike
        images.assign(standardize_(maps, mean, std))
        del maps
        images.targets_of = lambda levels: standardize_(p_maps(backbone, levels, cfg.p, cfg.target_strides), mean, std)
        target_dim = images.targets[0].shape[0]
    else:
        # P's descriptors of a fixed pool of patches, cut from the images as they stream through
        # the image pool, a share from each pool's worth (one share where all images fit)
        rounds = -(-min(len(files), cfg.patches) // cfg.pool_images) if images.streaming else 1
        parts = []
        for r in range(rounds):
            if r:
                images.advance(cfg.pool_images)
            share = cfg.patches // rounds + (r < cfg.patches % rounds)
            parts.append(sample_patches(images.levels, cfg.p, share, gen)[0])
        pool = torch.cat(parts)
        targets = backbone_descriptors(backbone, pool.to(device), cfg.backbone_input).cpu()
        target_dim = targets.shape[1]
    if not (cfg.target == "dense" and images.streaming and cfg.pool_refresh):
        del backbone  # no image comes in later that needs P

    def batch_of_descriptors() -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 128) descriptors of the step's inputs (autocast as configured) and their (N, dim P) targets."""
        if cfg.target == "dense":
            x, t = sample_windows(images.levels, images.targets, cfg.p, cfg.crop, cfg.batch, gen)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp):
                desc = net.dense(normalize_input(x.to(device)))[:, 0]
            return desc.permute(0, 2, 3, 1).reshape(-1, DESCRIPTOR_DIM), t.permute(0, 2, 3, 1).reshape(-1, target_dim)
        idx = torch.randint(len(pool), (cfg.batch,), generator=gen)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp):
            desc = net(normalize_input(pool[idx].to(device)))[:, 0]
        return desc, targets[idx]

    net = PatchNet(cfg.p, n=1).to(device)
    decoder = nn.Linear(DESCRIPTOR_DIM, target_dim).to(device)
    params = list(net.parameters()) + list(decoder.parameters())
    opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = lr_scheduler(opt, cfg.schedule, cfg.steps)
    history = []
    bar = progress(range(cfg.steps), desc=f"teacher p={cfg.p}", unit="step")
    for step in bar:
        if cfg.pool_refresh and step and step % cfg.pool_refresh == 0 and (cfg.target == "dense" or cfg.lambda_m > 0):
            images.advance()  # streaming: the image held longest makes room for the next (dense windows, triplets)
        desc, target = batch_of_descriptors()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp):
            decoded = decoder(desc)
        desc = desc.float()  # the losses in float32: correlations and squared norms need the range
        l_k = knowledge_distillation_loss(decoded.float(), target.to(device))
        loss = cfg.lambda_k * l_k + cfg.lambda_c * compactness_loss(desc)
        roomy, photos = triplet_levels() if cfg.lambda_m > 0 else ([], [])
        if roomy:  # (empty only while a streamed pool holds fewer than two images large enough: that step goes without)
            anchors, positives, negatives = sample_triplets(roomy, photos, cfg.p, cfg.batch, gen, shift)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp):
                a, pp, n = (net(normalize_input(t.to(device)))[:, 0].float() for t in (anchors, positives, negatives))
            loss = loss + cfg.lambda_m * triplet_loss(a, pp, n, cfg.margin)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        if step % 50 == 0 or step == cfg.steps - 1:  # reading the loss syncs a GPU: not every step
            value = loss.item()
            if not math.isfinite(value):  # NaN weights stay NaN: the last step is checked too
                bar.close()
                raise TeacherError(f"p={cfg.p}: the teacher's loss became {value} by step {step + 1}: training "
                                   f"diverged; train again with a lower --lr (now {cfg.lr:g}). This teacher was not written")
            bar.set_postfix(loss=f"{value:.3f}", l_k=f"{l_k.item():.3f}")
            history.append({"step": step, "loss": round(value, 5), "l_k": round(l_k.item(), 5)})
    # How much of P's descriptor the decoder recovers: 1 - residual / variance, on the patch pool
    # (target "patch") or on 16 fresh batches of windows (target "dense").
    with torch.no_grad():
        if cfg.target == "dense":
            pairs = [batch_of_descriptors() for _ in range(16)]
            recon = torch.cat([decoder(d.float()).cpu() for d, _ in pairs])
            wanted = torch.cat([t for _, t in pairs])
        else:
            recon = torch.cat([decoder(net(normalize_input(pool[i:i + 256].to(device)))[:, 0]).cpu()
                               for i in range(0, len(pool), 256)])
            wanted = targets
        r2 = 1 - (recon - wanted).square().sum() / (wanted - wanted.mean(0)).square().sum()
    record = {"config": asdict(cfg), "target_dim": int(target_dim),
              "patch_pool": len(pool) if cfg.target == "patch" else None,
              "images": {"files": len(files), "taken_in": len(images.taken), "unreadable": len(images.unreadable),
                         "too_small": len(images.unusable), "replaced": images.swaps},
              "explained_variance_of_P": round(float(r2), 4),
              "loss_history": thinned(history, LOSS_HISTORY_POINTS), "wall_s": round(time.time() - t0, 1)}
    state = {k: v.cpu() for k, v in net.state_dict().items()}
    if not all(torch.isfinite(v).all() for v in state.values()) or not math.isfinite(float(r2)):
        # the last step can break the weights after the last loss that was checked (e.g. --steps 1 at a huge --lr)
        raise TeacherError(f"p={cfg.p}: the teacher's weights became NaN or infinite: training diverged; train again "
                           f"with a lower --lr (now {cfg.lr:g}). This teacher was not written")
    return state, record

