"""Memory of the CPU fp32 `torch` path (FFT convolutions): peak and held resident memory around the
first call (the plan) and after it, the kernel spectra, and the FFT workspace by role.

    python benchmarks/fft_memory.py --name fft_memory_cpu

The 3-scale model (M=3, random weights: memory does not depend on them) at --image-size, batch 1,
run as the `torch` engine runs it on CPU in fp32 (`torch_runner`): the first call measures each FFT
candidate layer both ways and keeps the plan, then --frames more calls. Resident memory is Linux's
(/proc/self/statm; the peak from getrusage). Writes benchmarks/results/<name>.json and a .md table.
"""
from __future__ import annotations

import resource
import sys
from pathlib import Path

import click

from ustudents.engines import fftconv  # noqa: E402  (first: ustudents sets THP_MEM_ALLOC_ENABLE)
from ustudents.engines.model import AnomalyModel  # noqa: E402
from ustudents.engines.runtime import torch_runner  # noqa: E402
import torch  # noqa: E402

from common import device_label, machine, name_option, one_line_errors, write_result  # noqa: E402

GB = 1e9


def held_gb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / GB


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB  # Linux: KiB


@click.command()
@click.option("--image-size", "size", default=256, show_default=True)
@click.option("--frames", default=2, show_default=True, help="Calls after the first (the plan).")
@name_option
@one_line_errors
def main(size, frames, name):
    torch.set_grad_enabled(False)
    torch.manual_seed(0)
    model = AnomalyModel([17, 33, 65], students=3).eval()
    run = torch_runner(model, torch.device("cpu"), "fp32")
    images = torch.rand(1, 3, size, size)
    stages = {"model built": (held_gb(), peak_gb())}
    run(images)
    stages["after the first call (the plan)"] = (held_gb(), peak_gb())
    for _ in range(frames):
        run(images)
    stages[f"after {frames} more calls"] = (held_gb(), peak_gb())
    spectra = {f"p={ens.net.p} conv {i}": sum(s.numel() * s.element_size() for s in conv.spectra.values()) / GB
               for ens in model.ensembles for i, conv in enumerate(ens.net.spectral or []) if conv is not None}
    workspace = {role: b.numel() * b.element_size() / GB for role, b in fftconv.WORKSPACE.buffers.items()}
    lines = [f"{'stage':<36}{'held GB':>9}{'peak GB':>9}"]
    lines += [f"{stage:<36}{held:>9.2f}{peak:>9.2f}" for stage, (held, peak) in stages.items()]
    lines.append(f"kernel spectra {sum(spectra.values()):.2f} GB over {len(spectra)} layers kept on the FFT: "
                 + ", ".join(f"{k} {v:.2f}" for k, v in spectra.items()))
    lines.append(f"FFT workspace {sum(workspace.values()):.2f} GB: "
                 + ", ".join(f"{k} {v:.2f}" for k, v in workspace.items()))
    table = "\n".join(lines)
    print(table)
    info = machine(torch.device("cpu"))
    record = {"machine": info, "image_size": size, "students": 3, "batch": 1, "frames_after_plan": frames,
              "stages_gb": {k: {"held": h, "peak": p} for k, (h, p) in stages.items()},
              "spectra_gb": spectra, "workspace_gb": workspace,
              "weights": "random (memory does not depend on them)",
              "command": f"python benchmarks/{Path(sys.argv[0]).name} " + " ".join(sys.argv[1:])}
    path = write_result(name, record, f"# Memory of the CPU fp32 FFT path\n\nMachine: {device_label(info)}; "
                        f"torch {info['torch']}. 3 scales, M=3, {size} px, batch 1.\n\n```\n{table}\n```\n\n"
                        f"Reproduce: `{record['command']}`\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
