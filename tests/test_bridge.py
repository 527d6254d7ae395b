"""NumPy <-> torch: zero-copy both ways, dtype fidelity, documented copies, detach, cast, write-back into a slot."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch

from broker import UnsupportedArray
from workers.bridge import cast, to_numpy, to_tensor, torch_dtype, wire_dtype, write_into


def _ptr(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


# -- to_tensor --------------------------------------------------------------------------------
def test_to_tensor_shares_memory_both_ways():
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    t = to_tensor(a)
    assert t.data_ptr() == _ptr(a)
    a[1, 2] = -5.0
    assert t[1, 2].item() == -5.0  # numpy write seen by torch
    t[2, 3] = 99.0
    assert a[2, 3] == 99.0  # torch write seen by numpy
    t.mul_(2)
    assert a[0, 1] == 2.0


def test_to_tensor_of_a_positively_strided_view_is_zero_copy():
    a = np.arange(24, dtype=np.int32).reshape(4, 6)
    v = a[:, ::2]
    t = to_tensor(v)
    assert t.data_ptr() == _ptr(v)
    assert t.stride() == (6, 2)
    t[3, 2] = 1000
    assert a[3, 4] == 1000


@pytest.mark.parametrize("dtype", [np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8,
                                   np.float16, np.float32, np.float64, np.complex64, np.complex128])
def test_to_tensor_keeps_the_dtype(dtype):
    a = (np.arange(6) % 2).astype(dtype)
    t = to_tensor(a)
    assert t.dtype == torch_dtype(dtype)
    assert wire_dtype(t.dtype) == np.dtype(dtype).str
    assert np.array_equal(t.numpy(), a)


def test_float64_stays_float64():
    a = np.linspace(0, 1, 7)
    t = to_tensor(a)
    assert t.dtype == torch.float64
    assert t.numpy().tobytes() == a.tobytes()


@pytest.mark.parametrize("make", [
    lambda: np.arange(10.0)[::-1],
    lambda: np.arange(20, dtype=np.int16).reshape(4, 5)[::-1, ::2],
    lambda: np.arange(20, dtype=np.float32).reshape(4, 5)[:, ::-1],
], ids=["1d", "2d-mixed", "columns"])
def test_negative_strides_get_a_contiguous_copy_with_the_right_values(make):
    a = make()
    assert any(s < 0 for s in a.strides)
    with pytest.raises(ValueError):
        torch.from_numpy(a)  # what the bridge protects against
    t = to_tensor(a)
    assert t.is_contiguous()
    assert np.array_equal(t.numpy(), a)
    assert t.dtype == torch_dtype(a.dtype)
    assert not np.shares_memory(t.numpy(), a)


@pytest.mark.parametrize("dtype", [">f8", ">i4", ">u2", ">c8", ">f2"])
def test_non_native_byte_order_gets_a_native_copy_with_the_right_values(dtype):
    a = np.arange(-3, 9).astype(dtype).reshape(3, 4)
    assert not a.dtype.isnative
    t = to_tensor(a)
    assert t.dtype == torch_dtype(dtype)
    assert np.array_equal(t.numpy(), a)  # values, not bytes
    assert t.numpy().dtype.isnative
    assert not np.shares_memory(t.numpy(), a)


def test_non_native_and_negative_strides_together():
    a = np.arange(10, dtype=">i8")[::-2]
    t = to_tensor(a)
    assert t.tolist() == [9, 7, 5, 3, 1]


@pytest.mark.parametrize("array", [
    np.array([1, "a", None], dtype=object),
    np.zeros(3, dtype=[("x", "<f4"), ("y", "<i4")]),
], ids=["object", "structured"])
def test_object_and_structured_arrays_are_refused(array):
    with pytest.raises(UnsupportedArray, match="object or structured"):
        to_tensor(array)


def test_torch_dtype_of_an_unsupported_dtype():
    with pytest.raises(UnsupportedArray, match="torch has no dtype"):
        torch_dtype("datetime64[ns]")


def test_read_only_array_gives_no_warning_and_shares_memory():
    a = np.arange(5.0)
    a.flags.writeable = False
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        t = to_tensor(a)
    assert not seen, [str(w.message) for w in seen]
    assert t.data_ptr() == _ptr(a)
    assert t.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]


_READ_ONLY = textwrap.dedent("""
    import warnings, numpy as np, torch
    from workers.bridge import to_tensor
    warnings.simplefilter("error")
    a = np.arange(3.0)
    a.flags.writeable = False
    {call}(a)
    print("no warning")
