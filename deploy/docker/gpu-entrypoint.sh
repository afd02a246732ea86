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
        # In the background, with TERM and INT passed on: this shell is PID 1, which the kernel
        # spares signals it has no handler for, so a stop during a build (minutes) waited out the
        # grace period and ended in SIGKILL. The bundle paths come back through a file.
        served="$(mktemp)"
        python3 /opt/ustudents/prepare_engines.py >"$served" &
        child=$!
        trap 'kill -TERM "$child" 2>/dev/null || true' TERM INT
        status=0
        wait "$child" || status=$?
        while kill -0 "$child" 2>/dev/null; do  # a signal cut the wait short: wait for the build to stop
            status=0
            wait "$child" || status=$?
        done
        trap - TERM INT
        if [ "$status" -ne 0 ]; then
            rm -f "$served"
            exit "$status"
        fi
        USTUDENTS_MODEL="$(cat "$served")"
        rm -f "$served"
        # the worker runs the precision the plans were prepared in (unset, it would take the most
        # faithful plan a bundle holds, e.g. a shipped fp32 one where fp16 was asked for)
        USTUDENTS_PRECISION="${USTUDENTS_PRECISION:-${USTUDENTS_ENGINE_PRECISION:-fp32}}"
        export USTUDENTS_MODEL USTUDENTS_PRECISION
        ;;
esac
exec ustudents-worker "$@"
