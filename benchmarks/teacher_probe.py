"""How much a teacher's descriptors know about a category's defects, without training students.

    python benchmarks/teacher_probe.py --data-root ../shared/datasets/magnetic_tile --image-size 128

The students can only flag what the teacher's descriptors tell apart. This probe scores every test
pixel by the distance of its descriptor to the nearest descriptor of the training images (a memory
bank of good pixels, as PatchCore does) and reports au_pro_30, image AUROC and pixel AUROC per
teacher scale; `--reference` adds the same probe on ImageNet EfficientNet-Lite0 mid-level features
(stride 8 and 16 maps, 3x3 averaged, upsampled and concatenated: the PatchCore-style baseline the
training issue quotes). A teacher well below the reference caps what student training can reach;
a teacher close to it points at the students. Teachers to compare are given as folders
(`--teachers DIR`, repeatable; default: the shipped ones). `--fuse` adds each folder's scales fused
as the paper fuses the students' scores (each scale's map standardized by its distances on held-out
good images, then averaged): whether the teachers' scales together tell more than the best alone.
Writes benchmarks/results/<name>.json.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import click
import numpy as np
import torch
import torch.nn.functional as F

from common import device_label, every_kth_per_type, machine, name_option, one_line_errors, write_result  # noqa: E402

from ustudents.engines.images import to_tensor
from ustudents.engines.model import normalize_input
from ustudents.engines.patchnet import PatchNet
from ustudents.train import dataset
from ustudents.train.backbones import build_backbone
from ustudents.train.evaluate import metrics_for
from ustudents.train.teacher_files import DEFAULT_DIR, load_teacher, read_records

KEYS = ("au_pro_30", "image_auroc", "pixel_auroc")


CHUNK = 8  # images per forward pass: features are made and consumed a chunk at a time, so 256 px fits


def teacher_extractor(state: dict, p: int):
    """A function: (N, S, S, 3) uint8 -> (N, 128, S, S) dense teacher descriptors."""
    net = PatchNet(p).eval()
    net.load_state_dict(state)
    return lambda images: net.dense_image(normalize_input(to_tensor(images)))[:, 0]


def reference_extractor():
    """A function: images -> EfficientNet-Lite0's last stride-8 and stride-16 block outputs, 3x3
    averaged (each feature sees its neighbourhood), brought to the image's size: (N, 40 + 112, S, S)."""
    backbone = build_backbone("efficientnet-lite0")

    def extract(images: np.ndarray) -> torch.Tensor:
        x = to_tensor(images)
        return torch.cat([F.interpolate(F.avg_pool2d(m, 3, 1, 1), size=x.shape[-2:], mode="bilinear",
                                        align_corners=False) for m in backbone.feature_maps(x)], 1)
    return extract


