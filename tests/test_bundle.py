"""The bundle format: round trip, atomic replacement, and refusal of damaged bundles."""
import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ustudents.engines.bundle import (POSITION_TENSORS, BundleError, load_bundle, rewrite_bundle, update_manifest,
                                      write_bundle)
from ustudents.engines.frame_shapes import FrameShapes, UnexpectedShape
from ustudents.engines.images import ImageError
from ustudents.engines.patchnet import PatchNet
from ustudents.engines.runtime import model_digest


def make_bundle(path, scales=(17,), students=2, seed=0, position=False):
    torch.manual_seed(seed)
    tensors = {}
    image_score = {"method": "max", "threshold": 3.0}
    if position:
        tensors.update({POSITION_TENSORS[0]: torch.rand(64, 64), POSITION_TENSORS[1]: torch.rand(64, 64) + 1})
        image_score = {"method": "position_z_max", "threshold": 4.5}
    for p in scales:
        tensors.update({f"{p}.teacher.{k}": v for k, v in PatchNet(p).state_dict().items()})
        tensors.update({f"{p}.students.{k}": v for k, v in PatchNet(p, students).state_dict().items()})
    stats = {str(p): {"desc_mean": [0.5] * 128, "desc_std": [2.0] * 128, "e_mu": 1.0, "e_sigma": 2.0,
                      "v_mu": 0.1, "v_sigma": 0.2} for p in scales}
    manifest = {"id": f"t-{seed}", "category": "t", "image_size": 64, "scales": list(scales), "students": students,
                "statistics": stats, "threshold": {"value": 3.0}, "image_score": image_score, "evaluation": None}
    return write_bundle(path, manifest, tensors), tensors


def edit_manifest(path, edit):
    """Change a written bundle's manifest by hand, bypassing the writer (as damage or an old release would)."""
    m = json.loads((path / "manifest.json").read_text())
    edit(m)
    (path / "manifest.json").write_text(json.dumps(m))


def test_round_trip_restores_weights_and_statistics(tmp_path):
    path, tensors = make_bundle(tmp_path / "b")
    bundle = load_bundle(path)
    assert all(torch.equal(bundle.tensors[k], v) for k, v in tensors.items())
    model = bundle.model()
    ens = model.ensembles[0]
    # group 0 of the fused network is the teacher, groups 1.. the students
    assert torch.equal(ens.net.convs[0].weight[:128], tensors["17.teacher.convs.0.weight"])
    assert torch.equal(ens.net.convs[0].weight[128:], tensors["17.students.convs.0.weight"])
    assert ens.desc_std.tolist() == [2.0] * 128
    assert ens.score_stats.tolist() == pytest.approx([1.0, 2.0, 0.1, 0.2])
    fused, per_scale = model(torch.rand(1, 3, 64, 64))
    assert fused.shape == (1, 64, 64) and per_scale.shape == (1, 1, 64, 64)


def test_rewrite_replaces_whole_bundle_and_leaves_no_temporaries(tmp_path):
    make_bundle(tmp_path / "b", seed=0)
    make_bundle(tmp_path / "b", seed=1)
    assert load_bundle(tmp_path / "b").manifest["id"] == "t-1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_failed_write_leaves_previous_bundle_intact(tmp_path):
    make_bundle(tmp_path / "b", seed=0)
    with pytest.raises(TypeError):
        write_bundle(tmp_path / "b", {"x": object()}, {"a": torch.zeros(1)})  # manifest not serializable
    assert load_bundle(tmp_path / "b").manifest["id"] == "t-0"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


