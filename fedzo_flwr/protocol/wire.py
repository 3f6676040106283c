"""Wire formats: the exact bytes exchanged between server and clients, and their sizes.

Two payloads, each a plain ``bytes`` object with no header (the receiver already knows the
layout from the model and the mask, so nothing redundant travels), and one size for reporting:

* **Mask bitmap** (:func:`encode_mask`): one bit per prunable weight, ``1`` = kept. Each tensor
  is flattened row-major and packed with :func:`numpy.packbits` (``bitorder="big"``: the first
  entry is the most significant bit of the first byte) **per tensor**; the per-tensor byte
  strings are concatenated in mask order. A tensor of ``n`` entries takes ``ceil(n / 8)`` bytes,
  so the padding costs at most 7 bits per tensor; padding bits are zero and the decoder checks
  it. Size: :func:`mask_nbytes` (7,722 bytes for LeNet-5). :func:`split_mask` cuts it into the
  per-tensor bitmaps without unpacking (what a ``stream`` client holds:
  :mod:`fedzo_flwr.sparse.packed` uses the same bit order).
* **Scalars** (:func:`encode_scalars`): a vector of little-endian float32 values (projected
  gradients, losses, ...), ``4 * k`` bytes for ``k`` values (:func:`scalars_nbytes`).
* **Sparse weights size** (:func:`sparse_weights_nbytes`): what the kept coordinates of a
  model would take as float32, ``4 * space.dim`` bytes (reported next to the dense size).

Every decoder validates the length exactly and raises :class:`ValueError` naming the offending
argument with the expected and received sizes; wrong argument types raise :class:`TypeError`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from fedzo_flwr.sparse.mask import Mask, prunable_parameters
from fedzo_flwr.sparse.packed import bitmap_bytes, pack_bits
from fedzo_flwr.sparse.space import KeptSpace

__all__ = [
    "decode_mask",
    "decode_scalars",
    "encode_mask",
    "encode_scalars",
    "mask_nbytes",
    "scalars_nbytes",
    "sparse_weights_nbytes",
    "split_mask",
]

_F32_LE = np.dtype("<f4")
BytesLike = bytes | bytearray | memoryview


def _as_bytes(data: object, name: str = "data") -> bytes:
    """Return ``data`` as ``bytes``, accepting any bytes-like object; TypeError otherwise."""
    if isinstance(data, bytes):
        return data
    if isinstance(data, (bytearray, memoryview)):
        return bytes(data)
    raise TypeError(f"{name} must be bytes, got {type(data).__name__}")


def _check_count(value: object, name: str) -> int:
    """Return ``value`` as an int after checking it is a non-negative integer."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be a non-negative int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return int(value)


def _check_space(space: object) -> KeptSpace:
    if not isinstance(space, KeptSpace):
        raise TypeError(f"space must be a KeptSpace, got {type(space).__name__}")
    return space


def _mask_layout(template: object, name: str) -> list[tuple[str, torch.Size]]:
    """``(name, shape)`` of every tensor of a mask template or of a model's prunable weights."""
    if isinstance(template, nn.Module):
        return [(n, p.shape) for n, p in prunable_parameters(template)]
    if isinstance(template, dict):
        layout = []
        for key, value in template.items():
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"{name}[{key!r}] must be a tensor, got {type(value).__name__}")
            layout.append((key, value.shape))
        return layout
    raise TypeError(f"{name} must be a Mask (dict) or an nn.Module, got {type(template).__name__}")


def _layout_nbytes(layout: list[tuple[str, torch.Size]]) -> int:
    return sum(bitmap_bytes(shape.numel()) for _, shape in layout)


def mask_nbytes(mask_or_model: Mask | nn.Module) -> int:
    """Exact size in bytes of the mask bitmap: ``sum over tensors of ceil(n_tensor / 8)``.

    Parameters
    ----------
    mask_or_model : Mask or nn.Module
        A mask, or a model (its prunable weights define the layout).

    Returns
    -------
    int
        Number of bytes :func:`encode_mask` produces for this layout (7,722 for LeNet-5).

    """
    return _layout_nbytes(_mask_layout(mask_or_model, "mask_or_model"))


