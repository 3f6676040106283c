"""A model held sparse at rest (:class:`StreamModel`) and the ``stream`` engine's entry point.

A :class:`StreamModel` keeps a model's kept coordinates as one flat float32 vector in
KeptSpace order (what the wire carries) and each partly pruned tensor's mask as a packed bitmap
(1 bit per weight, the wire's bit order); no dense weight tensor, no ``torch.bool`` mask and no
index table exists between steps. Its layers are materialised one at a time by the hooks of
:mod:`fedzo_flwr.zo.engines.stream`. Two ways to build one:

* from a masked model and its KeptSpace (tests, benchmarks): the model's values are gathered,
  then its parameters removed;
* from the model's structure alone, e.g. on the ``meta`` device (no storage), and a
  :class:`~fedzo_flwr.sparse.layout.PackedLayout` read from the mask message: what a ``stream``
  ClientApp does (:func:`fedzo_flwr.zo.client.stream_model`), so the dense model is never built.

Local SGD between a client's local steps updates :attr:`StreamModel.values` in place
(:meth:`StreamModel.sgd_step_`), bit-identical to the dense engines'
:func:`~fedzo_flwr.zo.reconstruct.local_sgd_step` and to the server's replay.
"""

from __future__ import annotations

import torch
from torch import nn

from fedzo_flwr.sparse.layout import PackedLayout
from fedzo_flwr.sparse.space import KeptSpace
from fedzo_flwr.zo.directions import DirectionGenerator
from fedzo_flwr.zo.engines.base import LossDifferences
from fedzo_flwr.zo.engines.fused.stacked import UnsupportedModel
from fedzo_flwr.zo.engines.stream import _slots, _Streamer, stream_loss_differences
from fedzo_flwr.zo.reconstruct import local_sgd_step_
from fedzo_flwr.zo.settings import ZOSettings

__all__ = ["StreamModel", "stream_engine"]


