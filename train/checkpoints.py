"""Resuming an interrupted `ustudents-train` (Ctrl-C, a crash, a reboot: on a CPU the students of
three scales train for hours).

Each scale's training is saved beside the bundle it will become, in `.<out name>.checkpoint/
p<P>.safetensors`: the students, Adam's state and the random generators' states after an epoch (at
most every CHECKPOINT_EVERY_S, and when the scale is done; a scale cut short by --max-minutes keeps
Adam's state, so the next run trains it on as its time allows). The same command run again continues
from there, and ends with the weights an uninterrupted run would have had (tested). A checkpoint
counts only for a run with the same inputs (`scale_key`: the scale's teacher, the training images
and their split, the image size, the student settings except --max-minutes); another run starts that
scale over and overwrites it, saying what differs (the inputs are kept in the file). The sha256 of
the tensors, kept too, finds damage inside the data. The folder goes once the bundle is written.
Safetensors, no pickle.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

import ustudents
from ustudents.engines.bundle import locked
from ustudents.engines.files import real_path, write_atomically
from ustudents.engines.memory import out_of_memory_line
from ustudents.engines.patchnet import ALIGNMENT

CHECKPOINT_EVERY_S = 120.0  # at most one save per this many seconds (p=17, M=3: 108 MB, 0.5 s to write here)


def folder_for(out: Path) -> Path:
    """Beside the bundle's real path, where its .partial folders are made too: a run to a symbolic link
    and one to the folder it points at share the folder, and so its lock (beside the name given, both
    trained at once, the second overwriting the first)."""
    real = real_path(out)
    return real.parent / f".{real.name}.checkpoint"


def scale_key(p: int, teacher_state: dict[str, torch.Tensor], student_settings: dict, image_size: int,
              fit_names: list[str], data_fingerprint: str, bits: int, device: torch.device) -> tuple[str, dict]:
    """What a scale's training depends on, as a key (a checkpoint with another key is not this run's)
    and as the inputs themselves, which a checkpoint keeps to say what differs. The device type and
    the ustudents version are in it too: a run continued elsewhere or by other code would be recorded
    as one it is not."""
    settings = {k: v for k, v in student_settings.items() if k != "max_minutes"}
    inputs = {"p": p, "student": settings, "image_size": image_size, "fit": sorted(fit_names),
              "data": data_fingerprint, "bits": bits, "device": device.type, "ustudents": ustudents.__version__,
              "alignment": ALIGNMENT}
    h = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode())
    teacher = hashlib.sha256()
    for name in sorted(teacher_state):
        for digest in (h, teacher):
            digest.update(name.encode())
            digest.update(teacher_state[name].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest(), {**inputs, "teacher": teacher.hexdigest()}


# What differs between a checkpoint's inputs and a run's, in the user's words (student settings by option)
_INPUT_NAMES = {"image_size": "--image-size", "fit": "the training images or their split (--val-fraction)",
                "data": "the contents of the training images", "bits": "the images' bit depth",
                "device": "the device type", "ustudents": "the ustudents version", "teacher": "the teacher",
                "alignment": "where the dense networks put a descriptor (README: Networks)"}


def _shown(value) -> str:
    """A setting as its option takes it: --amp on/off, not True/False (the value `auto` resolved to)."""
    return ("on" if value else "off") if isinstance(value, bool) else str(value)


def differences(saved: dict | None, now: dict) -> str:
    """'--epochs 4, now 6; the teacher': how the inputs a checkpoint was saved with differ from this
    run's (empty for a checkpoint saved before they were kept, or where nothing named differs)."""
    if not isinstance(saved, dict):
        return ""
    said = []
    for field, value in now.items():
        old = saved.get(field)
        if field == "student" and isinstance(old, dict):  # one the old release had not: its version line says it
            said += [f"--{k.replace('_', '-')} {_shown(old[k])}, now {_shown(v)}" for k, v in value.items()
                     if k in old and old[k] != v]
        elif old != value and field in _INPUT_NAMES:
            shown = field in ("image_size", "device", "ustudents")
            said.append(f"{_INPUT_NAMES[field]} {old}, now {value}" if shown else _INPUT_NAMES[field])
    return "; ".join(said)


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of the tensors' names and bytes: damage inside a checkpoint's data (a disk's bad sector)
    parses, and resumed a scale from weights that diverged at once, or was used as a finished scale."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass
class Saved:
    """A scale's training as a checkpoint held it."""
    students: dict[str, torch.Tensor]
    optimizer: dict | None  # None once the scale is done
    torch_rng: torch.Tensor
    numpy_rng: dict
    history: list[float]  # mean loss per student, per epoch trained
    epoch_seconds: list[float]
    done: bool
    record: dict | None  # the scale's training record, once done
    desc_mean: torch.Tensor | None = None
    desc_std: torch.Tensor | None = None


@dataclass
class ScaleCheckpoint:
    path: Path
    key: str
    inputs: dict | None = None  # scale_key's inputs: kept in the file, to say what differs from a later run's

    def load(self, log) -> Saved | None:
        """This run's saved training of the scale, or None (none, another run's, or unreadable)."""
        if not self.path.is_file():
            return None
        try:
            meta = read_meta(self.path)
            if meta["key"] != self.key:
                differ = differences(meta.get("inputs"), self.inputs or {})
                log(f"{self.path}: a checkpoint of other settings or data{f' ({differ})' if differ else ''}; "
                    "training this scale from the start")
                return None
            tensors = load_file(str(self.path))
            if "sha256" in meta and tensors_digest(tensors) != meta["sha256"]:  # checkpoints before it have none
                raise ValueError("its data does not match the checksum saved with it: damaged on disk")
            opt = None
            if not meta["done"]:
                state: dict[int, dict[str, torch.Tensor]] = {}
                for name, value in tensors.items():
                    if name.startswith("optimizer."):
                        _, index, field = name.split(".", 2)
                        state.setdefault(int(index), {})[field] = value
                opt = {"state": state, "param_groups": meta["param_groups"]}
            return Saved(students={k[len("students."):]: v for k, v in tensors.items() if k.startswith("students.")},
                         optimizer=opt, torch_rng=tensors["torch_rng"], numpy_rng=meta["numpy_rng"],
                         history=list(meta["history"]), epoch_seconds=list(meta["epoch_seconds"]), done=meta["done"],
                         record=meta["record"], desc_mean=tensors.get("desc_mean"), desc_std=tensors.get("desc_std"))
        except Exception as err:  # noqa: BLE001 (damaged, truncated, foreign: safetensors raises its own types)
            if out_of_memory_line(err):  # the machine, not the file: the saved training is kept
                raise
            log(f"{self.path}: unreadable checkpoint ({type(err).__name__}: {err}); training this scale from the start")
            return None

    def save(self, students: torch.nn.Module, opt: torch.optim.Optimizer | None, gen: np.random.Generator,
             history: list[float], epoch_seconds: list[float], record: dict | None = None,
             desc: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """After an epoch, with Adam's state (`opt`) to continue from; or, with the record and the
        descriptor statistics and no `opt`, once the scale is done."""
        tensors = {f"students.{k}": v.detach().cpu().contiguous() for k, v in students.state_dict().items()}
        tensors["torch_rng"] = torch.get_rng_state()
        meta = {"key": self.key, "inputs": self.inputs, "history": history, "epoch_seconds": epoch_seconds,
                "done": opt is None, "record": record, "numpy_rng": gen.bit_generator.state}
        if opt is not None:
            sd = opt.state_dict()
            meta["param_groups"] = sd["param_groups"]
            tensors.update({f"optimizer.{i}.{k}": v.detach().cpu().contiguous()
                            for i, st in sd["state"].items() for k, v in st.items()})
        if desc is not None:
            tensors["desc_mean"], tensors["desc_std"] = (t.detach().cpu().contiguous() for t in desc)
        meta["sha256"] = tensors_digest(tensors)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(self.path, save(tensors, metadata={"ustudents_checkpoint": json.dumps(meta)}))


def read_meta(path: Path) -> dict:
    """A checkpoint's metadata (raises on a damaged or foreign file)."""
    with safe_open(str(path), "pt") as f:
        meta = json.loads((f.metadata() or {})["ustudents_checkpoint"])
    if not isinstance(meta, dict) or not {"key", "done", "history", "epoch_seconds", "numpy_rng"} <= meta.keys():
        raise ValueError("not a ustudents checkpoint")
    return meta


def restore(saved: Saved, students: torch.nn.Module, opt: torch.optim.Optimizer, gen: np.random.Generator) -> None:
    """Put a run back where the checkpoint left it (the students, Adam, the generators)."""
    students.load_state_dict(saved.students)
    opt.load_state_dict(saved.optimizer)
    torch.set_rng_state(saved.torch_rng)
    gen.bit_generator.state = saved.numpy_rng


@contextlib.contextmanager
def opened(folder: Path, resume: bool, out: Path):
    """Make the checkpoint folder (emptied first unless `resume`), hold it for this run (a second
    `ustudents-train` to the same --out is refused: it would empty or overwrite this one's checkpoints
    and cached targets, and the last bundle written would win), and clear it of the cached teacher
    targets a killed run left (GBs at 256 px; a SIGKILL or an OOM kill skips their clean-up). The
    targets are cached here, so they go with the folder when the bundle is written, and a crash
    loop cannot fill the disk with them."""
    folder.mkdir(parents=True, exist_ok=True)
    with locked(folder, _busy(folder, out)):
        stale = list(folder.iterdir()) if not resume else list(folder.glob("targets-p*"))
        for path in stale:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        yield


def _busy(folder: Path, out: Path) -> str:
    return (f"{out}: another training run (ustudents-train or ustudents demo) is writing this model now (it holds "
            f"{folder}); wait for it to finish, or choose another --out")


def check_free(folder: Path, out: Path) -> None:
    """Refuse now, before minutes of reading the test set, a run whose checkpoint folder another run
    holds (`opened` still decides: one could start in between)."""
    try:
        with locked(folder, _busy(folder, out)):
            pass
    except FileNotFoundError:  # none yet, or the other run just finished and removed it
        pass


def drop_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass  # holds checkpoints (kept to continue from), or is not there


def remove(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)


def size_on_disk(folder: Path) -> str:
    """'108 MB': what the folder takes, so a user who will not resume knows what deleting it frees."""
    total = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    return f"{total / 1e6:.0f} MB" if total >= 1e6 else f"{total / 1e3:.0f} kB"


def _held(folder: Path) -> list[tuple[int, dict]]:
    """(p, metadata) of each readable checkpoint in the folder, by p."""
    held = []
    for path in folder.glob("p*.safetensors"):
        if (name := re.fullmatch(r"p([1-9][0-9]*)\.safetensors", path.name)) is None:
            continue  # not a scale's: the files are named p<P>.safetensors
        try:
            held.append((int(name.group(1)), read_meta(path)))
        except Exception:  # noqa: BLE001 (damaged: nothing to continue from)
            continue
    return sorted(held, key=lambda item: item[0])


def describe(folder: Path, keys: dict[int, str], others: bool = False) -> str:
    """'p=17 done, p=33 after epoch 4': what the folder holds for the scales of `keys` (this run's), or
    with `others`, what it holds besides (every checkpoint, before this run's keys are known)."""
    return ", ".join(f"p={p} " + ("done" if meta["done"] else f"after epoch {len(meta['history'])}")
                     for p, meta in _held(folder) if others == (keys.get(p) != meta["key"]))