def encode_mask(mask: Mask) -> bytes:
    """Pack ``mask`` into its bitmap: per-tensor ``np.packbits`` (big bit order), concatenated.

    Parameters
    ----------
    mask : Mask
        ``torch.bool`` tensors; the bitmap follows the dict order.

    Returns
    -------
    bytes
        ``mask_nbytes(mask)`` bytes; padding bits at the end of each tensor are zero.

    Raises
    ------
    TypeError
        If ``mask`` is not a dict of ``torch.bool`` tensors.

    """
    if not isinstance(mask, dict):
        raise TypeError(f"mask must be a dict of bool tensors, got {type(mask).__name__}")
    chunks = []
    for name, m in mask.items():
        if not isinstance(m, torch.Tensor) or m.dtype != torch.bool:
            raise TypeError(f"mask[{name!r}] must be a torch.bool tensor")
        chunks.append(pack_bits(m.detach().to("cpu")).numpy().tobytes())
    return b"".join(chunks)


def decode_mask(data: BytesLike, template: Mask | nn.Module) -> Mask:
    """Unpack a bitmap produced by :func:`encode_mask`.

    Parameters
    ----------
    data : bytes
        The bitmap (``bytes``, ``bytearray`` or ``memoryview``).
    template : Mask or nn.Module
        Gives the tensor names, shapes and order: a mask (only its keys and shapes are read) or
        a model (its prunable weights, as in :func:`~fedzo_flwr.sparse.mask.prunable_parameters`).

    Returns
    -------
    Mask
        CPU ``torch.bool`` tensors, in template order.

    Raises
    ------
    TypeError
        If ``data`` is not bytes-like or ``template`` is neither a mask nor a model.
    ValueError
        If ``data`` does not have exactly ``mask_nbytes(template)`` bytes, or a padding bit is
        set.

    """
    packed = split_mask(data, template)  # validates the length and the padding bits
    out: Mask = {}
    for name, shape in _mask_layout(template, "template"):
        bits = np.unpackbits(packed[name].numpy(), bitorder="big")[: shape.numel()]
        out[name] = torch.from_numpy(bits.astype(np.bool_)).reshape(shape)
    return out


def split_mask(data: BytesLike, template: Mask | nn.Module) -> dict[str, torch.Tensor]:
    """Cut a bitmap produced by :func:`encode_mask` into its per-tensor bitmaps, still packed.

    Validated exactly as :func:`decode_mask` (length, zero padding bits) but never unpacked:
    the result holds one bit per weight (:mod:`fedzo_flwr.sparse.packed`'s format).

    Parameters
    ----------
    data : bytes
        The bitmap (``bytes``, ``bytearray`` or ``memoryview``).
    template : Mask or nn.Module
        Gives the tensor names, shapes and order (a model may live on the ``meta`` device).

    Returns
    -------
    dict of str to Tensor
        ``uint8`` tensors of ``ceil(n / 8)`` bytes each, in template order: views of one copy of
        ``data``.

    Raises
    ------
    TypeError, ValueError
        As :func:`decode_mask`.

    """
    raw = _as_bytes(data, "data")
    layout = _mask_layout(template, "template")
    expected = _layout_nbytes(layout)
    if len(raw) != expected:
        raise ValueError(f"data has {len(raw)} bytes, expected {expected} for this mask layout")
    buf = (
        torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        if raw
        else torch.empty(0, dtype=torch.uint8)
    )
    out: dict[str, torch.Tensor] = {}
    offset = 0
    for name, shape in layout:
        n = shape.numel()
        nbytes = bitmap_bytes(n)
        chunk = buf[offset : offset + nbytes]
        offset += nbytes
        pad = 8 * nbytes - n  # the low bits of the last byte (big bit order)
        if pad and int(chunk[-1]) & ((1 << pad) - 1):
            raise ValueError(f"data has non-zero padding bits after tensor {name!r}")
        out[name] = chunk
    return out


