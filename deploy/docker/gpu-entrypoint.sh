#!/bin/sh
# GPU image entrypoint: TensorRT plans for this GPU first (built once into the engine cache when a
# bundle has none), then the worker, with USTUDENTS_MODEL pointing at bundles that have them.
set -eu
if [ -z "${USTUDENTS_MODEL:-}" ]; then
    echo "USTUDENTS_MODEL is not set: give the bundle directory (or several, comma-separated), e.g. /models/magnetic_tile" >&2
    exit 2
fi
case "${USTUDENTS_BACKEND:-tensorrt}" in
    torch|onnxruntime) ;;  # no TensorRT plan is used: the bundles are served as they are
    *)
        USTUDENTS_MODEL="$(python3 /opt/ustudents/prepare_engines.py)"
        # the worker runs the precision the plans were prepared in (unset, it would take the most
        # faithful plan a bundle holds, e.g. a shipped fp32 one where fp16 was asked for)
        USTUDENTS_PRECISION="${USTUDENTS_PRECISION:-${USTUDENTS_ENGINE_PRECISION:-fp32}}"
        export USTUDENTS_MODEL USTUDENTS_PRECISION
        ;;
esac
exec ustudents-worker "$@"
