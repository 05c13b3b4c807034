"""What the trainers share around torch and the hand-written ONNX graph: the
deterministic set-up (the exported bytes, and so the signed manifest's sha256,
depend on it), folding batch norm into a convolution, and writing the graph."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
import torch
from onnx import helper
from torch import nn


def deterministic() -> None:
    """Fixed seed, deterministic kernels, one thread: CPU reductions may reorder with
    the thread count, and then the weights (and the file's bytes) differ."""
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)


def fold(conv: nn.Conv2d | nn.Conv3d, norm: nn.BatchNorm2d | nn.BatchNorm3d
         ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """The convolution followed by the (eval-mode) batch norm, as one convolution."""
    assert conv.bias is not None and norm.running_var is not None
    assert norm.running_mean is not None
    scale = norm.weight.detach() / torch.sqrt(norm.running_var + norm.eps)
    shape = (-1,) + (1,) * (conv.weight.dim() - 1)
    weight = conv.weight.detach() * scale.view(shape)
    bias = (conv.bias.detach() - norm.running_mean) * scale + norm.bias.detach()
    return weight.numpy().astype(np.float32), bias.numpy().astype(np.float32)


def write_onnx(graph: onnx.GraphProto, producer: str, path: Path) -> None:
    """Opset 17, IR version 8 (what the pinned onnxruntime reads), checked, then written."""
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name=producer)
    proto.ir_version = 8
    onnx.checker.check_model(proto)
    path.write_bytes(proto.SerializeToString())
