"""`ustudents`: one Click group holding every command of every room."""
from __future__ import annotations

import click

from ustudents import __version__
from ustudents.engines.cli import CONTEXT_SETTINGS


@click.group(context_settings=CONTEXT_SETTINGS)
@click.version_option(__version__, prog_name="ustudents")
def main() -> None:
    """Student-teacher anomaly detection (Uninformed Students, CVPR 2020) for visual inspection."""


# Each room's cli module exports COMMANDS; the group gathers them.
ROOMS = ("ustudents.train.cli", "ustudents.engines.cli", "ustudents.worker.cli", "ustudents.demo")


def _register() -> None:
    import importlib

    for room in ROOMS:
        for command in importlib.import_module(room).COMMANDS:
            main.add_command(command)


_register()
