"""Two `ustudents evaluate --json` results of one A/B (models trained alike but for one change, scored
on one test set) side by side: a table and benchmarks/results/<name>.json with both, their
differences, the machine and the commands that made them.

    python benchmarks/evaluation_ab.py A.json B.json --labels "per-window mean,window share" \
        --commands "A's train and evaluate commands" "B's ..." --name NAME
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click
import torch

from common import device_label, machine, name_option, one_line_errors, write_result

KEYS = ("au_pro_30", "image_auroc", "pixel_auroc", "image_auroc_of_max")


def read_evaluation(path: Path) -> dict:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise click.BadParameter(f"{path}: not an evaluate result ({err})") from None
    if not isinstance(record, dict) or "au_pro_30" not in record or "test_images" not in record:
        raise click.BadParameter(f"{path}: not an `ustudents evaluate --json` result")
    return record


@click.command()
@click.argument("a", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("b", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--labels", required=True, help="What A and B are, comma-separated.")
@click.option("--commands", nargs=2, required=True, help="The commands that made A and B (train, evaluate).")
@name_option
@one_line_errors
def main(a: Path, b: Path, labels: str, commands: tuple[str, str], name: str) -> None:
    runs = [read_evaluation(a), read_evaluation(b)]
    names = [x.strip() for x in labels.split(",")]
    if len(names) != 2:
        raise click.BadParameter(f"{labels!r}: give two labels, comma-separated", param_hint="--labels")
    if runs[0]["test_images"] != runs[1]["test_images"] or runs[0]["category"] != runs[1]["category"]:
        raise click.BadParameter("A and B were scored on different test sets; an A/B needs the same one")
    diff = {k: round(runs[1][k] - runs[0][k], 4) for k in KEYS if k in runs[0] and k in runs[1]}
    rows = [f"| {k} | {runs[0][k]:.3f} | {runs[1][k]:.3f} | {diff[k]:+.3f} |" for k in diff]
    table = "\n".join([f"| metric | {names[0]} | {names[1]} | B - A |", "|---|---|---|---|", *rows])
    print(table)
    info = machine(torch.device("cpu"))
    summary = {"dataset": runs[0]["category"], "test_images": runs[0]["test_images"], "a": names[0], "b": names[1],
               **{f"{k}_a": round(runs[0][k], 4) for k in diff}, **{f"{k}_b": round(runs[1][k], 4) for k in diff},
               **{f"{k}_difference": v for k, v in diff.items()}, "device": device_label(info)}
    record = {"summary": summary, "machine": info, "a": runs[0], "b": runs[1],
              "commands": {"a": commands[0], "b": commands[1]},
              "command": "python benchmarks/evaluation_ab.py " + " ".join(sys.argv[1:])}
    path = write_result(name, record, f"# A/B: {names[0]} (A) against {names[1]} (B)\n\n{runs[0]['category']}, "
                                      f"{runs[0]['test_images']} test images; machine {device_label(info)}.\n\n"
                                      f"{table}\n\nA: `{commands[0]}`\n\nB: `{commands[1]}`\n\n"
                                      f"Reproduce: `{record['command']}`\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
