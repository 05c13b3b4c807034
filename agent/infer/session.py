"""One onnxruntime session per model, with a wall-clock timeout per run.

onnxruntime has no per-run timeout, but ``RunOptions.terminate`` set from
another thread makes a running ``run()`` abort at the next kernel boundary.
One long-lived watchdog thread per session does that when the deadline
passes; starting a ``threading.Timer`` per run cost more than some runs.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from agent.errors import ModelError
from agent.infer import providers as eps

log = logging.getLogger(__name__)


class ModelTimeout(ModelError):
    """A model run exceeded its time budget and was terminated."""

    code = "timeout"


class _Watchdog:
    """Sets ``terminate`` on the armed RunOptions once its deadline passes.

    Arming only wakes the thread when the new deadline is earlier than the one
    it sleeps towards, so back-to-back runs cost no context switch each.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._armed: tuple[ort.RunOptions, float, threading.Event] | None = None
        self._closed = False
        self._wakes_at = float("inf")
        self._thread = threading.Thread(target=self._loop, name="onnx-watchdog", daemon=True)
        self._thread.start()

    def arm(self, options: ort.RunOptions, timeout: float) -> threading.Event:
        fired = threading.Event()
        deadline = time.monotonic() + timeout
        with self._cond:
            self._armed = (options, deadline, fired)
            if deadline < self._wakes_at:
                self._cond.notify()
        return fired

    def disarm(self) -> None:
        with self._cond:
            self._armed = None

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()

    def _loop(self) -> None:
        with self._cond:
            while not self._closed:
                if self._armed is None:
                    self._wakes_at = float("inf")
                    self._cond.wait()
                    continue
                options, deadline, fired = self._armed
                remaining = deadline - time.monotonic()
                if remaining > 0:
                    self._wakes_at = deadline
                    self._cond.wait(remaining)
                    continue
                fired.set()
                options.terminate = True
                self._armed = None


class ModelSession:
    def __init__(self, path: Path, *, input_name: str, output_name: str, threads: int,
                 extra_outputs: tuple[str, ...] = (),
                 providers: tuple[str, ...] = eps.DEFAULT) -> None:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = max(1, threads)
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle worker threads must not spin: the box also receives and encrypts.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.log_severity_level = 3
        choice = eps.choose(providers)
        try:
            try:
                self._session = ort.InferenceSession(str(path), sess_options=opts,
                                                     providers=list(choice.use))
            except Exception as exc:  # a present provider may still fail to initialise
                if choice.use == eps.DEFAULT:
                    raise
                log.warning("model %s: onnxruntime could not create a session with %s (%s); "
                            "falling back to %s", path.name, ", ".join(choice.use),
                            str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__,
                            eps.CPU)
                self._session = ort.InferenceSession(str(path), sess_options=opts,
                                                     providers=list(eps.DEFAULT))
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise ModelError(f"onnxruntime cannot load {path.name}: {str(exc)[:200]}",
                             hint="re-install the model package; it may be corrupt") from exc
        # What onnxruntime actually assigned (it may drop a provider on its own).
        self.providers = tuple(self._session.get_providers())
        inputs = {i.name: i for i in self._session.get_inputs()}
        outputs = {o.name for o in self._session.get_outputs()}
        if input_name not in inputs or output_name not in outputs:
            raise ModelError(
                f"{path.name} has inputs {sorted(inputs)} and outputs {sorted(outputs)}, "
                f"but the manifest names input {input_name!r} and output {output_name!r}",
                hint="the manifest and the ONNX file do not belong together",
            )
        missing = [name for name in extra_outputs if name not in outputs]
        if missing:
            raise ModelError(
                f"{path.name} has outputs {sorted(outputs)}, but the manifest's explanation "
                f"or [mask] names output {missing[0]!r}",
                hint="the model must compute its explanation map (and a mask model its mask) "
                     "as a graph output; otherwise use explanation.method = \"occlusion\" "
                     "in the manifest, or remove [mask]",
            )
        self.input_name = input_name
        self.output_name = output_name
        # Fetched in the same run as the scores (a map computed inside the graph).
        self._fetch = [output_name, *extra_outputs]
        self.images_run = 0  # images fed to the model: what explanations cost in passes
        self.input_shape = tuple(inputs[input_name].shape)
        self._watchdog = _Watchdog()
        self._run_lock = threading.Lock()  # one armed run per watchdog
        # Wall time spent inside onnxruntime: lets the benchmark separate the engine's own
        # work from the model's in the same call (robust on a shared, noisy machine).
        self.run_seconds = 0.0

    def check_input(self, channels: int, *dims: int) -> None:
        """The model's input must be (N, channels, *dims): (rows, cols) for an image,
        (depth, rows, cols) for a volume."""
        shape = self.input_shape
        expected = (channels, *dims)
        fixed = [(d, e) for d, e in zip(shape[1:], expected, strict=False) if isinstance(d, int)]
        if len(shape) != 1 + len(expected) or any(d != e for d, e in fixed):
            raise ModelError(
                f"model input shape {list(shape)} does not match the manifest's "
                f"[input] and preprocessing (N, {', '.join(map(str, expected))})",
                hint="fix input.kind / input.depth / preprocessing.resize / channels in "
                     "the manifest",
            )

    @property
    def raw(self) -> ort.InferenceSession:
        """The underlying session (for the benchmark's raw baseline)."""
        return self._session

    def run(self, batch: npt.NDArray[np.float32], timeout: float) -> npt.NDArray[np.float32]:
        """The score output of one run."""
        return self.run_all(batch, timeout)[0]

    def run_all(self, batch: npt.NDArray[np.float32],
                timeout: float) -> tuple[npt.NDArray[np.float32], ...]:
        """The score output and then every extra output, all from one run."""
        if timeout <= 0:
            raise ModelTimeout("inference time budget exhausted before the run started")
        options = ort.RunOptions()
        with self._run_lock:
            fired = self._watchdog.arm(options, timeout)
            started = time.perf_counter()
            try:
                out = self._session.run(self._fetch, {self.input_name: batch}, options)
            except Exception as exc:  # noqa: BLE001 - translated at the boundary
                if fired.is_set():
                    raise ModelTimeout(f"inference timed out after {timeout:.1f}s") from exc
                raise ModelError(f"onnxruntime run failed: {str(exc)[:200]}",
                                 code="runtime-error") from exc
            finally:
                self.run_seconds += time.perf_counter() - started
                self.images_run += len(batch)
                self._watchdog.disarm()
        if fired.is_set():
            # Finished in the same instant the timer fired: still over budget.
            raise ModelTimeout(f"inference timed out after {timeout:.1f}s")
        return tuple(np.asarray(o, dtype=np.float32) for o in out)

    def close(self) -> None:
        self._watchdog.close()

    def warm_up(self, channels: int, *dims: int,
                timeout: float) -> tuple[npt.NDArray[np.float32], ...]:
        """One run on a blank image (or volume); returns its outputs so the caller can check
        shapes."""
        return self.run_all(np.zeros((1, channels, *dims), dtype=np.float32), timeout)
