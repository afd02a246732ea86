"""Student training: windows train every pixel, border pixels included, equally often; the share of
the teacher's variance the students predict on validation images means what the training log says;
a time limit ends training after the last epoch that fits; progress in a log is a line per half minute."""
import io
import time

import numpy as np
import pytest
import torch
from tqdm import tqdm

from ustudents.engines.images import to_tensor
from ustudents.engines.model import AnomalyModel, normalize_input
from ustudents.engines.patchnet import DESCRIPTOR_DIM, PatchNet
from ustudents.engines.scoring import ScoreStats
from ustudents.train.calibrate import errors_and_variances, predicted_share
from ustudents.train.progress import LOG_INTERVAL_S, progress
from ustudents.train import checkpoints
from ustudents.train import students as students_module
from ustudents.train.students import StudentConfig, another_epoch_fits, crop_window, train_students, window_share


def coverage(size: int, crop: int, draws: int = 20000) -> np.ndarray:
    gen = np.random.default_rng(0)
    hits = np.zeros(size)
    for _ in range(draws):
        start, trained = crop_window(gen, size, crop)
        assert 0 <= start <= size - crop  # the computed window lies inside the image (targets exist there)
        assert 0 <= trained.start < trained.stop <= crop
        hits[start + trained.start:start + trained.stop] += 1
    return hits / draws


def test_border_pixels_are_trained_on_as_often_as_central_ones():
    cov = coverage(size=128, crop=32)
    # Each pixel lies in `crop` of the size + crop - 1 equally likely drawn windows. Uniform starts
    # in [0, size - crop] instead would give the outermost pixel 1/97 against the centre's 32/97.
    expected = 32 / (128 + 32 - 1)
    assert np.abs(cov - expected).max() < 0.02
    assert cov[0] > 0.9 * expected and cov[-1] > 0.9 * expected


