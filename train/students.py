"""Student training (paper Sec. 3.2): M students per scale regress the teacher's standardized dense
descriptors on defect-free images.

CPU economy, by construction:
- the teacher's dense descriptors of every training image are computed once per scale and kept (in
  float16, on disk as a memory map, so the page cache decides what stays in RAM);
- the M students of a scale are one fused PatchNet(M) (grouped convolutions): one pass trains all;
- with `crop`, a step trains on a random crop of the dense output; because a dense output pixel
  depends only on its own patch, the crop's targets are an exact slice of the cached descriptors.
"""
from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ustudents.engines.files import reserve_space
from ustudents.engines.images import to_tensor
from ustudents.engines.model import normalize_input
from ustudents.engines.patchnet import DESCRIPTOR_DIM, PatchNet
from ustudents.engines.scoring import standardize

from . import checkpoints
from .progress import progress

# A student's or teacher's --lr: Adam's first step divides it by 1 - beta1 in float32, which overflows
# past about 3e37 (a RuntimeError traceback); far below that every run diverges anyway, and is told so
MAX_LR = 1e30
MAX_SEED = 2**32 - 1  # a student's or teacher's --seed; far larger ones overflow on their way into the generators


@dataclass
class StudentConfig:
    students: int = 3  # M
    epochs: int = 100  # paper: 100 epochs, batch 1, Adam lr 1e-4, weight decay 1e-5
    batch: int = 1
    lr: float = 1e-4
    weight_decay: float = 1e-5
    crop: int = 0  # side of the random training crop of the dense output; 0 = whole image
    amp: bool = True  # bfloat16 autocast for the students' forward/backward
    seed: int = 0
    # Wall-clock limit on student training over all scales, in minutes; 0 = none. Training stops
    # at the end of the last epoch that fits, so a slow CPU trains fewer epochs instead of overrunning.
    max_minutes: float = 0.0