def nearest_distance(test: torch.Tensor, bank: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """(N, C, H, W) test features -> (N, H, W) Euclidean distance to the nearest bank row."""
    n, c, h, w = test.shape
    flat = test.permute(0, 2, 3, 1).reshape(-1, c)
    bank_sq = bank.square().sum(1)
    out = torch.empty(len(flat))
    for i in range(0, len(flat), chunk):
        q = flat[i:i + chunk]
        # ||q - b||^2 = ||b||^2 - 2 q.b + ||q||^2; the last term does not change which b is nearest
        d2 = torch.addmm(bank_sq, q, bank.T, alpha=-2).min(1).values + q.square().sum(1)
        out[i:i + chunk] = d2.clamp_min(0).sqrt()
    return out.reshape(n, h, w)


@torch.no_grad()
def probe_maps(extract, train_img: np.ndarray, image_sets: list[np.ndarray], bank_size: int,
               gen: torch.Generator) -> list[torch.Tensor]:
    """Per image set (N, S, S, 3): the (N, S, S) distance of every pixel's descriptor to the nearest
    descriptor of the bank of good pixels."""
    # the bank: bank_size good pixels drawn at random from all training pixels; every channel is
    # standardized with all good pixels' mean and std so no channel dominates the distance
    n, s = len(train_img), train_img.shape[1]
    chosen = torch.randperm(n * s * s, generator=gen)[:bank_size]
    rows, total, total_sq = [], 0.0, 0.0
    for i in range(0, n, CHUNK):
        feat = extract(train_img[i:i + CHUNK]).double()
        pixels = feat.permute(0, 2, 3, 1).reshape(-1, feat.shape[1])
        total, total_sq = total + pixels.sum(0), total_sq + pixels.square().sum(0)
        local = chosen[(chosen >= i * s * s) & (chosen < (i + len(feat)) * s * s)] - i * s * s
        rows.append(pixels[local])
    count = n * s * s
    mean = total / count
    std = ((total_sq - count * mean.square()) / (count - 1)).clamp_min(0).sqrt() + 1e-6
    bank = ((torch.cat(rows) - mean) / std).float()
    mean, std = mean.float()[:, None, None], std.float()[:, None, None]
    return [torch.cat([nearest_distance((extract(images[i:i + CHUNK]) - mean) / std, bank)
                       for i in range(0, len(images), CHUNK)]) for images in image_sets]


def fuse(test_maps: list[torch.Tensor], holdout_maps: list[torch.Tensor]) -> torch.Tensor:
    """The paper's scale fusion (Sec. 3.3) on probe maps: each scale's map standardized by the mean
    and std of its distances over the pixels of held-out good images, then averaged over scales."""
    return torch.stack([(t - h.mean()) / h.std() for t, h in zip(test_maps, holdout_maps)]).mean(0)


@click.command()
@click.option("--data-root", type=click.Path(path_type=Path), required=True)
@click.option("--category", default="magnetic_tile", show_default=True)
@click.option("--image-size", default=128, show_default=True)
@click.option("--teachers", "teacher_dirs", multiple=True, type=click.Path(path_type=Path),
              help="A teacher folder to probe (repeatable).  [default: the shipped teachers]")
@click.option("--scales", default="17,33,65", show_default=True)
@click.option("--reference/--no-reference", default=True, show_default=True,
              help="Also probe ImageNet EfficientNet-Lite0 features.")
@click.option("--train-images", default=100, show_default=True, help="Good training images the bank is drawn from.")
@click.option("--bank", "bank_size", default=20000, show_default=True, help="Descriptors in the memory bank.")
@click.option("--test-every", default=1, show_default=True, help="Use every k-th test image of each type.")
@click.option("--fuse/--no-fuse", "fuse_scales", default=False, show_default=True,
              help="Also score each teacher folder's scales fused as the paper fuses them, standardized on "
                   "--holdout good training images outside the bank's.")
@click.option("--holdout", default=20, show_default=True, help="Held-out good training images for --fuse.")
@click.option("--seed", default=0, show_default=True)
@name_option
@one_line_errors
def main(data_root, category, image_size, teacher_dirs, scales, reference, train_images, bank_size,
         test_every, fuse_scales, holdout, seed, name):
    t0 = time.time()
    torch.manual_seed(seed)
    scales = [int(s) for s in scales.split(",")]
    train = dataset.train_samples(data_root, category)
    order = np.random.default_rng(seed).permutation(len(train))
    held_out = [train[i] for i in order[train_images:train_images + holdout]] if fuse_scales else []
    train = [train[i] for i in order[:train_images]]
    test = dataset.test_samples(data_root, category)
    test = every_kth_per_type(test, test_every)
    train_img = dataset.load_images(train, image_size, "train images")
    test_img = dataset.load_images(test, image_size, "test images")
    holdout_img = dataset.load_images(held_out, image_size, "held-out good images") if held_out else None
    regions = dataset.load_regions(test, image_size)
    labels = np.array([s.defect != dataset.GOOD for s in test])

    extractors = {}  # label -> (teacher folder or None, a function making the extractor)
    for folder in teacher_dirs or (DEFAULT_DIR,):
        for p in scales:
            extractors[f"{folder.name}/p={p}"] = (folder, lambda folder=folder, p=p: teacher_extractor(load_teacher(folder, p), p))
    if reference:
        extractors["efficientnet-lite0 (ImageNet)"] = (None, reference_extractor)
    results, per_folder = {}, {}

    def report(label, scores, wall_s):
        results[label] = metrics_for(scores.numpy(), regions, labels)
        results[label]["wall_s"] = round(wall_s, 1)
        click.echo(f"{label:40}" + "".join(f"{results[label][k]:8.3f}" for k in KEYS))

    for label, (folder, extract) in extractors.items():
        start = time.time()
        gen = torch.Generator().manual_seed(seed)
        fused_here = fuse_scales and folder is not None
        maps = probe_maps(extract(), train_img, [test_img, holdout_img] if fused_here else [test_img], bank_size, gen)
        report(label, maps[0], time.time() - start)
        if fused_here:
            per_folder.setdefault(folder, []).append((time.time() - start, maps))
    for folder, runs in per_folder.items():
        if len(runs) > 1:
            fused = fuse([m[0] for _, m in runs], [m[1] for _, m in runs])
            report(f"{folder.name}/fused p={','.join(map(str, scales))}", fused, sum(s for s, _ in runs))

    info = machine(torch.device("cpu"))
    teachers = {str(f): {p: read_records(f).get(str(p), {}).get("explained_variance_of_P") for p in scales}
                for f in (teacher_dirs or (DEFAULT_DIR,))}
    table = "\n".join([f"{'':40}" + "".join(f"{k:>12}" for k in KEYS)] +
                      [f"{label:40}" + "".join(f"{r[k]:12.3f}" for k in KEYS) for label, r in results.items()])
    record = {"summary": {"device": device_label(info), "dataset": str(data_root / category),
                          "image_size": image_size, "test_images": len(test), "train_images": len(train),
                          "bank": bank_size, "held_out_images": len(held_out)},
              "results": results, "teachers_explained_variance_of_P": teachers, "machine": info,
              "wall_s": round(time.time() - t0, 1),
              "command": "python benchmarks/teacher_probe.py " + " ".join(sys.argv[1:])}
    path = write_result(name, record, f"# Teacher probe: {name}\n\nMachine: {device_label(info)}. Data: "
                        f"{data_root / category}, {image_size} px, {len(test)} test images, a bank of "
                        f"{bank_size} descriptors from {len(train)} good training images; score = distance "
                        f"to the nearest good descriptor.\n\n```\n{table}\n```\n\nReproduce: `{record['command']}`\n")
    click.echo(table)
    click.echo(f"wrote {path}")


if __name__ == "__main__":
    main()
