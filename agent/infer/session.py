"""One onnxruntime session per model, with a wall-clock timeout per run.

onnxruntime has no per-run timeout, but ``RunOptions.terminate`` set from
another thread makes a running ``run()`` abort at the next kernel boundary;
a ``threading.Timer`` does that when the deadline passes.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from agent.errors import ModelError


class ModelTimeout(ModelError):
    """A model run exceeded its time budget and was terminated."""


class ModelSession:
    def __init__(self, path: Path, *, input_name: str, output_name: str, threads: int) -> None:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = max(1, threads)
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle worker threads must not spin: the box also receives and encrypts.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.log_severity_level = 3
        try:
            self._session = ort.InferenceSession(str(path), sess_options=opts,
                                                 providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise ModelError(f"onnxruntime cannot load {path.name}: {str(exc)[:200]}",
                             hint="re-install the model package; it may be corrupt") from exc
        inputs = {i.name: i for i in self._session.get_inputs()}
        outputs = {o.name for o in self._session.get_outputs()}
        if input_name not in inputs or output_name not in outputs:
            raise ModelError(
                f"{path.name} has inputs {sorted(inputs)} and outputs {sorted(outputs)}, "
                f"but the manifest names input {input_name!r} and output {output_name!r}",
                hint="the manifest and the ONNX file do not belong together",
            )
        self.input_name = input_name
        self.output_name = output_name
        self.input_shape = tuple(inputs[input_name].shape)

    def check_input(self, channels: int, rows: int, cols: int) -> None:
        shape = self.input_shape
        expected = (channels, rows, cols)
        if len(shape) != 4 or any(isinstance(d, int) and d != e for d, e in zip(shape[1:], expected, strict=False)):
            raise ModelError(
                f"model input shape {list(shape)} does not match the manifest's "
                f"preprocessing (N, {channels}, {rows}, {cols})",
                hint="fix preprocessing.resize / channels in the manifest",
            )

    @property
    def raw(self) -> ort.InferenceSession:
        """The underlying session (for the benchmark's raw baseline)."""
        return self._session

    def run(self, batch: npt.NDArray[np.float32], timeout: float) -> npt.NDArray[np.float32]:
        if timeout <= 0:
            raise ModelTimeout("inference time budget exhausted before the run started")
        options = ort.RunOptions()
        fired = threading.Event()

        def stop() -> None:
            fired.set()
            options.terminate = True

        timer = threading.Timer(timeout, stop)
        timer.daemon = True
        timer.start()
        try:
            out = self._session.run([self.output_name], {self.input_name: batch}, options)
        except Exception as exc:
            if fired.is_set():
                raise ModelTimeout(f"inference timed out after {timeout:.1f}s") from exc
            raise ModelError(f"onnxruntime run failed: {str(exc)[:200]}") from exc
        finally:
            timer.cancel()
        if fired.is_set():
            # Finished in the same instant the timer fired: still over budget.
            raise ModelTimeout(f"inference timed out after {timeout:.1f}s")
        return np.asarray(out[0], dtype=np.float32)

    def warm_up(self, channels: int, rows: int, cols: int, timeout: float) -> None:
        self.run(np.zeros((1, channels, rows, cols), dtype=np.float32), timeout)