@pytest.mark.parametrize("after_rename", [1, 2])
def test_ctrl_c_during_the_swap_leaves_the_old_or_the_new_bundle_and_nothing_else(tmp_path, monkeypatch, after_rename):
    """A signal lands when a rename returns. After the first (the old bundle moved aside), `out` was left
    missing with the old bundle only in a hidden folder; after the second, that folder stayed."""
    import os

    import ustudents.engines.bundle as bundle_module

    make_bundle(tmp_path / "b", seed=0)
    real, calls = os.replace, []

    def interrupted_after(src, dst):
        real(src, dst)
        calls.append(src)
        if len(calls) == after_rename:
            raise KeyboardInterrupt

    monkeypatch.setattr(bundle_module.os, "replace", interrupted_after)
    with pytest.raises(KeyboardInterrupt):
        make_bundle(tmp_path / "b", seed=1)
    monkeypatch.undo()
    assert load_bundle(tmp_path / "b").manifest["id"] == ("t-0" if after_rename == 1 else "t-1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_only_a_users_own_files_stop_a_bundle_folder_being_replaced(tmp_path):
    """Retraining replaces the folder whole: a user's notes there were deleted with it. The bundle's
    own leftovers (an interrupted write's hidden files, a recalibration's weights) are not the user's."""
    from ustudents.engines.bundle import check_writable

    make_bundle(tmp_path / "b", seed=0)
    (tmp_path / "b" / ".manifest.json.partial").write_text("{")
    (tmp_path / "b" / "weights.0123456789ab.safetensors").write_bytes(b"")
    (tmp_path / "b" / "engines").mkdir()
    check_writable(tmp_path / "b")
    (tmp_path / "b" / ".weights.123.partial").write_bytes(b"")
    (tmp_path / "b" / ".nfs000123").write_bytes(b"")
    (tmp_path / "b" / "._manifest.json").write_bytes(b"")  # copied by a Mac
    check_writable(tmp_path / "b")
    (tmp_path / "b" / "notes.txt").write_text("mine")
    with pytest.raises(BundleError, match="holds notes.txt besides its model bundle"):
        check_writable(tmp_path / "b")
    (tmp_path / "b" / "notes.txt").unlink()
    (tmp_path / "b" / ".git").mkdir()  # a bundle folder under version control: hidden, and the user's
    with pytest.raises(BundleError, match=r"holds \.git besides its model bundle"):
        check_writable(tmp_path / "b")
    (tmp_path / "b" / ".git").rmdir()
    # built engines are the bundle's; a backup of the weights, or a note among the engines, the user's
    for name in ("model-fp32.onnx", "model-fp16-nvidia-h100-80gb-hbm3.plan",
                 "tensorrt-nvidia-h100-80gb-hbm3-10-3-0.timing-cache", ".model-int8.onnx.partial"):
        (tmp_path / "b" / "engines" / name).write_bytes(b"")
    check_writable(tmp_path / "b")
    for mine in ("weights-before-recalibration.safetensors", "engines/README.txt"):
        (tmp_path / "b" / mine).write_text("mine")
        with pytest.raises(BundleError, match=f"holds {mine} besides its model bundle"):
            check_writable(tmp_path / "b")
        (tmp_path / "b" / mine).unlink()


def test_a_full_disk_while_writing_weights_is_an_oserror_naming_the_folder(tmp_path, monkeypatch):
    """safetensors raises its own error type for I/O failures, which came out as a traceback."""
    from safetensors import SafetensorError

    import ustudents.engines.bundle as bundle_module
    import ustudents.train.teacher_files as teacher_files

    make_bundle(tmp_path / "b", seed=0)

    def full(*a, **k):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(bundle_module, "save_file", full)
    with pytest.raises(OSError, match="writing the model's weights failed .*No space left on device.*free space"):
        make_bundle(tmp_path / "b", seed=1)
    assert load_bundle(tmp_path / "b").manifest["id"] == "t-0" and sorted(p.name for p in tmp_path.iterdir()) == ["b"]
    monkeypatch.setattr(teacher_files, "save_file", full)
    with pytest.raises(OSError, match="writing the p=17 teacher failed"):
        teacher_files.save_teacher(tmp_path / "t", 17, PatchNet(17).state_dict(), {})
    assert [p.name for p in (tmp_path / "t").iterdir()] == []  # no .partial left


def test_damaged_bundles_are_refused_with_the_reason(tmp_path):
    path, _ = make_bundle(tmp_path / "b")
    weights = path / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="checksum"):
        load_bundle(path)
    weights.unlink()
    with pytest.raises(BundleError, match="weights file missing"):
        load_bundle(path)


