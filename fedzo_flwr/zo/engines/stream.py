"""The ``stream`` engine: a forward-only step that costs no more than sparse inference.

Every layer's dense weight exists only while that layer runs. A forward pre-hook on each layer
that owns perturbed parameters (the coordinates of the
:class:`~fedzo_flwr.sparse.space.KeptSpace`: Conv/Linear weights and biases, normalisation
affine terms) writes them into **one reusable scratch buffer**, sized for the largest layer,
as ``w + s σ u_k`` on the kept coordinates and the stored values (0 at pruned entries)
elsewhere. The stored weights are never modified, so nothing has to be restored, and ``u_k``
is drawn block by block (:meth:`~fedzo_flwr.zo.directions.DirectionGenerator.tensor_block`):
a direction is never held whole. The perturbed values are computed exactly as the ``lean`` and
``fused`` engines compute them (``torch.add(w, u, alpha=s σ)`` on the kept coordinates).

The weights at rest come from one of two places:

* a plain model (what a dense client holds; :func:`~.stream_model.stream_engine` with any
  ``nn.Module``): its own parameters, read only, with the KeptSpace's index tables. The step adds
  the scratch buffer, one direction block and one layer's kept values, and the activations;
* a :class:`~.stream_model.StreamModel`: the model held **sparse at rest**, the kept coordinates
  as one flat float32 vector (what the wire carries) and each partly pruned tensor's mask as a
  packed bitmap (1 bit per weight, :mod:`fedzo_flwr.sparse.packed`); no dense weight tensor
  exists between layers, in inference as in training. A ``stream`` ClientApp builds one straight
  from the received kept values and mask bitmap (:func:`fedzo_flwr.zo.client.stream_model`).

The batch can be evaluated in **micro-batches** (``micro_batch`` examples per forward pass) to
cap the activations: see :func:`stream_loss_differences`. Each forward pass regenerates the
blocks it needs, so micro-batching multiplies the direction draws (not the memory).

The scalars equal the ``lean`` engine's within float rounding: on the whole batch the perturbed
weights are bit-identical and only the convolution kernels' blocking (a weight in a scratch
view instead of a parameter) can move the float32 logits by a few ulps; micro-batches add the
rounding of a sum of partial means (:func:`micro_batch_loss`). The documented tolerance, held by
``tests/test_stream_engine.py`` and ``tests/test_stream_client.py`` (through the ClientApp):
``|Δ_stream - Δ_lean| <= 1e-6 + 1e-4 |Δ_lean|`` per direction (:data:`DELTA_RTOL`,
:data:`DELTA_ATOL`), far below the differences themselves (``~σ|∇L·u|``).

Supported: models whose perturbed parameters all belong to leaf layers of
:data:`STREAM_LAYERS` that use them only inside their own call, each parameter owned by one
layer. Anything else raises :class:`~fedzo_flwr.zo.engines.fused.UnsupportedModel` (the
estimator then falls back to ``lean``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from fedzo_flwr.sparse.layout import PackedLayout
from fedzo_flwr.sparse.packed import bitmap_bytes, unpack_bits
from fedzo_flwr.sparse.space import KeptSpace
from fedzo_flwr.zo.directions import DirectionGenerator
from fedzo_flwr.zo.engines.base import LossDifferences, batch_loss
from fedzo_flwr.zo.engines.fused.stacked import UnsupportedModel
from fedzo_flwr.zo.settings import ZOSettings

__all__ = [
    "DELTA_ATOL",
    "DELTA_RTOL",
    "STREAM_LAYERS",
    "UNPACK_BYTES",
    "micro_batch_loss",
    "stream_loss_differences",
    "stream_workspace_bytes",
]

DELTA_RTOL = 1e-4
"""Relative tolerance of a stream loss difference against the lean engine's (module docstring)."""

DELTA_ATOL = 1e-6
"""Absolute tolerance of a stream loss difference against the lean engine's."""

STREAM_LAYERS: tuple[type[nn.Module], ...] = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.Linear,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
)
"""Layers whose parameters the stream engine can materialise just in time."""

UNPACK_BYTES = 1 << 13
"""Packed bitmap bytes unpacked at a time (8 x as many weights, 1 B each, in one reused buffer)."""


@dataclass
class _Slot:
    """One perturbed tensor: where it sits in the KeptSpace and in the model."""

    tensor: int  # index in the KeptSpace
    module: nn.Module
    attr: str
    shape: torch.Size
    numel: int
    size: int  # kept entries
    offset: int  # start in the flat kept vector
    index: torch.Tensor | None  # plain-model source: kept flat indices (None = all kept)
    param: torch.Tensor | None = None  # plain-model source: the stored parameter
    bitmap: torch.Tensor | None = None  # StreamModel source: packed mask (None = all kept)


