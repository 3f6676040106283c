"""Forward and backward FLOPs of a (masked) model, counted with ``torch.utils.flop_counter``.

Counting conventions (those of :class:`torch.utils.flop_counter.FlopCounterMode`):

* Only matrix products and convolutions are counted (``aten.convolution``, ``aten.mm``,
  ``aten.addmm``, ``aten.bmm``, their backward formulas, attention kernels). Normalisation,
  activations, pooling, residual adds, padding, the loss and optimizer updates count **zero**.
* One multiply-accumulate (MAC) = 2 FLOPs. The bias of ``addmm`` (``nn.Linear``) and of a
  convolution is **not** counted, so a layer's count does not depend on whether it has a bias.
* A convolution counts ``2 * N * H_out * W_out * numel(weight)``: every weight meets every
  output position, including positions where it multiplies zero padding.

Sparsity: a Conv2d/Linear weight with a fraction ``d`` of its entries kept costs exactly ``d``
times its dense count. Every weight entry takes part in the same number of MACs (``N`` for a
linear layer, ``N * H_out * W_out`` for a convolution, padded positions included as above), so
removing entries removes MACs in proportion; with no padding this is also the number of MACs with
real inputs, with padding the dense-convention count is an upper bound on it. The tests check the
claim by brute force. Each Conv2d/Linear layer's FLOPs are measured by re-running it alone (on
the input shape it saw in the model, with a gradient to that input only if it had one) and
scaled by its weight density; FLOPs outside those layers are left unscaled. (FlopCounterMode's
own per-module attribution is not used: in the backward pass it counts some FLOPs twice when a
tensor feeds two modules, e.g. ResNet-18's ``conv1`` and ``downsample`` convolutions.)

The model is run on the ``meta`` device (shapes only, no arithmetic) through
:func:`torch.func.functional_call`, so counting is cheap at any batch size and leaves the model
untouched; a model that cannot run on ``meta`` is run on its own device with zero inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn
from torch.func import functional_call
from torch.utils.flop_counter import FlopCounterMode

from fedzo_flwr.sparse.mask import Mask, dense_mask, prunable_parameters, validate_mask
from fedzo_flwr.zo.settings import step_forward_passes

__all__ = [
    "FlopReport",
    "backprop_step_flops",
    "forward_backward_flops",
    "forward_flops",
    "zo_step_flops",
]

DEFAULT_INPUT_SHAPE: tuple[int, ...] = (3, 32, 32)
ZoScheme = Literal["forward", "central"]


@dataclass(frozen=True)
class FlopReport:
    """FLOPs of one pass of a model, dense and under a mask.

    Attributes
    ----------
    dense : int
        ``FlopCounterMode`` total for the dense model.
    sparse : int
        The same with every prunable layer scaled by its kept fraction.
    per_layer : dict of str to (int, int)
        For each prunable weight (keyed by its parameter name, as in the mask), the
        ``(dense, sparse)`` FLOPs of its module. ``sum`` of the dense entries is ``dense`` minus
        the FLOPs counted outside Conv2d/Linear modules (zero for our models).

    """

    dense: int
    sparse: int
    per_layer: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        """``sparse / dense`` (1.0 for a model with no counted FLOPs)."""
        return self.sparse / self.dense if self.dense else 1.0


def _check_positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a positive int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _check_input_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    if not isinstance(input_shape, Sequence) or isinstance(input_shape, str):
        raise TypeError(f"input_shape must be a sequence of ints, got {type(input_shape).__name__}")
    return tuple(_check_positive_int(s, "input_shape entries") for s in input_shape)


def _tensors(out: object) -> list[torch.Tensor]:
    """Tensors in a (possibly nested) model output."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _tensors(o)]
    return []


_Call = tuple[tuple[int, ...], torch.dtype, bool]  # input shape, dtype, requires_grad