def autocast(device: torch.device, enabled: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


@torch.no_grad()
def dense_descriptors(net: PatchNet, images: np.ndarray, device: torch.device, out: np.ndarray,
                      batch: int = 4, desc: str = "descriptors", bf16: bool = False) -> None:
    """Write the dense descriptors of uint8 images (N, S, S, 3) into `out` (N, n, 128, S, S)."""
    for i in progress(range(0, len(images), batch), desc=desc, unit="batch", leave=False):
        x = normalize_input(to_tensor(images[i:i + batch]).to(device))
        with autocast(device, bf16):
            out[i:i + batch] = net.dense_image(x).float().cpu().numpy()


def descriptor_stats(desc: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of teacher descriptors (N, 1, 128, S, S) over all pixels, in float64."""
    s = np.zeros(DESCRIPTOR_DIM)
    ss = np.zeros(DESCRIPTOR_DIM)
    count = 0
    for d in desc:
        d = d[0].reshape(DESCRIPTOR_DIM, -1).astype(np.float64)
        s += d.sum(1)
        ss += np.square(d).sum(1)
        count += d.shape[1]
    mean = s / count
    std = np.sqrt(np.maximum(ss / count - mean**2, 0))
    return torch.tensor(mean, dtype=torch.float32), torch.tensor(np.maximum(std, 1e-6), dtype=torch.float32)


def crop_window(gen: np.random.Generator, size: int, crop: int) -> tuple[int, slice]:
    """A random training window along an axis of `size` pixels: (start of the `crop`-pixel window
    computed, slice of it that is trained on).

    The window is drawn as if it could hang over the image's edge (start in [-(crop-1), size-1]),
    computed where it fits inside, and trained only on the pixels the drawn window covers. Every
    pixel is then trained on equally often, border pixels included (and weighs alike in the loss:
    window_share); with starts drawn in
    [0, size - crop] a border pixel would be trained on `crop` times less often than a central one,
    and its regression error, hence the image score, would be highest there."""
    if crop >= size:  # whole images (the paper's setting)
        return 0, slice(0, size)
    drawn = int(gen.integers(-(crop - 1), size))
    start = min(max(drawn, 0), size - crop)
    return start, slice(max(drawn, 0) - start, min(drawn + crop, size) - start)


def window_share(rows: slice, cols: slice, crop: int) -> float:
    """The part of a crop window trained on, as a share of the whole window: the weight of its loss
    (a mean over that part). Eq. 5 weighs every pixel alike; with each window's mean alone, the one
    pixel of a window at a corner weighed as much as crop^2 pixels inside (a border pixel 3.4 times a
    central one, a corner 11 times, at 64 px with a crop of 16)."""
    return (rows.stop - rows.start) * (cols.stop - cols.start) / crop**2


def student_loss(mu: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Eq. 5, summed over the M independent students: sum_i mean_pixels || mu_i - y ||^2.
    mu: (B, M, 128, H, W), y: (B, 128, H, W)."""
    return (mu - y[:, None]).square().sum(dim=2).mean(dim=(0, 2, 3)).sum()


class TrainingDiverged(ValueError):
    """The loss stopped being a number: the weights are lost, so nothing may be calibrated or written."""


def another_epoch_fits(now: float, epoch_seconds: list[float], deadline: float | None) -> bool:
    """True if another epoch, as long as the slowest so far, still ends by `deadline` (time.monotonic();
    None = no limit). The first epoch always runs: a limit gives fewer epochs, never no model."""
    return deadline is None or not epoch_seconds or now + max(epoch_seconds) <= deadline


def save_checkpoint(checkpoint: checkpoints.ScaleCheckpoint, log, *args) -> None:
    """ScaleCheckpoint.save; a failure (a full disk) costs the ability to resume, not the training."""
    try:
        checkpoint.save(*args)
    except OSError as err:
        log(f"warning: could not save the checkpoint {checkpoint.path} ({err}); training goes on, but an "
            "interruption now restarts from the last checkpoint saved")


def train_students(p: int, teacher_state: dict[str, torch.Tensor], images: np.ndarray, cfg: StudentConfig,
                   device: torch.device, workdir: Path, deadline: float | None = None,
                   checkpoint: checkpoints.ScaleCheckpoint | None = None,
                   log=print) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, dict]:
    """Train the M students of scale p on uint8 images (N, S, S, 3), for cfg.epochs or, with a
    deadline (time.monotonic()), as many of them as end by it (at least one). With a checkpoint,
    continue from the one an interrupted run of the same inputs saved, and save as it goes.

    Returns the fused students' state dict, the teacher descriptor mean and std, and a record."""
    t0 = time.time()
    # Adam's second moments of tiny gradients become float32 denormals, which x86 CPUs compute
    # tens of times slower (measured: Adam's step alone went from 0.02 s to 0.26 s on 9M parameters).
    torch.set_flush_denormal(True)
    saved = checkpoint.load(log) if checkpoint else None
    if saved is not None and saved.done:
        log(f"p={p}: students trained by an earlier run of this command ({len(saved.history)} epochs: {checkpoint.path})")
        return saved.students, saved.desc_mean, saved.desc_std, saved.record
    torch.manual_seed(cfg.seed * 1000 + p)
    gen = np.random.default_rng(cfg.seed * 1000 + p)
    teacher = PatchNet(p, 1).to(device).eval()
    teacher.load_state_dict(teacher_state)
    n, size = len(images), images.shape[1]
    with tempfile.TemporaryDirectory(prefix=f"targets-p{p}-", dir=workdir) as tmp:
        # Teacher targets once (under the same autocast as training), stored as float16 (N, 1, 128, S, S).
        targets = np.lib.format.open_memmap(Path(tmp) / "t.npy", mode="w+", dtype=np.float16,
                                            shape=(n, 1, DESCRIPTOR_DIM, size, size))
        reserve_space(Path(tmp) / "t.npy", f"the p={p} teacher targets ({targets.nbytes / 1e6:.1f} MB)", workdir)
        dense_descriptors(teacher, images, device, targets, desc=f"teacher p={p}", bf16=cfg.amp)
        desc_mean, desc_std = descriptor_stats(targets)
        del teacher

        students = PatchNet(p, cfg.students).to(device).train()
        opt = torch.optim.Adam(students.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        padded = students.pad(normalize_input(to_tensor(images)))  # (N, 3, S + rf - 1, ...), kept on CPU
        rf = students.geometry.rf
        crop = cfg.crop if 0 < cfg.crop < size else size
        steps_per_epoch = math.ceil(n / cfg.batch)
        mean_d, std_d = desc_mean.to(device), desc_std.to(device)
        history, epoch_seconds = [], []
        if saved is not None:
            checkpoints.restore(saved, students, opt, gen)
            history, epoch_seconds = saved.history, saved.epoch_seconds
            log(f"p={p}: resuming after epoch {len(history)} of {cfg.epochs} ({checkpoint.path})")
        resumed_from = len(history)
        last_save = time.monotonic()
        bar = progress(total=cfg.epochs * steps_per_epoch, initial=resumed_from * steps_per_epoch,
                       desc=f"students p={p}", unit="step")
        try:  # the bar is closed on every way out (an interrupt, a divergence), or later bars draw below it
            for epoch in range(resumed_from, cfg.epochs):
                if not another_epoch_fits(time.monotonic(), epoch_seconds, deadline):
                    break
                started = time.monotonic()
                order = gen.permutation(n)
                total = 0.0
                for s in range(steps_per_epoch):
                    idx = np.sort(order[s * cfg.batch:(s + 1) * cfg.batch])
                    (r, rows), (c, cols) = crop_window(gen, size, crop), crop_window(gen, size, crop)
                    x = padded[idx, :, r:r + crop + rf - 1, c:c + crop + rf - 1].to(device)
                    t = torch.from_numpy(targets[idx, 0, :, r:r + crop, c:c + crop][..., rows, cols].astype(np.float32))
                    y = standardize(t.to(device), mean_d, std_d)
                    with autocast(device, cfg.amp):
                        mu = students.dense(x)
                    loss = student_loss(mu.float()[..., rows, cols], y)
                    opt.zero_grad(set_to_none=True)
                    (loss * window_share(rows, cols, crop)).backward()
                    opt.step()
                    value = loss.item()
                    if not math.isfinite(value):
                        raise TrainingDiverged(
                            f"p={p}: the students' loss became {value} in epoch {epoch + 1}, step {s + 1}: training "
                            f"diverged; train again with a lower --lr (now {cfg.lr:g}). No model was written")
                    total += value
                    bar.update()
                # the loss is taken before each step: the last step of an epoch can leave the weights NaN
                # with every loss finite, and they must not be checkpointed or calibrated on
                if not all(torch.isfinite(w).all() for w in students.parameters()):
                    raise TrainingDiverged(
                        f"p={p}: the students' weights became inf or NaN in epoch {epoch + 1}: training diverged; "
                        f"train again with a lower --lr (now {cfg.lr:g}). No model was written")
                history.append(round(total / steps_per_epoch / cfg.students, 5))
                epoch_seconds.append(time.monotonic() - started)
                bar.set_postfix(epoch=epoch + 1, loss=f"{history[-1]:.3f}")
                if checkpoint and epoch + 1 < cfg.epochs and time.monotonic() - last_save >= checkpoints.CHECKPOINT_EVERY_S:
                    save_checkpoint(checkpoint, log, students, opt, gen, history, epoch_seconds)
                    last_save = time.monotonic()
        finally:
            bar.close()
    record = {"loss_per_student_by_epoch": history, "epochs_trained": len(history),
              "stopped_by_time_limit": len(history) < cfg.epochs, "wall_s": round(time.time() - t0, 1), "crop": crop,
              "resumed_after_epoch": resumed_from}
    if checkpoint:  # cut short by the time limit: kept with Adam's state, to train on in a later run
        save_checkpoint(checkpoint, log, students, opt if record["stopped_by_time_limit"] else None, gen, history,
                        epoch_seconds, record, (desc_mean, desc_std))
    return {k: v.cpu() for k, v in students.state_dict().items()}, desc_mean, desc_std, record