""")


def test_read_only_warning_is_really_suppressed_in_a_fresh_process():
    """torch warns only once per process, so the proof runs in fresh ones, with a control."""
    procs = {call: subprocess.Popen([sys.executable, "-c", _READ_ONLY.format(call=call)],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for call in ("to_tensor", "torch.from_numpy")}
    out = {call: p.communicate(timeout=60) + (p.returncode,) for call, p in procs.items()}
    stdout, stderr, code = out["to_tensor"]
    assert code == 0 and b"no warning" in stdout, stderr.decode()[-2000:]
    stdout, stderr, code = out["torch.from_numpy"]
    assert code != 0 and b"not writable" in stderr, "the control must show torch's warning"


# -- to_numpy ---------------------------------------------------------------------------------
def test_to_numpy_detaches_tensors_that_require_grad():
    t = torch.arange(4, dtype=torch.float32, requires_grad=True)
    with pytest.raises(RuntimeError):
        t.numpy()  # what the bridge protects against
    a = to_numpy(t)
    assert a.tolist() == [0.0, 1.0, 2.0, 3.0]
    assert _ptr(a) == t.data_ptr()  # detached, not copied
    y = t * 3
    assert to_numpy(y).tolist() == [0.0, 3.0, 6.0, 9.0]


def test_to_numpy_shares_memory_with_a_cpu_tensor():
    t = torch.zeros(2, 3, dtype=torch.int64)
    a = to_numpy(t)
    a[1, 1] = 7
    assert t[1, 1].item() == 7
    assert a.dtype == np.int64


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_to_numpy_brings_a_gpu_tensor_home():
    t = torch.arange(4.0, device="cuda", requires_grad=True) * 2
    assert to_numpy(t).tolist() == [0.0, 2.0, 4.0, 6.0]


# -- cast -------------------------------------------------------------------------------------
def test_cast_copies_only_when_the_dtype_changes():
    t = torch.arange(6, dtype=torch.float64)
    assert cast(t, torch.float64) is t
    assert cast(t, "float64") is t
    assert cast(t, None) is t
    f = cast(t, torch.float32)
    assert f.dtype == torch.float32 and f.data_ptr() != t.data_ptr()
    assert f.tolist() == t.tolist()
    h = cast(t, "float16")
    assert h.dtype == torch.float16 and h.tolist() == t.tolist()
    f[0] = 100
    assert t[0].item() == 0  # the cast is a copy


# -- write_into ----------------------------------------------------------------------------------
def test_write_into_writes_a_tensor_into_the_slot(client):
    handle, slot = client.alloc((3, 4), "float32")
    try:
        before = _ptr(slot)
        result = torch.arange(12, dtype=torch.float32, requires_grad=True).reshape(3, 4) * 2
        assert write_into(slot, result) == 48
        assert _ptr(slot) == before
        again = client.view(handle)  # another view of the same arena bytes
        assert again.tolist() == (np.arange(12, dtype=np.float32).reshape(3, 4) * 2).tolist()
    finally:
        client.release(handle)


def test_write_into_casts_to_the_slot_dtype():
    slot = np.zeros((2, 2), np.float32)
    write_into(slot, torch.tensor([[1.5, 2.5], [3.5, 4.5]], dtype=torch.float64))
    assert slot.dtype == np.float32 and slot.tolist() == [[1.5, 2.5], [3.5, 4.5]]
    write_into(slot, np.array([[1, 2], [3, 4]], dtype=np.int64))
    assert slot.tolist() == [[1, 2], [3, 4]]


def test_write_into_writes_a_non_contiguous_tensor():
    slot = np.zeros((3, 2), np.int32)
    src = torch.arange(6, dtype=torch.int32).reshape(2, 3).t()
    assert not src.is_contiguous()
    write_into(slot, src)
    assert slot.tolist() == src.tolist()


@pytest.mark.parametrize("result", [torch.zeros(4, 3), torch.zeros(12), np.zeros((3, 3))],
                         ids=["transposed", "flat", "numpy"])
def test_write_into_rejects_a_shape_mismatch(result):
    slot = np.full((3, 4), 5.0, np.float32)
    with pytest.raises(ValueError, match=r"does not match slot \(3, 4\)"):
        write_into(slot, result)
    assert (slot == 5.0).all(), "a refused result must not touch the slot"


def test_bfloat16_is_stored_as_its_raw_bits_and_read_back_as_bfloat16():
    """NumPy has no bfloat16: the arena holds its 16 bits (<u2); both directions keep every value."""
    values = torch.tensor([1.0, -2.5, 3.140625, 65280.0, 1e-3], dtype=torch.bfloat16)
    assert wire_dtype(torch.bfloat16) == "bfloat16" and torch_dtype("bfloat16") == torch.bfloat16
    slot = np.zeros(5, dtype="<u2")  # what the arena's view of a bfloat16 slot is
    assert write_into(slot, values, wire="bfloat16") == 10
    back = to_tensor(slot, "bfloat16")
    assert back.dtype == torch.bfloat16 and torch.equal(back, values)
    assert np.shares_memory(to_numpy(back), slot)  # the bits, viewed: no copy
    assert cast(torch.ones(2), "bfloat16").dtype == torch.bfloat16