def test_a_path_that_is_no_bundle_folder_is_told_for_what_it_is(tmp_path):
    """Each was "not a model bundle directory" or "manifest.json: missing", whatever the path held."""
    path, _ = make_bundle(tmp_path / "b")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "fake" / "manifest.json").mkdir(parents=True)
    (tmp_path / "tiles" / "train" / "good").mkdir(parents=True)  # a dataset's category given for the bundle
    (tmp_path / "empty").mkdir()
    lost = Path(shutil.copytree(path, tmp_path / "lost"))
    (lost / "manifest.json").unlink()
    for given, told in ((tmp_path / "nope", "nope: not found; pass a model bundle, the folder"),
                        (tmp_path / "tiles", "tiles: no manifest.json here, so not a model bundle (it looks like a "
                                             "dataset's category: train/); pass the folder `ustudents-train --out`"),
                        (tmp_path / "empty", "empty: no manifest.json here, so not a model bundle; pass the folder"),
                        (lost, "manifest.json: missing; " + str(lost) + " holds a model bundle's files but no "
                               "manifest (restore it from a copy"),
                        (tmp_path / "B", "B: not found (" + str(path) + " is there: names are case-sensitive"),
                        (tmp_path / "notes.txt", "notes.txt: a file, not a folder; pass a model bundle"),
                        (path / "manifest.json", f"manifest.json: the bundle's manifest file; pass its folder, {path}"),
                        (tmp_path / "fake", "manifest.json: a folder, not the bundle's manifest file")):
        with pytest.raises(BundleError) as info:
            load_bundle(given)
        assert told in str(info.value)


@pytest.mark.parametrize("version, shown", [(99, "99"), (True, "True"), (3.0, "3.0"), ("3", "'3'")])
def test_other_format_version_is_refused(tmp_path, version, shown):
    path, _ = make_bundle(tmp_path / "b")
    edit_manifest(path, lambda m: m.update(format_version=version))
    with pytest.raises(BundleError, match=f"format version {re.escape(shown)},"):
        load_bundle(path)


def test_manifest_claiming_other_shapes_is_refused(tmp_path):
    path, _ = make_bundle(tmp_path / "b")
    edit_manifest(path, lambda m: m.update(students=3))
    with pytest.raises(BundleError, match="do not match"):
        load_bundle(path)


@pytest.mark.parametrize("edit, needle", [
    (lambda m: m["statistics"]["17"].update(e_sigma=None), "statistics.17.e_sigma None is not a finite number above 0"),
    (lambda m: m["statistics"]["17"].update(v_sigma=0), "statistics.17.v_sigma 0 is not a finite number above 0"),
    (lambda m: m["statistics"]["17"].update(desc_mean=[0.0] * 3), "statistics.17.desc_mean is not 128 finite numbers"),
    (lambda m: m["threshold"].update(value=None), "threshold.value None is not a finite number"),
    (lambda m: m.update(image_size=7), "image_size 7 is not a whole number of pixels"),
    (lambda m: m.update(image_size=64.7), "image_size 64.7 is not a whole number of pixels"),
    (lambda m: m.update(input="rgb"), "input 'rgb' is not an object"),
    (lambda m: m.update(frame_shapes=[64, 64]), "frame_shapes [64, 64] is not an object"),
    (lambda m: m.update(frame_shapes={"aspect": [1, 1], "width": [64, 48], "height": [64, 64]}),
     "frame_shapes.width [64, 48] is not a [min, max] pair of numbers above 0"),
    (lambda m: m.update(frame_shapes={"aspect": [0, 1], "width": [48, 64], "height": [48, 64]}),
     "frame_shapes.aspect [0, 1] is not a [min, max] pair"),
    (lambda m: m.pop("category"), "missing 'category'"),
    # each of these was a traceback (KeyError, TypeError, or an allocation of image_size² floats)
    (lambda m: m["image_score"].pop("method"), "missing 'method'"),
    (lambda m: m["weights"].pop("sha256"), "missing 'sha256'"),
    (lambda m: m.update(engines=None), "'engines' is not a list"),
    (lambda m: m.update(engines=[{"precision": "fp32", "file": "x.onnx", "sha256": "0"}]),
     "an 'engines' entry lacks its backend"),
    (lambda m: m.update(category=5), "'category' is not a name"),
    (lambda m: m["threshold"].update(method=["x"]), "'threshold.method' is not a name"),
    (lambda m: m.update(scales=["17"]), "'scales' is not a list of receptive fields"),
    (lambda m: m.update(scales=[99]), "'scales' [99] is not a set of receptive fields among [17, 33, 65]"),
    (lambda m: m.update(image_size=100000), "image_size 100000 is not a whole number of pixels from 32 to 1024"),
    (lambda m: m.update(students=float("inf")), "malformed manifest (cannot convert float infinity to integer)"),
    (lambda m: m.update(image_size=float("inf")), "malformed manifest (cannot convert float infinity to integer)"),
    (lambda m: m.update(students=40), "students 40 is not a whole number from 2 to 16"),  # 40 networks built to load
    # calibrate deletes the files the old manifest named: never one outside the bundle
    (lambda m: m["weights"].update(file="../other/weights.safetensors"), "is not a file inside the bundle"),
    (lambda m: m["weights"].update(file="manifest.json"), "the weights 'manifest.json' is not a file inside the bundle"),
])
def test_a_hand_edited_manifest_value_the_model_cannot_run_with_is_refused_by_name(tmp_path, edit, needle):
    """Each of these loaded before and crashed later (a traceback in predict or the worker) or
    scored every pixel inf; the message must name the field."""
    path, _ = make_bundle(tmp_path / "b")
    edit_manifest(path, edit)
    with pytest.raises(BundleError, match=re.escape(needle)) as refused:
        load_bundle(path)
    assert "edited or damaged" in str(refused.value) or "retrain" in str(refused.value)