def test_border_pixels_weigh_in_the_loss_as_central_ones_do():
    """Eq. 5 weighs every pixel alike. Each window's loss is a mean over its part inside the image:
    unweighted, the middle of a 64 px image's edge weighed 3.4 times a central pixel (crop 16), a
    corner 11 times, though each was trained on as often (their edge rows 4.4 times here)."""
    gen = np.random.default_rng(0)
    size, crop = 64, 16
    weight = np.zeros((size, size))
    for _ in range(20000):
        (r, rows), (c, cols) = crop_window(gen, size, crop), crop_window(gen, size, crop)
        part = (rows.stop - rows.start) * (cols.stop - cols.start)
        weight[r + rows.start:r + rows.stop, c + cols.start:c + cols.stop] += window_share(rows, cols, crop) / part
    centre = weight[size // 4:-size // 4, size // 4:-size // 4].mean()
    for rim in (weight[0], weight[-1], weight[:, 0], weight[:, -1]):
        assert abs(rim.mean() / centre - 1) < 0.1, rim.mean() / centre
    assert abs(weight[0, 0] / centre - 1) < 0.15  # one pixel, which about 800 of the draws cover


def test_a_window_as_large_as_the_image_is_the_whole_image():
    gen = np.random.default_rng(0)
    for _ in range(20):
        start, trained = crop_window(gen, 64, 64)
        assert (start, trained) == (0, slice(0, 64))


def _ensemble_on(images: np.ndarray, last_scale: float) -> AnomalyModel:
    """A p=17 ensemble of 2 students whose descriptor statistics come from `images`; every student
    is the teacher with its last layer mapped onto the standardized descriptor, times `last_scale`."""
    torch.manual_seed(0)
    model = AnomalyModel([17], 2)
    ens = model.ensembles[0]
    x = normalize_input(to_tensor(images))
    with torch.no_grad():
        t = ens.net.dense_image(x)[:, 0].transpose(0, 1).reshape(DESCRIPTOR_DIM, -1).double()
        ens.desc_mean.copy_(t.mean(1).float())
        ens.desc_std.copy_(t.std(1, unbiased=False).float())
        for conv in ens.net.convs[:-1]:  # students = teacher (group 0) in every layer but the last
            c = conv.out_channels // 3
            conv.weight[c:] = conv.weight[:c].repeat(2, 1, 1, 1)
            conv.bias[c:] = conv.bias[:c].repeat(2)
        last = ens.net.convs[-1]
        w, b = last.weight[:DESCRIPTOR_DIM], last.bias[:DESCRIPTOR_DIM]
        for i in (1, 2):
            rows = slice(i * DESCRIPTOR_DIM, (i + 1) * DESCRIPTOR_DIM)
            last.weight[rows] = last_scale * w / ens.desc_std[:, None, None, None]
            last.bias[rows] = last_scale * (b - ens.desc_mean) / ens.desc_std
    return model


def test_predicted_share_is_one_for_students_equal_to_the_teacher_and_zero_for_the_mean():
    images = np.random.default_rng(0).integers(0, 256, (3, 24, 24, 3), dtype=np.uint8)
    for last_scale, share in ((1.0, 1.0), (0.0, 0.0)):  # 0: students always predict the training mean
        e, v = errors_and_variances(_ensemble_on(images, last_scale), images, torch.device("cpu"))
        got = predicted_share(ScoreStats(float(e.mean()), 1.0, float(v.mean()), 1.0))
        assert got == pytest.approx(share, abs=1e-3), last_scale


def test_another_epoch_is_started_only_if_one_as_slow_as_the_slowest_yet_still_ends_in_time():
    assert another_epoch_fits(now=100.0, epoch_seconds=[], deadline=0.0)  # the first epoch always runs
    assert another_epoch_fits(now=140.0, epoch_seconds=[10.0, 30.0], deadline=170.0)
    assert not another_epoch_fits(now=140.0, epoch_seconds=[10.0, 30.0], deadline=169.0)  # the mean, 20, would fit
    assert another_epoch_fits(now=1e9, epoch_seconds=[10.0] * 50, deadline=None)


def test_a_time_limit_ends_training_after_the_last_epoch_that_fits(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (4, 24, 24, 3), dtype=np.uint8)
    teacher = PatchNet(17, 1).state_dict()
    cfg = StudentConfig(students=2, epochs=3, batch=2, crop=8, amp=False)
    _, _, _, unlimited = train_students(17, teacher, images, cfg, torch.device("cpu"), tmp_path)
    assert (unlimited["epochs_trained"], unlimited["stopped_by_time_limit"]) == (3, False)
    assert len(unlimited["loss_per_student_by_epoch"]) == 3
    # No time at all still trains one epoch (a model, not an error) and says it stopped early.
    _, _, _, limited = train_students(17, teacher, images, cfg, torch.device("cpu"), tmp_path, deadline=0.0)
    assert (limited["epochs_trained"], limited["stopped_by_time_limit"]) == (1, True)
    assert limited["loss_per_student_by_epoch"] == unlimited["loss_per_student_by_epoch"][:1]  # same seed, same first epoch


def interrupt_at_epoch(monkeypatch, epoch: int) -> None:
    """Ctrl-C as epoch `epoch` (0-based) is about to start; a checkpoint after every epoch."""
    real, calls = students_module.another_epoch_fits, []

    def fits(*args):
        calls.append(1)
        if len(calls) == epoch + 1:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(students_module, "another_epoch_fits", fits)
    monkeypatch.setattr(checkpoints, "CHECKPOINT_EVERY_S", 0.0)


def test_an_interrupted_training_resumes_from_its_checkpoint_to_the_same_weights(tmp_path, monkeypatch):
    """Hours of CPU training must survive a Ctrl-C or a crash: the same call continues after the last
    saved epoch and ends with exactly the weights of an uninterrupted run (same order of images,
    same crops, same Adam state)."""
    images = np.random.default_rng(0).integers(0, 256, (4, 24, 24, 3), dtype=np.uint8)
    teacher = PatchNet(17, 1).state_dict()
    cfg = StudentConfig(students=2, epochs=3, batch=2, crop=8, amp=False)
    cpu = torch.device("cpu")
    whole, mean, std, record = train_students(17, teacher, images, cfg, cpu, tmp_path)

    ckpt = checkpoints.ScaleCheckpoint(tmp_path / "ckpt" / "p17.safetensors", key="run-a")
    with monkeypatch.context() as m:
        interrupt_at_epoch(m, 2)
        with pytest.raises(KeyboardInterrupt):
            train_students(17, teacher, images, cfg, cpu, tmp_path, checkpoint=ckpt)
    assert checkpoints.describe(ckpt.path.parent, {17: "run-a"}) == "p=17 after epoch 2"
    assert checkpoints.describe(ckpt.path.parent, {17: "run-b"}) == ""  # another run's: nothing to continue from
    said: list[str] = []
    resumed, mean2, std2, record2 = train_students(17, teacher, images, cfg, cpu, tmp_path, checkpoint=ckpt,
                                                   log=said.append)
    assert said == [f"p=17: resuming after epoch 2 of 3 ({ckpt.path})"]
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    assert torch.equal(mean, mean2) and torch.equal(std, std2)
    assert record2["loss_per_student_by_epoch"] == record["loss_per_student_by_epoch"]
    assert record2["resumed_after_epoch"] == 2 and record["resumed_after_epoch"] == 0
    # a scale that finished is not trained again: its saved result comes back as it was
    assert checkpoints.describe(ckpt.path.parent, {17: "run-a"}) == "p=17 done"
    with monkeypatch.context() as m:
        interrupt_at_epoch(m, 0)  # would raise if an epoch started
        again, _, _, record3 = train_students(17, teacher, images, cfg, cpu, tmp_path, checkpoint=ckpt, log=said.append)
    assert all(torch.equal(whole[k], again[k]) for k in whole) and record3 == record2
    # another run's checkpoint (other settings or data: another key) is not used
    other = checkpoints.ScaleCheckpoint(ckpt.path, key="run-b")
    _, _, _, fresh = train_students(17, teacher, images, cfg, cpu, tmp_path, checkpoint=other, log=said.append)
    assert fresh["resumed_after_epoch"] == 0 and "a checkpoint of other settings or data" in said[-1]


def test_a_checkpoint_of_other_settings_says_which_differ():
    """It said only "a checkpoint of other settings or data": which option, or the images, changed went
    unsaid, and the scale's saved epochs were trained again."""
    from dataclasses import asdict

    teacher, cpu = PatchNet(17, 1).state_dict(), torch.device("cpu")
    cfg = StudentConfig(students=2, epochs=3, batch=2)
    key, inputs = checkpoints.scale_key(17, teacher, asdict(cfg), 64, ["a.png", "b.png"], "f1", 8, cpu)
    assert checkpoints.scale_key(17, teacher, asdict(cfg), 64, ["b.png", "a.png"], "f1", 8, cpu)[0] == key
    again = checkpoints.scale_key(17, teacher, {**asdict(cfg), "epochs": 4, "lr": 1e-3, "max_minutes": 5},
                                  64, ["a.png"], "f2", 8, cpu)
    assert again[0] != key
    assert checkpoints.differences(inputs, again[1]) == ("--epochs 3, now 4; --lr 0.0001, now 0.001; the training "
                                                         "images or their split (--val-fraction); the contents of the "
                                                         "training images")
    other_teacher = checkpoints.scale_key(17, PatchNet(17, 1).state_dict(), asdict(cfg), 128, ["a.png", "b.png"],
                                          "f1", 8, cpu)[1]
    assert checkpoints.differences(inputs, other_teacher) == "--image-size 64, now 128; the teacher"
    assert checkpoints.differences(None, inputs) == ""  # saved before the inputs were kept
    amp = checkpoints.scale_key(17, teacher, {**asdict(cfg), "amp": False}, 64, ["a.png", "b.png"], "f1", 8, cpu)[1]
    assert checkpoints.differences(inputs, amp) == "--amp on, now off"  # as the option takes it, not True/False
    older = {**inputs, "student": {k: v for k, v in inputs["student"].items() if k != "crop"}, "ustudents": "0.0.9"}
    assert checkpoints.differences(older, inputs) == f"the ustudents version 0.0.9, now {inputs['ustudents']}"


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage", "no metadata", "data"])
def test_a_damaged_checkpoint_restarts_its_scale_and_says_so(tmp_path, damage):
    """A crash or a full disk can leave any file behind: it must cost the scale's progress, never the run.
    Damage inside the tensors' data (a bad sector) parsed: a finished scale was used as saved, or the
    training resumed from weights that diverged at once, and the error said to lower --lr."""
    from safetensors.torch import save_file

    images = np.random.default_rng(0).integers(0, 256, (4, 24, 24, 3), dtype=np.uint8)
    teacher = PatchNet(17, 1).state_dict()
    cfg = StudentConfig(students=2, epochs=1, batch=2, crop=8, amp=False)
    ckpt = checkpoints.ScaleCheckpoint(tmp_path / "p17.safetensors", key="k")
    ckpt.save(PatchNet(17, 2), None, np.random.default_rng(0), [1.0], [1.0], {}, (torch.zeros(1), torch.ones(1)))
    data = ckpt.path.read_bytes()
    if damage == "no metadata":
        save_file({"x": torch.zeros(1)}, str(ckpt.path))
    elif damage == "data":  # 64 bytes of a weight, past the header, set to 0xFF: NaNs that still parse
        start = 8 + int.from_bytes(data[:8], "little") + 1000
        ckpt.path.write_bytes(data[:start] + b"\xff" * 64 + data[start + 64:])
    else:
        ckpt.path.write_bytes({"empty": b"", "truncated": data[:len(data) // 2], "garbage": b"\x07" * 100}[damage])
    said: list[str] = []
    _, _, _, record = train_students(17, teacher, images, cfg, torch.device("cpu"), tmp_path, checkpoint=ckpt,
                                     log=said.append)
    assert record["epochs_trained"] == 1 and record["resumed_after_epoch"] == 0
    assert said[0].startswith(f"{ckpt.path}: unreadable checkpoint (") and said[0].endswith("training this scale from the start")
    assert ("does not match the checksum saved with it: damaged on disk" in said[0]) == (damage == "data")
    assert checkpoints.describe(tmp_path, {17: "k"}) == "p=17 done"  # replaced by a good one
    (tmp_path / "p017.safetensors").write_bytes(ckpt.path.read_bytes())  # no scale's name: not a second p=17
    assert checkpoints.describe(tmp_path, {17: "k"}) == "p=17 done" and not checkpoints.describe(tmp_path, {17: "k"},
                                                                                                 others=True)


def test_a_scale_cut_short_by_the_time_limit_trains_on_in_the_next_run(tmp_path):
    """Its checkpoint is not final: a next run with more time (or none set) continues its epochs."""
    images = np.random.default_rng(0).integers(0, 256, (4, 24, 24, 3), dtype=np.uint8)
    teacher = PatchNet(17, 1).state_dict()
    cfg = StudentConfig(students=2, epochs=3, batch=2, crop=8, amp=False)
    ckpt = checkpoints.ScaleCheckpoint(tmp_path / "p17.safetensors", key="k")
    cpu = torch.device("cpu")
    _, _, _, cut = train_students(17, teacher, images, cfg, cpu, tmp_path, deadline=0.0, checkpoint=ckpt)
    assert (cut["epochs_trained"], cut["stopped_by_time_limit"]) == (1, True)
    assert checkpoints.describe(tmp_path, {17: "k"}) == "p=17 after epoch 1"
    whole, _, _, _ = train_students(17, teacher, images, cfg, cpu, tmp_path)
    more, _, _, record = train_students(17, teacher, images, cfg, cpu, tmp_path, checkpoint=ckpt)
    assert (record["epochs_trained"], record["stopped_by_time_limit"], record["resumed_after_epoch"]) == (3, False, 1)
    assert all(torch.equal(whole[k], more[k]) for k in whole)


def test_a_checkpoint_that_cannot_be_written_costs_resuming_not_the_training(tmp_path, monkeypatch):
    images = np.random.default_rng(0).integers(0, 256, (4, 24, 24, 3), dtype=np.uint8)
    cfg = StudentConfig(students=2, epochs=2, batch=2, crop=8, amp=False)

    def disk_full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoints.ScaleCheckpoint, "save", disk_full)
    monkeypatch.setattr(checkpoints, "CHECKPOINT_EVERY_S", 0.0)
    said: list[str] = []
    _, _, _, record = train_students(17, PatchNet(17, 1).state_dict(), images, cfg, torch.device("cpu"), tmp_path,
                                     checkpoint=checkpoints.ScaleCheckpoint(tmp_path / "p17.safetensors", "k"),
                                     log=said.append)
    assert record["epochs_trained"] == 2
    assert len(said) == 2 and all("No space left on device" in s and "training goes on" in s for s in said)


def test_progress_written_to_a_log_updates_every_half_minute_not_every_step():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    log, plain = io.StringIO(), io.StringIO()
    for bar, stream in ((progress, log), (tqdm, plain)):
        for _ in bar(range(100), file=stream, desc="students p=17"):
            time.sleep(0.005)  # half a second in all: tqdm's own default writes about 5 updates
    assert log.getvalue().count("students p=17") == 2  # the start and the end, not an update per step
    assert plain.getvalue().count("students p=17") > 2
    with progress(range(3), file=log) as to_log, progress(range(3), file=Terminal()) as live:
        assert (to_log.mininterval, live.mininterval) == (LOG_INTERVAL_S, 0.1)  # a terminal stays live


def test_students_learn_to_regress_the_standardized_teacher_at_each_pixel(tmp_path):
    """Training moves the students' mean towards the teacher's standardized descriptor of the same
    pixel: a target cut from another place of the window (mirrored, say) trains students that predict
    about a third as much (0.16 against 0.43 of the teacher's variance, measured when this test was
    written, on a 2-core AVX2 EPYC)."""
    from conftest import _texture
    from ustudents.engines.patchnet import merge, split

    rng = np.random.default_rng(0)
    images = np.stack([_texture(rng, 24, 24, True) for _ in range(4)])
    torch.manual_seed(0)
    teacher = PatchNet(17, 1).state_dict()
    cfg = StudentConfig(students=2, epochs=20, batch=2, crop=8, lr=1e-3, amp=False)
    students, mean, std, _ = train_students(17, teacher, images, cfg, torch.device("cpu"), tmp_path)

    def share(students_state) -> float:
        model = AnomalyModel([17], 2)
        ens = model.ensembles[0]
        ens.net.load_state_dict(merge([teacher] + split(students_state, 2)))
        ens.desc_mean.copy_(mean)
        ens.desc_std.copy_(std)
        e, v = errors_and_variances(model, images, torch.device("cpu"))
        return predicted_share(ScoreStats(float(e.mean()), 1.0, float(v.mean()), 1.0))

    assert abs(share(PatchNet(17, 2).state_dict())) < 0.05  # untrained: no better than the mean
    assert share(students) > 0.3