def _slots(
    model: nn.Module,
    layout: KeptSpace | PackedLayout,
    indices: list[torch.Tensor | None] | None = None,
) -> list[_Slot]:
    """The perturbed tensors of ``model`` in ``layout``'s order, or :class:`UnsupportedModel`.

    ``indices``: the plain-model source's kept flat indices per tensor (``None``: a
    StreamModel, which reads bitmaps instead).
    """
    modules = dict(model.named_modules())
    owners: dict[int, int] = {}
    for owner in model.modules():
        for p in owner._parameters.values():
            if p is not None:
                owners[id(p)] = owners.get(id(p), 0) + 1
    slots = []
    offset = 0
    idx = indices if indices is not None else [None] * len(layout.names)
    for t, (name, shape, index, size) in enumerate(
        zip(layout.names, layout.shapes, idx, layout.sizes, strict=True)
    ):
        path, _, attr = name.rpartition(".")
        module = modules.get(path)
        if module is None or not isinstance(module, STREAM_LAYERS):
            kind = "no module" if module is None else type(module).__name__
            raise UnsupportedModel(f"the stream engine cannot perturb {name!r} (owned by {kind})")
        param = module._parameters.get(attr)
        if param is None or owners.get(id(param), 0) != 1:
            raise UnsupportedModel(f"the stream engine needs {name!r} owned by one layer")
        if param.shape != shape:
            raise UnsupportedModel(f"{name!r} has shape {tuple(param.shape)}, not {tuple(shape)}")
        slots.append(_Slot(t, module, attr, shape, shape.numel(), size, offset, index))
        offset += size
    return slots


class _Streamer:
    """Hooks that write each layer's (perturbed) parameters into one scratch buffer."""

    def __init__(self, slots: list[_Slot], values: torch.Tensor | None = None) -> None:
        self.slots = slots
        self.values = values  # StreamModel: the kept coordinates; None: read the parameters
        self.by_module: dict[int, list[_Slot]] = {}
        for slot in slots:
            self.by_module.setdefault(id(slot.module), []).append(slot)
        self.modules = {id(s.module): s.module for s in slots}
        self.generator: DirectionGenerator | None = None
        self.k = -1
        self.alpha = 0.0
        self._buffers: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def sizes(self) -> tuple[int, int, int, int]:
        """Floats of the scratch, a direction block and a layer's kept values; bitmap bytes.

        The kept-values buffer is needed by a plain model with index tables only; the bitmap
        buffer holds one unpacked piece (at most ``8 * UNPACK_BYTES`` weights).
        """
        scratch = max(sum(s.numel for s in group) for group in self.by_module.values())
        block = max(s.size for s in self.slots)
        indexed = [s.size for s in self.slots if s.index is not None and self.values is None]
        packed = [8 * bitmap_bytes(s.numel) for s in self.slots if s.bitmap is not None]
        return (
            scratch,
            block,
            max(indexed, default=0),
            min(max(packed, default=0), 8 * UNPACK_BYTES),
        )

    @contextmanager
    def buffers(self) -> Iterator[None]:
        """The scratch, block and bitmap buffers, allocated for one call and freed after it."""
        if self._buffers is not None:
            yield
            return
        scratch, block, values, bits = self.sizes()
        self._buffers = (
            torch.empty(scratch, dtype=torch.float32),
            torch.empty(block, dtype=torch.float32),  # the direction block u
            torch.empty(values, dtype=torch.float32),  # a plain model: one layer's kept values
            torch.empty(bits, dtype=torch.uint8),  # one piece of an unpacked bitmap
        )
        try:
            yield
        finally:
            self._buffers = None

    def perturb(
        self, generator: DirectionGenerator | None, k: int = -1, alpha: float = 0.0
    ) -> None:
        """Use ``w + alpha u_k`` from now on (``generator=None``: the stored weights)."""
        self.generator, self.k, self.alpha = generator, k, alpha

    def fill(self, slot: _Slot, out: torch.Tensor) -> None:
        """Write ``slot``'s dense (perturbed) values into the flat ``out``."""
        assert self._buffers is not None
        _, ubuf, vbuf, bits = self._buffers
        u = None
        if self.generator is not None:
            u = self.generator.tensor_block(self.k, slot.tensor, out=ubuf[: slot.size])
        if self.values is None:  # a plain model: its parameter, read only
            assert slot.param is not None
            flat = slot.param.detach().reshape(-1)
            if u is None:
                out.copy_(flat)
            elif slot.index is None:
                torch.add(flat, u, alpha=self.alpha, out=out)
            else:
                out.copy_(flat)
                kept = torch.index_select(flat, 0, slot.index, out=vbuf[: slot.size])
                out.index_copy_(0, slot.index, torch.add(kept, u, alpha=self.alpha, out=kept))
            return
        kept = self.values[slot.offset : slot.offset + slot.size]
        if slot.bitmap is None:
            if u is None:
                out.copy_(kept)
            else:
                torch.add(kept, u, alpha=self.alpha, out=out)
            return
        if u is not None:  # w + σu in place of u: elementwise, the same op as lean's
            kept = torch.add(kept, u, alpha=self.alpha, out=u)
        out.zero_()
        taken = 0
        for start in range(0, slot.bitmap.numel(), UNPACK_BYTES):
            piece = slot.bitmap[start : start + UNPACK_BYTES]
            lo = 8 * start
            hi = min(lo + 8 * piece.numel(), slot.numel)
            keep = unpack_bits(piece, hi - lo, bits)
            count = int(keep.sum())
            out[lo:hi].masked_scatter_(keep, kept[taken : taken + count])
            taken += count

    def hook(self, module: nn.Module, args: object) -> None:
        """Forward pre-hook: materialise ``module``'s perturbed parameters in the scratch."""
        assert self._buffers is not None, "a stream forward pass must run inside buffers()"
        scratch = self._buffers[0]
        start = 0
        for slot in self.by_module[id(module)]:
            view = scratch[start : start + slot.numel]
            self.fill(slot, view)
            module.__dict__[slot.attr] = view.view(slot.shape)
            start += slot.numel

    @contextmanager
    def attached(self, detach_parameters: bool) -> Iterator[None]:
        """Hooks installed; with ``detach_parameters`` the parameters are set aside and restored.

        The parameters' order in each module is preserved (``named_parameters`` defines the
        KeptSpace order).
        """
        saved: list[tuple[nn.Module, dict[str, nn.Parameter | None]]] = []
        if detach_parameters:
            for module in self.modules.values():
                saved.append((module, dict(module._parameters)))
                for slot in self.by_module[id(module)]:
                    slot.param = module._parameters.pop(slot.attr)
        handles = [m.register_forward_pre_hook(self.hook) for m in self.modules.values()]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            for module, params in saved:
                for slot in self.by_module[id(module)]:
                    module.__dict__.pop(slot.attr, None)
                    slot.param = None
                module._parameters.clear()
                module._parameters.update(params)


