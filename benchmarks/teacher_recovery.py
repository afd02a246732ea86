"""How much of each of P's feature maps a teacher's descriptors hold, on its photos and on a category.

    python benchmarks/teacher_recovery.py --data-root ../shared/datasets --scales 17

A dense-target teacher (README: Teachers) learns P's stride-8 and stride-16 maps at each patch's
centre through a linear decoder that is not kept. This fits that decoder again, by least squares,
from the teacher's dense descriptors (bfloat16 autocast, as the shipped teachers were trained) to P's
dense target (as `ustudents teacher --target dense` makes it), on random pixels of the first half of
the images, and reports the share of the target's variance it recovers on the second half (R^2, on
images the fit did not see), for each of P's maps apart and together. The training record's share
(`explained_variance_of_P`) is higher: it is measured on the teacher's own photos with its own decoder. It does so on the
teacher's own training photos (`--images`, default the scikit-image ones) and on a category's good
training images at `--image-size`: a teacher that holds much less of P on the category than on its
photos does not carry over to it. Writes benchmarks/results/<name>.json and .md.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import click
import numpy as np
import torch

from common import device_label, machine, name_option, one_line_errors, write_result  # noqa: E402

from ustudents.engines.model import normalize_input
from ustudents.engines.patchnet import PatchNet, geometry
from ustudents.train import dataset
from ustudents.train.backbones import FEATURE_STRIDES, build_backbone
from ustudents.train.teacher import TeacherConfig, dense_levels, dense_targets
from ustudents.train.teacher_images import SKIMAGE_SOURCE, load_natural_images, pyramid
from ustudents.train.teacher_files import DEFAULT_DIR, load_teacher

PIXELS_PER_IMAGE = 400  # random pixels per image (photo pyramid level or category image)
RIDGE = 1e-3  # keeps the normal equations well posed; far below the descriptors' variance


@torch.no_grad()
def descriptor_target_pairs(net: PatchNet, levels: list[torch.Tensor], targets: list[torch.Tensor],
                            gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 128) teacher descriptors and (N, C) targets at the same random pixels of every level."""
    g = geometry(net.p)
    xs, ys = [], []
    for level, target in zip(levels, targets):
        with torch.autocast("cpu", dtype=torch.bfloat16):  # as the teachers were trained (--amp on)
            desc = net.dense(normalize_input(level[None]))[0, 0].float()  # unpadded: output (i, j) = patch at (i, j)
        h, w = desc.shape[1:]
        # the centres of what the network reads (patchnet.Geometry: for p = 65, 2 px up-left of the patch
        # centres the shipped teacher was distilled against, so its figures before 2709d7f differ)
        target = target[:, g.pad_before:g.pad_before + h, g.pad_before:g.pad_before + w].float()
        idx = torch.randint(h * w, (PIXELS_PER_IMAGE,), generator=gen)
        xs.append(desc.reshape(desc.shape[0], -1)[:, idx].T)
        ys.append(target.reshape(target.shape[0], -1)[:, idx].T)
    return torch.cat(xs).double(), torch.cat(ys).double()


def recovered_share(x_fit, y_fit, x_test, y_test) -> float:
    """R^2 on the test pairs of the least-squares affine map fitted on the fit pairs."""
    a = torch.cat([x_fit, torch.ones(len(x_fit), 1, dtype=x_fit.dtype)], 1)
    w = torch.linalg.solve(a.T @ a + RIDGE * torch.eye(a.shape[1], dtype=a.dtype), a.T @ y_fit)
    pred = torch.cat([x_test, torch.ones(len(x_test), 1, dtype=x_test.dtype)], 1) @ w
    return float(1 - (pred - y_test).square().sum() / (y_test - y_test.mean(0)).square().sum())