def test_rewrite_in_place_keeps_the_folder_its_other_files_and_a_symlink_to_it(tmp_path):
    """Recalibration rewrites weights and manifest in place: a plant's notes in the bundle folder and a
    `current -> v3` symlink survive, the old weights and engines that held old statistics go."""
    path, tensors = make_bundle(tmp_path / "v3", position=True)
    (path / "NOTES.txt").write_text("camera 2, lens 25 mm\n")
    (path / "engines").mkdir()
    (path / "engines" / "model-fp32.onnx").write_bytes(b"onnx")
    update_manifest(path, engines=[{"backend": "onnx", "precision": "fp32", "file": "engines/model-fp32.onnx",
                                    "sha256": "0"}])
    current = tmp_path / "current"
    current.symlink_to(path)
    old = load_bundle(current).manifest
    new_tensors = dict(tensors, **{POSITION_TENSORS[1]: tensors[POSITION_TENSORS[1]] + 1})
    rewrite_bundle(current, dict(old, threshold={"value": 5.0}, engines=[]), new_tensors)

    assert current.is_symlink() and (path / "NOTES.txt").read_text() == "camera 2, lens 25 mm\n"
    b = load_bundle(path)
    assert b.mask_threshold == 5.0 and b.manifest["engines"] == []
    assert torch.equal(b.tensors[POSITION_TENSORS[1]], new_tensors[POSITION_TENSORS[1]])
    files = sorted(p.name for p in path.iterdir())
    assert b.manifest["weights"]["file"] != old["weights"]["file"]  # a new file, then the manifest names it
    assert files == sorted(["NOTES.txt", "engines", "manifest.json", b.manifest["weights"]["file"]])
    assert list((path / "engines").iterdir()) == []
    # unchanged tensors keep their file
    rewrite_bundle(path, dict(b.manifest, threshold={"value": 6.0}), new_tensors)
    assert load_bundle(path).manifest["weights"] == b.manifest["weights"]
    assert sorted(p.name for p in path.iterdir()) == files