class StreamModel(nn.Module):
    """A model held sparse at rest: the kept coordinates and packed bitmaps, no dense weights.

    It **takes the model over**: every perturbed parameter is removed from it (only frozen
    parameters and buffers stay), its kept coordinates are kept as one flat float32 vector in
    KeptSpace order (:attr:`values`) and the mask of each partly pruned tensor as a packed bitmap
    (:attr:`layout`). Calling it runs sparse inference; :meth:`loss_differences` a stream step.
    Both materialise one layer at a time into a scratch buffer that exists only during the call.

    Parameters
    ----------
    model : nn.Module
        The masked model (its pruned weights 0), or only its structure (``meta`` tensors) when
        ``layout`` is a PackedLayout; emptied of its perturbed parameters.
    layout : KeptSpace or PackedLayout
        Its coordinates. A KeptSpace is not referenced afterwards (the client can drop it and
        its bool mask); a PackedLayout is kept (its bitmaps are the model's masks).
    values : Tensor, optional
        The kept coordinates, ``(dim,)`` float32, adopted as they are. Default: gathered from
        ``model`` (KeptSpace) or zeros (PackedLayout: load the weights with
        :meth:`load_values_`).

    Raises
    ------
    UnsupportedModel
        If a perturbed parameter is not owned by one layer of
        :data:`~fedzo_flwr.zo.engines.stream.STREAM_LAYERS`, or a tensor the model keeps (a
        frozen parameter, a buffer) has no storage (``meta``).
    ValueError
        If ``values`` does not have the layout's shape.
    """

    values: torch.Tensor

    def __init__(
        self,
        model: nn.Module,
        layout: KeptSpace | PackedLayout,
        values: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        slots = _slots(model, layout)
        packed = PackedLayout.from_space(layout) if isinstance(layout, KeptSpace) else layout
        taken = {id(getattr(s.module, s.attr)) for s in slots}
        kept = [t for t in model.parameters() if id(t) not in taken] + list(model.buffers())
        if any(t.is_meta for t in kept):
            raise UnsupportedModel("the model keeps tensors outside its kept space without storage")
        if values is None:
            if isinstance(layout, KeptSpace):
                values = layout.gather(model)
            else:
                values = torch.zeros(packed.dim, dtype=torch.float32)
        if values.shape != (packed.dim,) or values.dtype != torch.float32:
            raise ValueError(
                f"values must be float32 of shape ({packed.dim},), got "
                f"{values.dtype} {tuple(values.shape)}"
            )
        for slot, bitmap in zip(slots, packed.bitmaps, strict=True):
            slot.bitmap = bitmap
            slot.index = None
            del slot.module._parameters[slot.attr]
            slot.module.__dict__[slot.attr] = None  # set by the hook during a forward pass
        self.module = model
        self.layout = packed
        self.sizes: tuple[int, ...] = packed.sizes
        self.names: tuple[str, ...] = packed.names
        self.register_buffer("values", values)
        self._streamer = _Streamer(slots, values)
        for m in self._streamer.modules.values():
            m.register_forward_pre_hook(self._streamer.hook)

    @property
    def dim(self) -> int:
        """Number of kept coordinates."""
        return sum(self.sizes)

    def at_rest_bytes(self) -> dict[str, int]:
        """Bytes held between steps: kept values, bitmaps, and frozen parameters and buffers."""
        others = sum(t.numel() * t.element_size() for t in self.module.parameters())
        others += sum(
            t.numel() * t.element_size() for n, t in self.named_buffers() if n != "values"
        )
        return {"values": 4 * self.dim, "bitmaps": self.layout.bitmap_nbytes(), "other": others}

    @torch.no_grad()
    def load_values_(self, values: torch.Tensor) -> None:
        """Take new kept coordinates (a round's global weights, ``(dim,)`` float32)."""
        if values.shape != (self.dim,):
            raise ValueError(f"values must have shape ({self.dim},), got {tuple(values.shape)}")
        self.values.copy_(values)

    @torch.no_grad()
    def sgd_step_(self, grad: torch.Tensor, lr: float) -> None:
        """``values ← values - lr · grad`` in place: the client's local step between local steps.

        Bit-identical to :func:`~fedzo_flwr.zo.reconstruct.local_sgd_step` (the dense clients'
        step and the server's replay).
        """
        if grad.shape != (self.dim,):
            raise ValueError(f"grad must have shape ({self.dim},), got {tuple(grad.shape)}")
        local_sgd_step_(self.values, grad, lr)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Sparse inference: the model's output under the stored weights."""
        with self._streamer.buffers():
            out: torch.Tensor = self.module(x)
        return out

    def loss_differences(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        generator: DirectionGenerator,
        settings: ZOSettings,
        micro_batch: int = 0,
    ) -> LossDifferences:
        """One stream step (see :func:`~fedzo_flwr.zo.engines.stream.stream_loss_differences`)."""
        if generator.sizes != self.sizes:
            raise ValueError("the generator's layout is not this model's (use model.sizes)")
        with torch.no_grad():
            return stream_loss_differences(
                self.module, self._streamer, x, y, generator, settings, micro_batch
            )


@torch.no_grad()
def stream_engine(
    model: nn.Module,
    space: KeptSpace,
    x: torch.Tensor,
    y: torch.Tensor,
    generator: DirectionGenerator,
    settings: ZOSettings,
    *,
    chunk_size: int | None = None,
    memory_budget_mb: float | None = None,
    micro_batch: int = 0,
) -> LossDifferences:
    """The K loss differences, one layer's weights at a time (``chunk_size``, budget: unused).

    ``model`` is a plain model (its parameters are read, never written) or a
    :class:`StreamModel`. ``micro_batch`` examples per forward pass (0: the whole batch).
    """
    del chunk_size, memory_budget_mb  # one direction, one layer at a time: nothing to size
    if isinstance(model, StreamModel):
        if tuple(space.sizes) != model.sizes:
            raise ValueError("space does not match the StreamModel's layout")
        return model.loss_differences(x, y, generator, settings, micro_batch)
    streamer = _Streamer(_slots(model, space, space.indices))
    with streamer.attached(detach_parameters=True):
        return stream_loss_differences(model, streamer, x, y, generator, settings, micro_batch)
