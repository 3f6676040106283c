"""Analytic memory of one client step: backprop (FedAvg) against zeroth-order (lean, stream).

The breakdown counts the tensors each kind of step must hold, in bytes, for the model as this
project stores it (dense float32 tensors with zeros at pruned entries, a ``torch.bool`` mask):

=================  ==============================================  ==========================
item               backprop (local SGD step)                       zeroth-order (``lean``)
=================  ==============================================  ==========================
weights            all parameters, 4 B each                        the same
mask               1 B per prunable weight (if pruned)             the same
batch              the float32 input batch                         the same
activations        every tensor autograd saves for backward        the largest input+output
                   (measured with ``saved_tensors_hooks``)         of one layer (one forward
                                                                   pass, nothing kept)
gradients          one float32 ``.grad`` per parameter             none
optimizer state    SGD 0, momentum 4 B, Adam 8 B per parameter     none (the server steps)
perturbation       none                                            saved kept values + one
                                                                   direction (4 B per kept
                                                                   coordinate each) + int64
                                                                   index tables of masked
                                                                   tensors (8 B per kept
                                                                   weight)
=================  ==============================================  ==========================

``step_bytes`` (what one step adds on top of an idle client that already holds the weights,
mask and batch) is the **peak** of those items, not their sum, because some never coexist
(``overlap`` is subtracted):

* backprop: the saved activations are freed during the backward pass, before the optimizer
  step allocates its state, so the peak is ``gradients + max(activations, optimizer state)``;
* zeroth-order ``lean``: each direction is freed before the perturbed forward pass, so the peak
  is ``saved kept values + index tables + max(direction, activations)``.

The ``stream`` engine (:func:`stream_breakdown`) holds the model sparse at rest
(:class:`~fedzo_flwr.zo.engines.stream.StreamModel`), so its items differ:

* weights: the kept coordinates only (4 B each) and any frozen parameters;
* mask: a packed bitmap, 1 bit per weight of each partly pruned tensor;
* activations: the largest input+output of one layer for one **micro-batch**;
* perturbation: the scratch buffer of the largest layer (4 B per weight, dense), one direction
  block and one layer's perturbed kept values (4 B per kept weight of the largest tensor each)
  and the unpacked bitmap of the largest pruned tensor (1 B per weight). Nothing grows with K
  or with the number of kept weights beyond the largest layer.

The benchmark ``benchmarks/client_memory.py`` measures the same quantity (peak RSS above the
idle baseline) in an isolated process; it also includes the framework's workspace
(convolution buffers, allocator slack), which this breakdown leaves out. ``total_bytes`` adds
the weights, mask and batch: the model's share of a device's memory, without the Python/torch
runtime (which no method avoids).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from fedzo_flwr.sparse.mask import Mask, kept_count
from fedzo_flwr.sparse.space import KeptSpace

__all__ = [
    "MemoryBreakdown",
    "activation_bytes",
    "backprop_breakdown",
    "stream_breakdown",
    "zo_breakdown",
]

OPTIMIZER_STATE_FLOATS = {"sgd": 0, "momentum": 1, "adam": 2}


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes of each item of one client step (see the module docstring)."""

    kind: str
    weights: int
    mask: int
    batch: int
    activations: int
    gradients: int
    optimizer_state: int
    perturbation: int
    overlap: int = 0

    @property
    def step_bytes(self) -> int:
        """Peak the step adds to an idle client holding the weights, mask and batch."""
        return (
            self.activations
            + self.gradients
            + self.optimizer_state
            + self.perturbation
            - self.overlap
        )

    @property
    def total_bytes(self) -> int:
        """Everything the step needs: weights, mask and batch included (no runtime)."""
        return self.weights + self.mask + self.batch + self.step_bytes

    def as_dict(self) -> dict[str, int | str]:
        """Plain dict with the two totals."""
        return {**asdict(self), "step_bytes": self.step_bytes, "total_bytes": self.total_bytes}


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def activation_bytes(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """``(saved_for_backward, one_forward_peak)`` activation bytes of ``model`` on ``x``.

    ``saved_for_backward``: distinct tensors autograd saves in a forward pass with gradients
    enabled (parameters and the input batch excluded: they are counted as weights and batch).
    ``one_forward_peak``: the largest ``input + output`` of one leaf module in a no-grad forward
    pass, i.e. what a forward-only pass must hold at once (the logits included, the input
    batch not: it is counted as the batch).
    """
    params = {p.data_ptr() for p in model.parameters()}
    seen: dict[tuple[int, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and ptr != x.untyped_storage().data_ptr():
            seen[(ptr, t.untyped_storage().nbytes())] = t.untyped_storage().nbytes()
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    saved = sum(seen.values())
    del out
    peak = 0

    def hook(module: nn.Module, args: tuple[object, ...], output: object) -> None:
        nonlocal peak
        inputs = sum(_nbytes(a) for a in args if isinstance(a, torch.Tensor) and a is not x)
        outputs = _nbytes(output) if isinstance(output, torch.Tensor) else 0
        peak = max(peak, inputs + outputs)

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return saved, peak


def _weights_and_mask(model: nn.Module, mask: Mask | None) -> tuple[int, int, int]:
    weights = sum(_nbytes(p) for p in model.parameters())
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    pruned = mask is not None and kept_count(mask) < sum(m.numel() for m in mask.values())
    mask_bytes = sum(m.numel() for m in mask.values()) if pruned and mask is not None else 0
    return weights, mask_bytes, params


def backprop_breakdown(
    model: nn.Module, mask: Mask | None, x: torch.Tensor, optimizer: str = "sgd"
) -> MemoryBreakdown:
    """Analytic memory of one local backprop step (forward, backward, optimizer step).

    Gradients and optimizer state are dense (one float per parameter), as in PyTorch: masking
    the gradients does not shrink them.
    """
    weights, mask_bytes, params = _weights_and_mask(model, mask)
    saved, _ = activation_bytes(model, x)
    state = 4 * params * OPTIMIZER_STATE_FLOATS[optimizer]
    return MemoryBreakdown(
        kind=f"backprop ({optimizer})",
        weights=weights,
        mask=mask_bytes,
        batch=_nbytes(x),
        activations=saved,
        gradients=4 * params,
        optimizer_state=state,
        perturbation=0,
        overlap=min(saved, state),  # activations are freed before the state exists
    )


def zo_breakdown(model: nn.Module, mask: Mask | None, x: torch.Tensor) -> MemoryBreakdown:
    """Analytic memory of one zeroth-order step with the ``lean`` engine (any K)."""
    weights, mask_bytes, _ = _weights_and_mask(model, mask)
    _, peak = activation_bytes(model, x)
    space = KeptSpace(model, mask)
    index_bytes = sum(8 * int(idx.numel()) for idx in space.indices if idx is not None)
    direction = 4 * space.dim
    return MemoryBreakdown(
        kind="zeroth-order (lean)",
        weights=weights,
        mask=mask_bytes,
        batch=_nbytes(x),
        activations=peak,
        gradients=0,
        optimizer_state=0,
        perturbation=4 * space.dim + direction + index_bytes,
        overlap=min(direction, peak),  # each direction is freed before its forward pass
    )


def stream_breakdown(
    model: nn.Module, mask: Mask | None, x: torch.Tensor, micro_batch: int = 0
) -> MemoryBreakdown:
    """Analytic memory of one zeroth-order step with the ``stream`` engine (any K).

    ``model`` is the dense masked model the :class:`~fedzo_flwr.zo.engines.stream.StreamModel`
    is built from (only its shapes and the mask are read); ``micro_batch`` examples per
    forward pass (0: the whole batch).
    """
    from fedzo_flwr.sparse.packed import bitmap_bytes
    from fedzo_flwr.zo.engines.stream import stream_workspace_bytes

    space = KeptSpace(model, mask)
    frozen = sum(_nbytes(p) for p in model.parameters() if not p.requires_grad)
    bitmaps = sum(bitmap_bytes(int(m.numel())) for m in (mask or {}).values() if not bool(m.all()))
    part = x if micro_batch <= 0 else x[:micro_batch]
    _, peak = activation_bytes(model, part)
    return MemoryBreakdown(
        kind="zeroth-order (stream)",
        weights=4 * space.dim + frozen,
        mask=bitmaps,
        batch=_nbytes(x),
        activations=peak,
        gradients=0,
        optimizer_state=0,
        perturbation=stream_workspace_bytes(model, space, packed=True),
    )