@pytest.mark.parametrize("late", [True, False])
def test_an_interrupted_rewrite_leaves_a_bundle_that_loads(tmp_path, monkeypatch, late):
    """Ctrl-C just after the new manifest's rename (late) must keep the weights it names; just before
    it, the old manifest and weights stay. Either way the bundle loads (it did not after a late one)."""
    import ustudents.engines.files as files_module

    path, tensors = make_bundle(tmp_path / "b", position=True)
    old = load_bundle(path).manifest
    new_tensors = dict(tensors, **{POSITION_TENSORS[1]: tensors[POSITION_TENSORS[1]] + 1})
    real_replace = os.replace

    def interrupted(src, dst):
        if Path(dst).name == "manifest.json":
            if late:
                real_replace(src, dst)
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(files_module.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        rewrite_bundle(path, dict(old, threshold={"value": 5.0}), new_tensors)
    monkeypatch.setattr(files_module.os, "replace", real_replace)
    b = load_bundle(path)
    assert b.mask_threshold == (5.0 if late else old["threshold"]["value"])
    assert torch.equal(b.tensors[POSITION_TENSORS[1]], (new_tensors if late else tensors)[POSITION_TENSORS[1]])


def test_a_bundle_recalibrated_while_it_loads_is_read_again_not_called_damaged(tmp_path, monkeypatch):
    """A worker starting while `ustudents calibrate` runs: it read the old manifest, calibrate then
    removed the weights that manifest named. It was told to restore the bundle or retrain."""
    import ustudents.engines.bundle as bundle_module

    path, tensors = make_bundle(tmp_path / "b", position=True)
    old = load_bundle(path).manifest
    new_tensors = dict(tensors, **{POSITION_TENSORS[1]: tensors[POSITION_TENSORS[1]] + 1})
    real, rewritten = bundle_module._uint16_bits, []

    def calibrated_meanwhile(manifest):  # between reading the manifest and the weights
        if not rewritten:
            rewritten.append(True)
            rewrite_bundle(path, dict(old, threshold={"value": 5.0}), new_tensors)
        return real(manifest)

    monkeypatch.setattr(bundle_module, "_uint16_bits", calibrated_meanwhile)
    b = load_bundle(path)
    assert rewritten and b.mask_threshold == 5.0
    assert torch.equal(b.tensors[POSITION_TENSORS[1]], new_tensors[POSITION_TENSORS[1]])


def test_what_a_killed_write_left_beside_a_bundle_is_cleared_or_put_back_by_the_next(tmp_path):
    """SIGKILL during the weights' write left `.b.xxxxxxxx.partial` (46 MB at p = 17, one per kill, never
    removed); between the swap's two renames, no bundle at `b` and the old one hidden in `.old`."""
    from ustudents.engines.bundle import _sweep_killed_write

    path, tensors = make_bundle(tmp_path / "b")
    for name in (".b.k1_3abcd.partial", ".b.zz9x0y1w.old", ".b.x.abcdefgh.partial", ".bx.abcdefgh.partial"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "weights.safetensors").write_bytes(b"x")
    manifest = load_bundle(path).manifest
    write_bundle(path, dict(manifest, id="t-new"), tensors)
    assert load_bundle(path).manifest["id"] == "t-new"
    # another bundle's leftovers (b.x, bx) are not this one's
    assert sorted(p.name for p in tmp_path.iterdir()) == [".b.x.abcdefgh.partial", ".bx.abcdefgh.partial", "b"]
    os.replace(path, tmp_path / ".b.q2w3e4r5.old")  # killed between the two renames
    _sweep_killed_write(path)
    assert load_bundle(path).manifest["id"] == "t-new"


# A process killed inside safetensors' save_file: since 0.8 it writes a temporary file beside its
# target (.tmpXXXXXX, seen on a SIGKILL mid-write), then renames it; the kill leaves that file
KILLED_IN_SAVE_FILE = """
import os, sys
from pathlib import Path
import {module} as m

def killed(tensors, target):
    (Path(target).parent / ".tmpK1LLED").write_bytes(b"half a weights file")
    os._exit(9)

m.save_file = killed
"""


def test_what_a_kill_inside_the_weights_write_left_is_gone_after_the_next_write(tmp_path):
    """Killed mid-write, calibrate left safetensors' .tmpXXXXXX in the bundle (36 MB at 64 px, one per kill,
    hidden, never removed; audit), and `ustudents teacher` one in the teachers' folder."""
    import subprocess
    import sys

    from ustudents.train.teacher_files import save_teacher

    path, tensors = make_bundle(tmp_path / "b")
    recalibrate = KILLED_IN_SAVE_FILE.format(module="ustudents.engines.bundle") + (
        "from ustudents.engines.bundle import load_bundle, rewrite_bundle\n"
        "b = load_bundle(sys.argv[1])\n"
        "rewrite_bundle(Path(sys.argv[1]), dict(b.manifest, threshold={'value': 5.0}), "
        "{k: v + 1 for k, v in b.tensors.items()})\n")
    assert subprocess.run([sys.executable, "-c", recalibrate, str(path)]).returncode == 9
    assert load_bundle(path).mask_threshold == 3.0  # the bundle as it was
    rewrite_bundle(path, dict(load_bundle(path).manifest, threshold={"value": 5.0}), tensors)
    assert load_bundle(path).mask_threshold == 5.0
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", "weights.safetensors"]

    save_teacher(tmp_path / "t", 17, PatchNet(17).state_dict(), {"steps": 1})
    distil = KILLED_IN_SAVE_FILE.format(module="ustudents.train.teacher_files") + (
        "from ustudents.engines.patchnet import PatchNet\n"
        "m.save_teacher(Path(sys.argv[1]), 17, PatchNet(17).state_dict(), {'steps': 2})\n")
    assert subprocess.run([sys.executable, "-c", distil, str(tmp_path / "t")]).returncode == 9
    save_teacher(tmp_path / "t", 17, PatchNet(17).state_dict(), {"steps": 3})
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == ["teacher_p17.safetensors", "teachers.json"]


def test_update_manifest_keeps_weights(tmp_path):
    path, _ = make_bundle(tmp_path / "b")
    update_manifest(path, evaluation={"au_pro_30": 0.5})
    bundle = load_bundle(path)
    assert bundle.manifest["evaluation"] == {"au_pro_30": 0.5}


def test_a_folder_that_is_not_a_bundle_is_never_replaced(tmp_path):
    precious = tmp_path / "data"
    precious.mkdir()
    (precious / "keep.txt").write_text("x")
    with pytest.raises(BundleError, match="not a model bundle"):
        make_bundle(precious)
    assert (precious / "keep.txt").read_text() == "x"


def test_position_image_score_round_trip_and_its_tensors_are_checked(tmp_path):
    path, tensors = make_bundle(tmp_path / "b", position=True)
    bundle = load_bundle(path)
    assert bundle.image_score == "position_z_max"
    assert (bundle.image_threshold, bundle.mask_threshold) == (4.5, 3.0)
    mean, std = bundle.position_statistics()
    assert torch.equal(mean, tensors[POSITION_TENSORS[0]]) and torch.equal(std, tensors[POSITION_TENSORS[1]])
    assert set(bundle.network_tensors()) == set(tensors) - set(POSITION_TENSORS)
    # a manifest that claims the position score over weights without its statistics is refused
    plain, _ = make_bundle(tmp_path / "plain")
    edit_manifest(plain, lambda m: m.update(image_score={"method": "position_z_max", "threshold": 4.5}))
    with pytest.raises(BundleError, match="position_z_max image score.*image_score.position_mean"):
        load_bundle(plain)
    edit_manifest(plain, lambda m: m["image_score"].update(method="median"))
    with pytest.raises(BundleError, match="image score 'median' is not one this ustudents computes"):
        load_bundle(plain)


def test_a_bundle_runs_its_networks_with_the_alignment_it_was_trained_with(tmp_path):
    """Format 4 centres what p = 65's network reads on each pixel (patchnet.ALIGNMENTS); a bundle from
    before keeps its p x p patches centred, as it was trained and calibrated (its map 2.5 px down-right
    of a defect, its statistics measured so); an alignment this version does not know is refused."""
    path, _ = make_bundle(tmp_path / "b", scales=(17, 65))
    assert load_bundle(path).alignment == "patch"  # the writer here records none: a bundle from before the record
    pads = lambda b: [(e.net.geometry.pad_before, e.net.geometry.pad_after) for e in b.model().ensembles]
    assert pads(load_bundle(path)) == [(8, 8), (32, 27)]
    before = load_bundle(path)
    # engines built before format 4 stay current: their digest is what it was (weights, statistics, size)
    baked = {"weights": before.manifest["weights"]["sha256"], "statistics": before.manifest["statistics"],
             "image_size": before.image_size}
    assert model_digest(before) == hashlib.sha256(json.dumps(baked, sort_keys=True).encode()).hexdigest()
    edit_manifest(path, lambda m: m.update(input={"alignment": "receptive_field"}))
    assert pads(load_bundle(path)) == [(8, 8), (30, 29)]
    assert model_digest(load_bundle(path)) != model_digest(before)  # an engine of the other padding is stale
    edit_manifest(path, lambda m: m.update(input={"alignment": "centre"}))
    with pytest.raises(BundleError, match="input.alignment 'centre' is not one of receptive_field, patch"):
        load_bundle(path)


def test_a_version_1_bundle_reads_as_the_maximum_against_the_mask_threshold(tmp_path):
    path, _ = make_bundle(tmp_path / "b")
    def as_version_1(m):
        del m["image_score"]  # what version 1 wrote
        m["format_version"] = 1
    edit_manifest(path, as_version_1)
    bundle = load_bundle(path)
    assert bundle.image_score == "max" and bundle.image_threshold == bundle.mask_threshold == 3.0
    assert bundle.position_statistics() is None


def test_the_mask_rule_comes_from_the_threshold_method_and_must_match_the_image_score(tmp_path):
    path, tensors = make_bundle(tmp_path / "b", position=True)
    edit_manifest(path, lambda m: m["threshold"].update(method="position_z_pixel_fpr", value=2.0))
    bundle = load_bundle(path)
    assert bundle.mask_rule == "position_z"
    # in the map's units the threshold is per position: mean + threshold x std there
    mean, std = tensors[POSITION_TENSORS[0]], tensors[POSITION_TENSORS[1]]
    assert torch.allclose(bundle.mask_threshold_on_map(), mean + 2.0 * std)
    plain, _ = make_bundle(tmp_path / "plain")  # the maximum's image score: no position statistics
    assert load_bundle(plain).mask_rule == "map" and load_bundle(plain).mask_threshold_on_map() == 3.0
    edit_manifest(plain, lambda m: m["threshold"].update(method="position_z_pixel_fpr"))
    with pytest.raises(BundleError, match="mask threshold method 'position_z_pixel_fpr'.*max image score"):
        load_bundle(plain)
    edit_manifest(plain, lambda m: m["threshold"].update(method="otsu"))
    with pytest.raises(BundleError, match="mask threshold method 'otsu'"):
        load_bundle(plain)


def test_a_folder_nfs_cannot_lock_is_used_unguarded_with_one_warning(tmp_path, monkeypatch, caplog):
    """NFS may refuse flock on a read-only descriptor (ENOLCK): the command goes on, warned once even
    where it locks the folder twice (training's early probe, then the lock itself)."""
    import errno
    import fcntl

    from ustudents.engines.bundle import locked

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    ran = []
    with caplog.at_level("WARNING"):
        for _ in range(2):
            with locked(tmp_path, "busy"):
                ran.append(True)
    assert ran == [True, True]
    warnings = [r.getMessage() for r in caplog.records if "cannot lock this folder" in r.getMessage()]
    assert warnings == [f"{tmp_path}: cannot lock this folder on this file system (No locks available); make sure "
                        "no other command writes it meanwhile"]


def test_a_new_bundle_waits_for_a_command_changing_the_old_one_then_replaces_it(tmp_path, caplog):
    """calibrate, still writing the old bundle by its path when training put the new one there, wrote
    the old networks and manifest into it: the retrained model was lost while both reported success."""
    import threading

    from ustudents.engines.bundle import changing

    make_bundle(tmp_path / "b", seed=0)
    written = threading.Event()

    def train_again():
        make_bundle(tmp_path / "b", seed=1)
        written.set()

    def waiting() -> bool:
        return any("the new bundle replaces it once that has finished" in r.getMessage() for r in caplog.records)

    with caplog.at_level("WARNING"):
        with changing(tmp_path / "b"):  # as calibrate holds it
            thread = threading.Thread(target=train_again)
            thread.start()
            end = time.monotonic() + 60
            while not waiting() and time.monotonic() < end:  # the new bundle written, the swap waiting
                time.sleep(0.05)
            assert waiting() and not written.is_set()
            assert load_bundle(tmp_path / "b").manifest["id"] == "t-0"
        thread.join(60)
    assert written.is_set() and load_bundle(tmp_path / "b").manifest["id"] == "t-1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_a_lock_taken_as_a_new_bundle_is_swapped_in_holds_the_new_folder(tmp_path, monkeypatch):
    """Opened before the swap, locked after it: the lock was on the old folder, moved aside, and a
    second command could change the new bundle at the same time."""
    import fcntl

    from ustudents.engines.bundle import locked

    path = tmp_path / "b"
    path.mkdir()
    real_flock, swapped = fcntl.flock, []

    def swap_then_flock(fd, op):
        if not swapped:  # training's swap, between this command's open and its lock
            os.replace(path, tmp_path / ".b.old")
            path.mkdir()
            swapped.append(True)
        return real_flock(fd, op)
    monkeypatch.setattr(fcntl, "flock", swap_then_flock)
    with locked(path, "busy"):
        other = os.open(path, os.O_RDONLY)
        try:
            with pytest.raises(BlockingIOError):  # the folder at the path now is the one held
                real_flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(other)
    assert swapped


def test_an_old_bundle_that_cannot_be_moved_aside_is_named_itself(tmp_path, monkeypatch):
    """A sticky shared folder refuses the move: the error named the hidden folder it was to move to."""
    import os

    make_bundle(tmp_path / "b", seed=0)
    real_replace = os.replace

    def refuse_moving_the_bundle(src, dst):
        if str(src) == str(tmp_path / "b"):
            raise PermissionError(1, "Operation not permitted", str(src), None, str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", refuse_moving_the_bundle)
    with pytest.raises(OSError) as err:
        make_bundle(tmp_path / "b", seed=1)
    assert err.value.filename == str(tmp_path / "b") and err.value.filename2 is None
    monkeypatch.undo()
    assert load_bundle(tmp_path / "b").manifest["id"] == "t-0" and sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_frame_shapes_know_the_images_read_with_a_quarter_to_spare_and_refuse_others_saying_what_to_do():
    """A frame squashed into the square far more than any good image was (a line-scan strip, a changed
    region of interest) is not judged: its refusal names its shape, the known ones and the fix."""
    known = FrameShapes.of([(400, 600), (500, 500), (300, 600)])  # (height, width)
    assert known == FrameShapes((1.0, 2.0), (500, 600), (300, 500))
    assert FrameShapes.from_json(json.loads(json.dumps(known.to_json()))) == known  # as the manifest keeps it
    for height, width in [(300, 600), (500, 500), (400, 740), (250, 480), (620, 620)]:  # in, or within 25%
        assert known.knows(height, width), (height, width)
    for height, width in [(150, 1200), (250, 740), (500, 390), (700, 700), (300, 300)]:
        assert not known.knows(height, width), (height, width)
    strip = np.zeros((300, 4000, 3), np.uint8)
    with pytest.raises(UnexpectedShape) as refused:
        known.check(strip, "cam1/frame7.png", "recalibrate it")
    message = str(refused.value)
    assert message.startswith("cam1/frame7.png: 4000 x 300 pixels (width/height 13.33)")
    assert ("width/height 1.00 to 2.00, 500 to 600 px wide, 300 to 500 px high, each range widened by a factor of "
            "1.25 either way") in message
    assert message.endswith("if the line now makes such frames, recalibrate it, which adds their shapes")
    assert isinstance(refused.value, ImageError)  # said as a bad image is, never a traceback
    assert known.union(FrameShapes.of([(100, 50)])) == FrameShapes((0.5, 2.0), (50, 600), (100, 500))
    assert known.union(None) is known
    # a strip of 16 x 400000 keeps its width/height (rounded to 4 places it was 0.0, and the bundle
    # training had just written was refused as damaged); a near-square range reads as one value
    strip = FrameShapes.of([(400000, 16)])
    assert FrameShapes.from_json(json.loads(json.dumps(strip.to_json()))) == strip and strip.aspect[0] > 0
    assert FrameShapes.of([(1000, 997), (997, 1000)]).describe().startswith("width/height 1.00, ")


def test_memory_refused_while_weights_load_is_said_as_such_not_as_a_damaged_file(tmp_path, monkeypatch):
    """An allocation the machine refused while reading weights read as "unreadable safetensors file ...;
    restore the bundle or retrain" (a sound bundle), and a training checkpoint's as damaged, the scale
    then trained again from the start, its saved epochs thrown away."""
    import cv2
    import numpy as np
    from click.testing import CliRunner

    from ustudents.cli import main
    from ustudents.engines import bundle
    from ustudents.train import checkpoints, teacher_files

    def refused(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you "
                           "tried to allocate 240000000000 bytes. Error code 12 (Cannot allocate memory)")

    path, _ = make_bundle(tmp_path / "b")
    cv2.imwrite(str(tmp_path / "a.png"), np.full((64, 64, 3), 128, np.uint8))
    monkeypatch.setattr(bundle, "load_file", refused)
    result = CliRunner().invoke(main, ["predict", str(path), str(tmp_path / "a.png"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and result.output.splitlines()[-1] == (
        "Error: out of memory: an allocation of 223.5 GiB failed; lower the options that size the work (--batch, "
        "image or input sizes), or free memory"), result.output

    teacher_files.save_teacher(tmp_path / "t", 17, PatchNet(17).state_dict(), {})
    monkeypatch.setattr(teacher_files, "load_file", refused)
    with pytest.raises(RuntimeError, match="can't allocate memory"):
        teacher_files.load_teacher(tmp_path / "t", 17)

    saved = checkpoints.ScaleCheckpoint(tmp_path / "c" / "p17.safetensors", key="k")
    saved.save(PatchNet(17, 2), None, np.random.default_rng(0), [1.0], [2.0], record={})
    monkeypatch.setattr(checkpoints, "load_file", refused)
    logged: list[str] = []
    with pytest.raises(RuntimeError, match="can't allocate memory"):
        saved.load(logged.append)
    assert not logged and saved.path.is_file()
