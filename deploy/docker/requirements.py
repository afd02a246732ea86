"""Print the requirements of ustudents with the given extras, one per line, from pyproject.toml.

The images install these in a layer of their own before the ustudents wheel, so that a code change
rebuilds only the wheel's layer instead of downloading every dependency (and, in the GPU image,
compiling pycuda) again.
    python3 deploy/docker/requirements.py pyproject.toml onnx > requirements.txt
"""
import sys

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10, on the older TensorRT bases README names for older hosts
    import tomli as tomllib


def requirements(pyproject: str, extras: list[str]) -> list[str]:
    with open(pyproject, "rb") as f:
        project = tomllib.load(f)["project"]
    optional = project["optional-dependencies"]
    unknown = [e for e in extras if e not in optional]
    if unknown:
        raise SystemExit(f"{pyproject}: no extra {unknown[0]!r}; it has {', '.join(optional)}")
    return list(dict.fromkeys(project["dependencies"] + [r for e in extras for r in optional[e]]))


if __name__ == "__main__":
    print("\n".join(requirements(sys.argv[1], sys.argv[2:])))