def _run(
    module: nn.Module,
    x: torch.Tensor,
    backward: bool,
    meta: bool,
    watch: dict[nn.Module, list[_Call]] | None = None,
) -> int:
    """FLOPs ``FlopCounterMode`` counts for ``module(x)`` (and optionally its backward pass).

    With ``meta`` the parameters are replaced by ``meta`` tensors of the same shapes (``x``
    must then be on ``meta`` too). Gradients are taken with respect to every trainable
    parameter, and to ``x`` if it requires grad, without touching any ``.grad``. The input of
    every call of a module in ``watch`` is recorded there.
    """
    state: dict[str, torch.Tensor] = {}
    for name, p in module.named_parameters():
        state[name] = (
            torch.empty_like(p, device="meta").requires_grad_(p.requires_grad) if meta else p
        )
    if meta:
        for name, b in module.named_buffers():
            state[name] = torch.empty_like(b, device="meta")

    def record(
        mod: nn.Module, args: tuple[object, ...], kwargs: dict[str, object], out: object
    ) -> None:
        inp = args[0] if args else kwargs.get("input")
        if watch is not None and isinstance(inp, torch.Tensor):
            watch[mod].append((tuple(inp.shape), inp.dtype, inp.requires_grad))

    handles = [m.register_forward_hook(record, with_kwargs=True) for m in watch or {}]
    counter = FlopCounterMode(display=False)
    try:
        with torch.enable_grad() if backward else torch.no_grad(), counter:
            # A view, so that the module sees a non-leaf input: FlopCounterMode's module tracker
            # hooks the input's gradient, which autograd.grad refuses on a leaf.
            out = functional_call(module, state, (x.view_as(x),))
            if backward:
                wrt = [t for t in state.values() if t.requires_grad]
                wrt += [x] if x.requires_grad else []
                outs = [o.sum() for o in _tensors(out) if o.requires_grad]
                if not wrt or not outs:
                    raise ValueError("model output does not depend on any trainable parameter")
                torch.autograd.grad(torch.stack(outs).sum(), wrt, allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    return counter.get_total_flops()


def _count_on(
    model: nn.Module, shape: tuple[int, ...], backward: bool, meta: bool
) -> tuple[int, dict[nn.Module, int]]:
    """Total FLOPs of the model and FLOPs of each prunable module (summed over its calls)."""
    first = next(model.parameters(), None)
    dtype = first.dtype if first is not None else torch.float32
    device = torch.device("meta") if meta else (first.device if first is not None else None)
    prunable = {id(p) for _, p in prunable_parameters(model)}
    watch: dict[nn.Module, list[_Call]] = {
        m: []
        for m in model.modules()
        if isinstance(m, (nn.Conv2d, nn.Linear)) and id(m.weight) in prunable
    }
    total = _run(model, torch.zeros(shape, dtype=dtype, device=device), backward, meta, watch)
    # Each layer is re-counted alone on the input it saw (shape, dtype, whether it needed a
    # gradient): FlopCounterMode's own module attribution is exact in the forward pass but not
    # in the backward pass when a tensor feeds several modules (e.g. a ResNet block input that
    # feeds both conv1 and the downsample conv), where it counts some FLOPs twice.
    per_module = {}
    for mod, calls in watch.items():
        per_module[mod] = sum(
            _run(
                mod,
                torch.zeros(s, dtype=dt, device=device).requires_grad_(req and backward),
                backward,
                meta,
            )
            for s, dt, req in calls
        )
    return total, per_module


def _count(
    model: nn.Module,
    mask: Mask | None,
    input_shape: Sequence[int],
    batch_size: int,
    backward: bool,
) -> FlopReport:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    mask = dense_mask(model) if mask is None else validate_mask(model, mask)
    shape = (_check_positive_int(batch_size, "batch_size"), *_check_input_shape(input_shape))
    try:
        total, per_module = _count_on(model, shape, backward, meta=True)
    except (NotImplementedError, RuntimeError):
        total, per_module = _count_on(model, shape, backward, meta=False)

    weight_names = {id(p): n for n, p in prunable_parameters(model)}
    layer_dense = dict.fromkeys(mask, 0)
    for mod, flops in per_module.items():
        layer_dense[weight_names[id(mod.weight)]] += flops
    if sum(layer_dense.values()) > total:  # cannot happen unless a formula is not additive
        raise RuntimeError(
            f"per-layer FLOPs {sum(layer_dense.values())} exceed the model's total {total}"
        )

    per_layer: dict[str, tuple[int, int]] = {}
    removed = 0
    for name, flops in layer_dense.items():
        m = mask[name]
        kept, n = int(m.sum()), m.numel()
        # Exact for conv/linear (their count is a multiple of numel); rounds half up otherwise.
        sparse = (2 * flops * kept + n) // (2 * n)
        per_layer[name] = (flops, sparse)
        removed += flops - sparse
    return FlopReport(dense=total, sparse=total - removed, per_layer=per_layer)


def forward_flops(
    model: nn.Module,
    mask: Mask | None = None,
    input_shape: Sequence[int] = DEFAULT_INPUT_SHAPE,
    batch_size: int = 1,
) -> FlopReport:
    """FLOPs of one forward pass of ``model`` on a batch, dense and under ``mask``.

    Parameters
    ----------
    model : nn.Module
        The model (not modified; it is run on the ``meta`` device).
    mask : Mask or None
        Prunable-weight mask; ``None`` means dense (``sparse == dense``).
    input_shape : sequence of int
        Shape of one input sample, ``(3, 32, 32)`` by default.
    batch_size : int
        Samples per forward pass.

    Returns
    -------
    FlopReport
        ``dense`` and ``sparse`` totals and the per-layer split. Only convolutions and matrix
        products are counted (see the module docstring); LeNet-5 at batch 1 gives 1,303,440.

    """
    return _count(model, mask, input_shape, batch_size, backward=False)


def forward_backward_flops(
    model: nn.Module,
    mask: Mask | None = None,
    input_shape: Sequence[int] = DEFAULT_INPUT_SHAPE,
    batch_size: int = 1,
) -> FlopReport:
    """FLOPs of a forward plus a backward pass to every trainable parameter, measured.

    The backward pass is counted by ``FlopCounterMode`` as it runs (gradients of the sum of the
    outputs with respect to all trainable parameters), not assumed to be twice the forward: a
    layer costs about 2x its forward FLOPs (input gradient + weight gradient), except a layer
    whose input needs no gradient (the first layer, fed by the data), which only computes its
    weight gradient (1x). Under ``mask`` each prunable layer's forward *and* backward FLOPs are
    scaled by its kept fraction, which assumes the input gradient uses the sparse weight and
    only kept weight gradients are computed. The loss and the optimizer update are not counted.
    """
    return _count(model, mask, input_shape, batch_size, backward=True)


def backprop_step_flops(
    model: nn.Module,
    mask: Mask | None,
    batch_size: int,
    input_shape: Sequence[int] = DEFAULT_INPUT_SHAPE,
) -> int:
    """Sparse FLOPs of one first-order client step: forward + backward on one batch.

    See :func:`forward_backward_flops` for what is counted; about 2.46x the forward FLOPs for
    LeNet-5 and about 3x for deep networks.
    """
    return forward_backward_flops(model, mask, input_shape, batch_size).sparse


def zo_step_flops(
    model: nn.Module,
    mask: Mask | None,
    batch_size: int,
    k: int,
    scheme: ZoScheme,
    input_shape: Sequence[int] = DEFAULT_INPUT_SHAPE,
) -> int:
    """Sparse forward FLOPs of one zeroth-order client step with ``k`` directions.

    ``"forward"`` differences evaluate the loss at the current point and at ``k`` perturbed
    points (``k + 1`` forward passes); ``"central"`` differences evaluate ``x +/- mu u_i``
    and the current point for the logged base loss (``2 k + 1`` passes): the passes every
    engine runs (:func:`~fedzo_flwr.zo.settings.step_forward_passes`). Each pass is a forward
    of the masked model on ``batch_size`` samples; drawing directions and applying
    perturbations/updates (element-wise work) is not counted.

    Raises
    ------
    ValueError
        If ``scheme`` is not ``"forward"`` or ``"central"``, or ``k`` is not positive.

    """
    k = _check_positive_int(k, "k")
    if scheme not in ("forward", "central"):
        raise ValueError(f"scheme must be 'forward' or 'central', got {scheme!r}")
    passes = step_forward_passes(k, scheme)
    return passes * forward_flops(model, mask, input_shape, batch_size).sparse