def micro_batch_loss(
    forward: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    micro_batch: int = 0,
) -> float:
    """Mean cross-entropy of the batch, evaluated ``micro_batch`` examples at a time.

    ``micro_batch`` 0 (or >= the batch) is one forward pass and exactly
    :func:`~fedzo_flwr.zo.engines.base.batch_loss`. Otherwise the per-example losses of each
    micro-batch are summed in float64 and the total divided by the batch size: the same mean,
    up to the float32 rounding of the logits, which may differ by a few ulps between batch
    sizes (the convolution kernels block differently). Measured: within ``1e-6`` relative
    (``tests/test_stream_engine.py``), far below the loss differences (``~σ|∇L·u|``).
    """
    batch = x.shape[0]
    if micro_batch <= 0 or micro_batch >= batch:
        return float(batch_loss(forward(x), y))
    total = torch.zeros((), dtype=torch.float64)
    for start in range(0, batch, micro_batch):
        logits = forward(x[start : start + micro_batch])
        per_example = F.cross_entropy(logits, y[start : start + micro_batch], reduction="none")
        total += per_example.to(torch.float64).sum()
    return float(total) / batch


def stream_loss_differences(
    forward: Callable[[torch.Tensor], torch.Tensor],
    streamer: _Streamer,
    x: torch.Tensor,
    y: torch.Tensor,
    generator: DirectionGenerator,
    settings: ZOSettings,
    micro_batch: int = 0,
) -> LossDifferences:
    """The K loss differences of one step through ``streamer``'s hooks.

    Every forward pass (base, ``+σu_k`` and, for central differences, ``-σu_k``) runs the
    batch in micro-batches of ``micro_batch`` examples (0: whole batch;
    :func:`micro_batch_loss`).
    """
    deltas = np.empty(settings.k, dtype=np.float64)
    sigma = settings.sigma
    with streamer.buffers():
        streamer.perturb(None)
        base = micro_batch_loss(forward, x, y, micro_batch)
        try:
            for k in range(settings.k):
                reference = base
                if settings.scheme == "central":
                    streamer.perturb(generator, k, -sigma)
                    reference = micro_batch_loss(forward, x, y, micro_batch)
                streamer.perturb(generator, k, sigma)
                deltas[k] = micro_batch_loss(forward, x, y, micro_batch) - reference
        finally:
            streamer.perturb(None)
    return LossDifferences(deltas.astype(np.float32), base, settings.forward_passes)


def stream_workspace_bytes(model: nn.Module, space: KeptSpace, packed: bool) -> int:
    """Bytes of the buffers a stream step allocates (scratch, block, kept values, bitmap piece).

    ``packed``: the model is a :class:`~.stream_model.StreamModel` (unpacks bitmaps); else a
    plain model.
    """
    slots = _slots(model, space, None if packed else space.indices)
    if packed:
        for slot, idx in zip(slots, space.indices, strict=True):
            if idx is not None:
                slot.bitmap = torch.empty(0, dtype=torch.uint8)
    scratch, block, values, bits = _Streamer(slots, None if not packed else torch.empty(0)).sizes()
    return 4 * (scratch + block + values) + bits