@click.command()
@click.option("--data-root", type=click.Path(path_type=Path), required=True)
@click.option("--category", default="magnetic_tile", show_default=True)
@click.option("--image-size", default=256, show_default=True)
@click.option("--category-images", default=50, show_default=True, help="Good training images of the category used.")
@click.option("--images", default=SKIMAGE_SOURCE, show_default=True, help="The teachers' training photos.")
@click.option("--teachers", "teacher_dirs", multiple=True, type=click.Path(path_type=Path),
              help="A teacher folder (repeatable).  [default: the shipped teachers]")
@click.option("--scales", default="17,33,65", show_default=True)
@click.option("--seed", default=0, show_default=True)
@name_option
@one_line_errors
def main(data_root, category, image_size, category_images, images, teacher_dirs, scales, seed, name):
    t0 = time.time()
    backbone = build_backbone("efficientnet-lite0")
    good = dataset.train_samples(data_root, category)
    good = [good[i] for i in np.random.default_rng(seed).permutation(len(good))[:category_images]]
    category_levels = [torch.from_numpy(img).permute(2, 0, 1).float().div(255).expand(3, -1, -1)
                       for img in dataset.load_images(good, image_size, "category images")]
    photos = load_natural_images(images)
    # each map is standardized over its own pixels (dense_targets), so the channels of P's maps
    # together are the stride-8 channels followed by the stride-16 ones
    widths = [m.shape[1] for m in backbone.feature_maps(torch.rand(1, 3, 64, 64))]
    bounds = dict(zip(FEATURE_STRIDES, np.cumsum([0] + widths).tolist()))
    groups = {f"stride {s}": slice(bounds[s], bounds[s] + w) for s, w in zip(FEATURE_STRIDES, widths)}
    groups["both"] = slice(0, sum(widths))
    results, rows = {}, []
    for p in (int(s) for s in scales.split(",")):
        window = TeacherConfig.crop + geometry(p).rf - 1  # the images a dense teacher trains on, as it picks them
        domains = {"photos": dense_levels(pyramid(photos, p), p, window), category: dense_levels(category_levels, p, window)}
        targets = {d: dense_targets(backbone, levels, p) for d, levels in domains.items()}
        for folder in teacher_dirs or (DEFAULT_DIR,):
            net = PatchNet(p).eval()
            net.load_state_dict(load_teacher(folder, p))
            label = f"{Path(folder).name}/p={p}"
            results[label] = {}
            for domain, levels in domains.items():
                gen = torch.Generator().manual_seed(seed)
                x, y = descriptor_target_pairs(net, levels, targets[domain], gen)
                half = len(x) // 2
                shares = {g: recovered_share(x[:half], y[:half, sl], x[half:], y[half:, sl]) for g, sl in groups.items()}
                results[label][domain] = {"pixels": len(x), **{g: round(v, 4) for g, v in shares.items()}}
                rows.append(f"{label:32}{domain:16}" + "".join(f"{shares[g]:12.3f}" for g in groups))
                click.echo(rows[-1])
    table = "\n".join([f"{'teacher':32}{'images':16}" + "".join(f"{g:>12}" for g in groups)] + rows)
    info = machine(torch.device("cpu"))
    record = {"summary": {"device": device_label(info), "dataset": str(data_root / category),
                          "image_size": image_size, "category_images": len(category_levels), "photos": images,
                          "pixels_per_image": PIXELS_PER_IMAGE},
              "results": results, "machine": info, "wall_s": round(time.time() - t0, 1),
              "command": "python benchmarks/teacher_recovery.py " + " ".join(sys.argv[1:])}
    path = write_result(name, record, f"# Teacher recovery: {name}\n\nMachine: {device_label(info)}. Share of "
                        f"the variance of P's dense target (EfficientNet-Lite0) that an affine map of the "
                        f"teacher's descriptors, fitted on half the images, recovers on the other half: on the teachers' photos ({images}) "
                        f"and on {len(category_levels)} good images of {category} at {image_size} px.\n\n"
                        f"```\n{table}\n```\n\nReproduce: `{record['command']}`\n")
    click.echo(table)
    click.echo(f"wrote {path}")


if __name__ == "__main__":
    main()
