"""A/B of the students' training-window sampler on magnetic_tile: `new` (this code: every pixel,
border included, trained on equally often) against `old` (window starts uniform in
[0, size - crop], as before commit c4bafd4: the outermost pixels trained `crop` times less often).

    for v in new old; do
      python benchmarks/window_sampler_ab.py $v train magnetic_tile --data-root ../shared/datasets \
        --out /tmp/ab/$v --scales 17 --students 3 --epochs 5 --image-size 64 --crop 8 --batch 8 \
        --amp off --seed 0 --no-evaluate --device cpu
      python benchmarks/border_error.py /tmp/ab/$v --data-root ../shared/datasets --scale 17 \
        --images 40 --border 4 --name ab_border_$v
    done

The first argument picks the sampler; the rest is an `ustudents` command line. `unweighted` keeps
the sampler and drops the windows' loss weights (each window's loss its mean alone, as before the
window share: a border pixel weighed 3.4 times a central one at 64 px with a crop of 16), for the A/B
in benchmarks/README.md (evaluation_ab.py).
"""
import sys

from ustudents.train import students


def uniform_starts(gen, size, crop):
    """The old sampler, kept here only for this comparison."""
    if crop >= size:
        return 0, slice(0, size)
    return int(gen.integers(0, size - crop + 1)), slice(0, crop)


if __name__ == "__main__":
    if sys.argv[1:2] in (["-h"], ["--help"]):
        print(__doc__)
        sys.exit(0)
    if sys.argv[1:2] not in (["new"], ["old"], ["unweighted"]):
        sys.exit("usage: window_sampler_ab.py new|old|unweighted USTUDENTS-ARGS... (--help: what it compares)")
    if sys.argv[1] == "old":
        students.crop_window = uniform_starts
    if sys.argv[1] == "unweighted":
        students.window_share = lambda rows, cols, crop: 1.0
    from ustudents.cli import main

    main(sys.argv[2:])
