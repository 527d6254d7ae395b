"""NumPy <-> torch: zero-copy views both ways, dtype/byte-order/stride checks, bfloat16, detach and write-back.

The behaviours of ``torch.from_numpy`` and ``Tensor.numpy`` this project
relies on, each a function here and a test in ``tests/test_bridge.py``:

* ``to_tensor(a)`` shares memory with ``a`` (mutate one, see it in the other)
  and keeps its dtype (float64 stays float64). Inputs ``from_numpy`` rejects
  get a documented copy instead: negative strides (``a[::-1]``) and
  non-native byte order are made native and contiguous; object and
  structured dtypes raise ``UnsupportedArray``. Read-only arrays are
  wrapped without torch's "non-writable" warning (the tensor is not written).
  ``to_tensor(a, "bfloat16")`` views the raw bits (``<u2``) as bfloat16.
* bfloat16: NumPy has none, so the arena stores it as its raw 16 bits, dtype
  ``"bfloat16"`` on the wire and ``<u2`` to NumPy; ``wire_dtype`` names a
  torch dtype as the arena stores it.
* ``to_numpy(t)`` detaches a tensor that requires grad and brings a tensor
  on another device back to the host; a CPU tensor shares memory.
* ``cast(t, dtype)`` is the ``.type(torch.float32)`` of the tutorials: a copy
  only when the dtype changes.
* ``write_into(slot, t)`` writes a result straight into an arena slot: a
  device tensor is copied device->slot by ``slot_tensor.copy_(t)`` with no
  intermediate ``.cpu().numpy()`` array.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

from broker.errors import UnsupportedArray
from broker.protocol import BFLOAT16

__all__ = ["to_tensor", "to_numpy", "cast", "write_into", "torch_dtype", "wire_dtype"]


def torch_dtype(dtype: Any) -> torch.dtype:
    """The torch dtype of a NumPy dtype or a wire dtype string (``UnsupportedArray`` if none)."""
    if isinstance(dtype, str) and dtype == BFLOAT16:
        return torch.bfloat16
    dt = np.dtype(dtype)
    try:
        return torch.from_numpy(np.empty(0, dt.newbyteorder("="))).dtype
    except TypeError:
        raise UnsupportedArray(f"torch has no dtype for NumPy {dt}") from None


def wire_dtype(dtype: torch.dtype) -> str:
    """How the arena stores a torch dtype: a NumPy dtype string, or ``"bfloat16"``."""
    if dtype == torch.bfloat16:
        return BFLOAT16
    try:
        return torch.empty(0, dtype=dtype).numpy().dtype.str
    except TypeError:
        raise UnsupportedArray(f"the arena cannot hold {dtype} (NumPy has no such dtype)") from None


def to_tensor(array: np.ndarray, wire: str | None = None) -> torch.Tensor:
    """``torch.from_numpy`` without its failure modes; zero-copy whenever NumPy allows."""
    dt = array.dtype
    if dt.hasobject or dt.fields is not None:
        raise UnsupportedArray(f"cannot make a tensor from a {dt} array (object or structured dtype)")
    if not dt.isnative or any(s < 0 for s in array.strides):
        array = np.ascontiguousarray(array, dtype=dt.newbyteorder("="))  # documented copy
    if not array.flags.writeable:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*not writable.*", category=UserWarning)
            t = torch.from_numpy(array)
    else:
        t = torch.from_numpy(array)
    return t.view(torch.bfloat16) if wire == BFLOAT16 else t


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """Detach and bring to the host; shares memory for a CPU tensor (bfloat16: its raw bits)."""
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.to("cpu")
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(np.uint16)
    return tensor.numpy()


def cast(tensor: torch.Tensor, dtype: torch.dtype | str | None) -> torch.Tensor:
    """``tensor.type(dtype)``: a copy only if the dtype changes; ``None`` keeps it."""
    if dtype is None:
        return tensor
    if isinstance(dtype, str):
        dtype = torch_dtype(dtype)
    return tensor if tensor.dtype == dtype else tensor.type(dtype)


def write_into(slot: np.ndarray, result: Any, non_blocking: bool = False, wire: str | None = None) -> int:
    """Write a stage's result into an arena slot (of wire dtype ``wire``); returns the bytes written.

    A tensor on any device is copied straight into the slot's tensor view
    (device->host with no intermediate array); a NumPy array is copied by
    ``np.copyto``. Shapes must match exactly, dtypes are cast as the slot says.
    """
    if isinstance(result, torch.Tensor):
        result = result.detach()
        if tuple(result.shape) != slot.shape:
            raise ValueError(f"result shape {tuple(result.shape)} does not match slot {slot.shape}")
        to_tensor(slot, wire).copy_(result, non_blocking=non_blocking)
    else:
        result = np.asarray(result)
        if result.shape != slot.shape:
            raise ValueError(f"result shape {result.shape} does not match slot {slot.shape}")
        np.copyto(slot, result, casting="unsafe")
    return slot.nbytes
