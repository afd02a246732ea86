"""The dense networks and scoring head export to ONNX with TensorRT-friendly operators only, and
ONNX Runtime computes the same anomaly maps as PyTorch."""
import numpy as np
import pytest
import torch

from ustudents.engines.export import INPUT, export_onnx
from ustudents.engines.model import AnomalyModel

onnx = pytest.importorskip("onnx", reason="onnx not installed (pip install 'ustudents[onnx]')")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime not installed (pip install 'ustudents[onnx]')")

# Operators TensorRT's ONNX parser supports natively; the FDFE form must not need anything else.
TENSORRT_FRIENDLY = {"Add", "Cast", "Concat", "Constant", "ConstantOfShape", "Conv", "Div", "Gather", "Identity",
                     "LeakyRelu", "Max", "Mul", "Pad", "ReduceMean", "ReduceSum", "Reshape", "Shape", "Slice",
                     "Split", "Squeeze", "Sub", "Transpose", "Unsqueeze", "Pow", "Sqrt"}


def test_onnx_matches_pytorch_with_dynamic_batch(tmp_path):
    torch.manual_seed(0)
    model = AnomalyModel([17, 65], students=2).eval()
    for ens in model.ensembles:  # non-trivial statistics so the scoring head is exercised
        ens.desc_mean.uniform_(-0.1, 0.1)
        ens.desc_std.uniform_(0.5, 2.0)
        ens.score_stats.copy_(torch.tensor([3.0, 2.0, 0.5, 0.25]))
    path = export_onnx(model, 64, tmp_path / "model.onnx")
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert ops <= TENSORRT_FRIENDLY, ops - TENSORRT_FRIENDLY
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    images = torch.rand(3, 3, 64, 64)  # batch 3, exported with batch 1
    fused, scales = session.run(None, {INPUT: images.numpy()})
    with torch.no_grad():
        ref_fused, ref_scales = model(images)
    assert fused.shape == (3, 64, 64) and scales.shape == (3, 2, 64, 64)
    np.testing.assert_allclose(fused, ref_fused.numpy(), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(scales, ref_scales.numpy(), atol=1e-4, rtol=1e-4)



def test_an_fp16_export_traced_channels_last_on_a_cpu_is_the_same_onnx_file(tmp_path, monkeypatch):
    """build-engines traces a half model on a CPU in channels-last, where PyTorch's fp16 convolutions
    are not naive (9x faster for the tests' bundle): the graph must be the one NCHW gives, byte for byte."""
    from ustudents.engines.onnx_engine import model_for_export

    traced = []
    export = torch.onnx.export
    monkeypatch.setattr(torch.onnx, "export", lambda model, args, *a, **k: (
        traced.append(args[0].is_contiguous(memory_format=torch.channels_last)), export(model, args, *a, **k)))
    torch.manual_seed(0)
    model = model_for_export(AnomalyModel([17, 33], students=1), "fp16")
    nchw = onnx.load(str(export_onnx(model, 20, tmp_path / "nchw.onnx", channels_last=False)))
    default = onnx.load(str(export_onnx(model, 20, tmp_path / "default.onnx")))
    assert traced == [False, True]  # the default for a half model on a CPU
    assert model.ensembles[0].net.convs[0].weight.is_contiguous()  # the caller's model is left in its layout
    assert default.graph.SerializeToString() == nchw.graph.SerializeToString()
    assert {i.data_type for i in default.graph.initializer if len(i.dims) == 4} == {onnx.TensorProto.FLOAT16}

LONG_RUN = """
import sys, time
import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from ustudents.engines.onnx_engine import interruptible_run

# 60 chained 4096-square matrix products on one thread: at least 40 s even at a core's peak FLOP rate.
n, steps = 4096, 60
w = numpy_helper.from_array(np.eye(n, dtype=np.float32), "w")
nodes = [helper.make_node("MatMul", [f"y{i}", "w"], [f"y{i + 1}"]) for i in range(steps)]
graph = helper.make_graph(nodes, "long", [helper.make_tensor_value_info("y0", TensorProto.FLOAT, [n, n])],
                          [helper.make_tensor_value_info(f"y{steps}", TensorProto.FLOAT, [n, n])], [w])
opts = ort.SessionOptions()
opts.intra_op_num_threads = 1
opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep the chain as it is
session = ort.InferenceSession(helper.make_model(graph).SerializeToString(), sess_options=opts,
                               providers=["CPUExecutionProvider"])
print("running", flush=True)
start = time.monotonic()
try:
    interruptible_run(session, {"y0": np.ones((n, n), np.float32)})
except KeyboardInterrupt:
    print(f"stopped after {time.monotonic() - start:.1f} s", flush=True)
    sys.exit(130)
print("ran to the end", flush=True)
"""


def test_ctrl_c_stops_an_onnxruntime_run_at_once():
    """Ctrl-C during a long ONNX Runtime run (an fp16 check on a CPU) stops it at once, and the process
    exits cleanly: not when the run would have ended, and not with a C++ abort at exit."""
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-c", LONG_RUN], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "running"
        time.sleep(1.0)  # inside the run, which takes at least 40 s
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        waited = time.monotonic() - sent
    finally:
        proc.kill()
    assert proc.returncode == 130, (proc.returncode, out, err)
    assert out.startswith("stopped after") and "terminate called" not in err, (out, err)
    assert waited < 10, waited


def test_a_second_ctrl_c_while_the_run_stops_waits_for_the_same_stop():
    """A second Ctrl-C while the first one's stop is awaited must not leave the run going (a run still
    inside ONNX Runtime at interpreter exit aborts the process): interruptible_run returns only once
    the run has ended, with one KeyboardInterrupt. Here the run ends 0.5 s after the second Ctrl-C, and
    both Ctrl-Cs are played by interrupt_main (as SIGINT's handler raises them), the second inside
    the wait for the first's stop."""
    import _thread
    import threading
    import time

    from ustudents.engines import onnx_engine

    told, second, ended = threading.Event(), threading.Event(), threading.Event()

    class Session:
        def run(self, names, feeds, options):
            while not options.terminate:
                time.sleep(0.01)
            told.set()
            second.wait(10)  # a node that takes its time to finish: until the second Ctrl-C has landed
            time.sleep(0.5)
            ended.set()
            return []

    def press_twice():
        time.sleep(0.3)  # inside the run
        _thread.interrupt_main()
        if told.wait(10):
            time.sleep(0.2)  # inside the wait for the stop
            _thread.interrupt_main()
            second.set()
    presser = threading.Thread(target=press_twice, daemon=True)
    presser.start()
    with pytest.raises(KeyboardInterrupt):
        onnx_engine.interruptible_run(Session(), {})
    assert ended.is_set(), "interruptible_run returned while the run was still going"
    presser.join(5)


def test_a_ctrl_c_as_the_run_starts_still_stops_it(monkeypatch):
    """A Ctrl-C landing inside Thread.start (which waits for the new thread) left interruptible_run
    before its stop was armed: the run went on, never told to terminate. Here the signal is played
    by start() raising once the thread runs."""
    import threading
    import time

    from ustudents.engines import onnx_engine

    class Session:
        terminated = None

        def run(self, names, feeds, options):
            deadline = time.monotonic() + 10
            while not options.terminate and time.monotonic() < deadline:
                time.sleep(0.01)
            Session.terminated = options.terminate
            return []

    start = threading.Thread.start

    def interrupted_start(thread):
        start(thread)
        if thread.name == "onnxruntime-run":  # no other thread of the process is touched
            raise KeyboardInterrupt
    monkeypatch.setattr(onnx_engine.threading.Thread, "start", interrupted_start)
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        onnx_engine.interruptible_run(Session(), {})
    assert Session.terminated is True and time.monotonic() - t0 < 5