# --------------------------------------------------------------------------------------------
# Sparse weights
# --------------------------------------------------------------------------------------------


def sparse_weights_nbytes(space: KeptSpace) -> int:
    """Exact size in bytes of the sparse-weights payload: ``4 * space.dim``."""
    return 4 * _check_space(space).dim


# --------------------------------------------------------------------------------------------
# Scalars
# --------------------------------------------------------------------------------------------


def scalars_nbytes(k: int) -> int:
    """Exact size in bytes of ``k`` scalars: ``4 * k``."""
    return 4 * _check_count(k, "k")


def encode_scalars(values: np.ndarray | torch.Tensor | Sequence[float]) -> bytes:
    """Serialise a 1-D vector of real numbers as little-endian float32.

    Parameters
    ----------
    values : ndarray or sequence of float
        Real (integer or floating) values; NaN and infinities are kept as they are.

    Returns
    -------
    bytes
        ``4 * len(values)`` bytes.

    Raises
    ------
    TypeError
        If ``values`` is a ``str``/bytes, or not a numeric array or sequence.
    ValueError
        If ``values`` is not one-dimensional, or a finite value overflows float32.

    """
    if isinstance(values, (str, bytes, bytearray, memoryview)) or not isinstance(
        values, (np.ndarray, Sequence, torch.Tensor)
    ):
        raise TypeError(
            f"values must be a 1-D numpy array or a sequence of floats, got {type(values).__name__}"
        )
    if isinstance(values, torch.Tensor):
        values = values.detach().to("cpu").numpy()
    try:
        arr = np.asarray(values)
    except (TypeError, ValueError) as err:
        raise TypeError(f"values must hold real numbers: {err}") from None
    if arr.dtype.kind not in "iuf":
        raise TypeError(f"values must hold real numbers, got dtype {arr.dtype}")
    if arr.ndim != 1:
        raise ValueError(f"values must be one-dimensional, got shape {arr.shape}")
    wide = arr.astype(np.float64)
    with np.errstate(over="ignore"):
        out = wide.astype(_F32_LE)
    overflow = np.isfinite(wide) & ~np.isfinite(out)
    if overflow.any():
        i = int(np.flatnonzero(overflow)[0])
        raise ValueError(f"values[{i}] = {float(wide[i])!r} overflows float32")
    return out.tobytes()


def decode_scalars(data: BytesLike, expected_count: int | None = None) -> np.ndarray:
    """Parse a scalars payload into a float32 array.

    Parameters
    ----------
    data : bytes
        The payload (``bytes``, ``bytearray`` or ``memoryview``).
    expected_count : int or None
        If given, the exact number of scalars ``data`` must hold.

    Returns
    -------
    ndarray
        A writable, native-order ``float32`` array of shape ``(len(data) // 4,)``.

    Raises
    ------
    TypeError
        If ``data`` is not bytes-like or ``expected_count`` is not an int.
    ValueError
        If ``len(data)`` is not a multiple of 4, or ``data`` does not hold ``expected_count``
        scalars.

    """
    raw = _as_bytes(data, "data")
    if expected_count is not None:
        expected_count = _check_count(expected_count, "expected_count")
    if len(raw) % 4:
        raise ValueError(f"data has {len(raw)} bytes, not a multiple of 4 (float32 scalars)")
    count = len(raw) // 4
    if expected_count is not None and count != expected_count:
        raise ValueError(
            f"data holds {count} scalars ({len(raw)} bytes), expected_count is {expected_count} "
            f"({4 * expected_count} bytes)"
        )
    return np.frombuffer(raw, dtype=_F32_LE).astype(np.float32)
