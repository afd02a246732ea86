"""Teacher weights on disk: one safetensors file per scale plus `teachers.json` with the record of
how each was made. The package ships a default set in `default_teachers/` (see its MODEL_CARD.md),
so `ustudents-train` works without pretraining anything."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import ustudents
from ustudents.engines.bundle import is_bundle, sha256_file
from ustudents.engines.files import real_path, write_atomically
from ustudents.engines.images import missing_folder_hint
from ustudents.engines.memory import out_of_memory_line
from ustudents.engines.patchnet import PatchNet

DEFAULT_DIR = Path(__file__).parent / "default_teachers"
RECORDS = "teachers.json"


class TeacherFileError(ValueError):
    pass


def teacher_path(folder: Path, p: int) -> Path:
    return Path(folder) / f"teacher_p{p}.safetensors"


def save_teacher(folder: Path, p: int, state: dict[str, torch.Tensor], record: dict) -> Path:
    """Write one teacher and merge its record into teachers.json (each file replaced atomically). The
    record names the weights' sha256, so that weights and record parted by a stop between the two
    replacements are found (load_teacher), not trained with under the other run's record."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    records = read_records(folder)  # first: a damaged record file stops this before a teacher is replaced
    before = json.dumps(records, indent=2) + "\n"
    path = teacher_path(folder, p)
    tmp = path.with_suffix(".partial")
    # safetensors writes through a temporary file beside its target (.tmpXXXXXX), which a kill left in
    # the teachers' folder for good: it writes in a folder of its own, emptied at the next save
    stage = folder / f".{path.stem}.stage"
    shutil.rmtree(stage, ignore_errors=True)
    try:
        stage.mkdir()
        save_file({k: v.contiguous() for k, v in state.items()}, str(stage / path.name))
        os.replace(stage / path.name, tmp)
        tmp.chmod(0o644)  # safetensors writes 0600; teachers are read by other users too
        with open(tmp, "rb") as f:  # on disk before it replaces a good teacher: a power cut must not leave a torn one
            os.fsync(f.fileno())
        records[str(p)] = dict(record, sha256=sha256_file(tmp))
        write_atomically(folder / RECORDS, json.dumps(records, indent=2) + "\n")
        os.replace(tmp, path)
    except SafetensorError as err:  # its I/O errors (a full disk) are not OSError
        tmp.unlink(missing_ok=True)
        raise OSError(f"{folder}: writing the p={p} teacher failed ({err}); free space there") from None
    except BaseException:  # Ctrl-C: no half-written file left beside the teachers, the old record back
        if tmp.exists():  # not yet in place: the teacher there is the one the old record describes
            tmp.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                write_atomically(folder / RECORDS, before)
        raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return path


def sweep_stages(folder: Path) -> None:
    """Remove the staging folders of saves that were killed (each save_teacher empties its own scale's
    only, so a killed scale's stayed until that scale was saved again). Only with the folder locked
    (`ustudents teacher` holds it): another run's save may be writing in its stage."""
    for stage in Path(folder).glob(".teacher_p*.stage"):
        shutil.rmtree(stage, ignore_errors=True)


def _finish_save(path: Path, recorded: str) -> bool:
    """A save_teacher stopped (killed, a power cut) between replacing the record and the weights left
    the new teacher complete beside the old one, as the record describes: put it in place. False
    where there is none, or it cannot be moved (a read-only folder)."""
    partial = path.with_suffix(".partial")
    try:
        if not (partial.is_file() and sha256_file(partial) == recorded):
            return False
        os.replace(partial, path)
    except OSError:
        return False
    return True


def read_records(folder: Path) -> dict:
    path = Path(folder) / RECORDS
    if not path.is_file():
        return {}
    try:
        records = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise TeacherFileError(f"{path}: damaged ({err}); restore it from a copy, or delete it (the teachers' "
                               "records, not their weights, are lost then)") from None
    if not isinstance(records, dict) or not all(isinstance(r, dict) for r in records.values()):
        raise TeacherFileError(f"{path}: not a teachers record (a JSON object by scale, each an object); restore it "
                               "or delete it")
    return records


def recreate(folder: Path, p: int, diverged: bool = False) -> str:
    """How to replace the damaged teacher for p in `folder`: distilling it again there needs --replace (else
    refused, as the teacher is there), and the shipped ones are ustudents' own files."""
    if real_path(folder) == real_path(DEFAULT_DIR):
        return (f"reinstall ustudents (pip install --force-reinstall --no-deps ustudents=={ustudents.__version__}), "
                "whose files they are")
    lower = " (at a lower --lr if it diverged)" if diverged else ""
    return f"re-create it with `ustudents teacher --scales {p} --out {folder} --replace`{lower}"


def load_teacher(folder: Path, p: int) -> dict[str, torch.Tensor]:
    """The PatchNet(p) state dict of a teacher, checked against the architecture."""
    if Path(folder).is_file():
        raise TeacherFileError(f"--teachers {folder}: a file; give the folder that holds teacher_p<P>.safetensors")
    if not Path(folder).is_dir():  # a mistyped path: not a reason to distil for hours
        raise TeacherFileError(f"--teachers {folder}: folder not found{missing_folder_hint(Path(folder))}; give the "
                               "folder that holds teacher_p<P>.safetensors")
    path = teacher_path(folder, p)
    if not path.is_file() and is_bundle(folder):  # the advice below would be refused: --out inside a bundle
        raise TeacherFileError(f"--teachers {folder}: a model bundle, not a folder of teachers; give the folder that "
                               "holds teacher_p<P>.safetensors, or leave --teachers out for the shipped ones")
    if not path.is_file():
        raise TeacherFileError(f"{path}: no teacher for p={p}; make one with "
                               f"`ustudents teacher --scales {p} --out {folder}` or pass --teachers DIR")
    try:
        state = load_file(str(path))
    except Exception as err:
        if out_of_memory_line(err):  # the machine, not the file
            raise
        raise TeacherFileError(f"{path}: unreadable teacher weights ({err}); {recreate(folder, p)}") from None
    want = {k: v.shape for k, v in PatchNet(p).state_dict().items()}
    if {k: v.shape for k, v in state.items()} != want:
        raise TeacherFileError(f"{path}: not a p={p} teacher (tensor names or shapes differ); {recreate(folder, p)}")
    recorded = read_records(folder).get(str(p), {}).get("sha256")  # records before the field have none
    if recorded is not None and recorded != sha256_file(path):
        if _finish_save(path, recorded):
            return load_teacher(folder, p)
        raise TeacherFileError(f"{path}: not the teacher its record in {Path(folder) / RECORDS} describes (a run "
                               f"stopped between writing the two?); {recreate(folder, p)}")
    if not all(torch.isfinite(v).all() for v in state.values()):  # a diverged distillation: every descriptor NaN
        raise TeacherFileError(f"{path}: the teacher's weights hold NaN or infinite values; "
                               f"{recreate(folder, p, diverged=True)}")
    return state


def load_teachers(folder: Path, scales: list[int]) -> tuple[dict[int, dict[str, torch.Tensor]], dict]:
    """The teachers of `scales` and the folder's records, each checked (load_teacher, read_records)."""
    return {p: load_teacher(folder, p) for p in scales}, read_records(folder)
