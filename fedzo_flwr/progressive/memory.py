"""Analytic memory of progressive block training, per stage and for full-model backprop.

Each figure is what one local SGD-with-momentum step needs, in bytes, for float32 tensors:

=================  ============================================================================
item               counted as
=================  ============================================================================
weights            every parameter of the ordinary model (the whole model is loaded) plus the
                   stage's output module
batch              the float32 input batch
gradients          one ``.grad`` per trainable parameter (the stage's, or all for backprop)
optimizer state    one momentum buffer per trainable parameter
saved tensors      every distinct storage autograd saves for backward in a real forward pass
                   of the stage at the batch size (``torch.autograd.graph.saved_tensors_hooks``;
                   parameters and the input batch excluded, they are counted above)
transient          the largest output of one leaf module in that forward pass (the frozen
                   prefix included: a forward-only layer still materialises its output)
=================  ============================================================================

``total_bytes`` is their **sum**: the momentum buffers persist from one local step to the next,
so they coexist with the saved tensors of the next step's forward pass, and the gradients are
alive at the optimizer step; the sum is therefore the need of a steady-state step (an upper
bound on the peak that ignores allocator slack and convolution workspaces, which the isolated
process benchmarks measure). Full-model backprop is counted by the same method on the ordinary
model. :func:`memory_plan` adds the **peak** over stages (ProFL's / NeuLite's figure) and the
**time-weighted average** given the rounds of each stage (SmartFreeze's).

**Forward-only stages** (``zo-progressive``, :func:`forward_stage_memory`): a zeroth-order client
of stage ``t`` runs the frozen prefix once per batch, then K (+1) perturbed forward passes of
block ``t`` and its output module (the ``lean`` engine's floor, as
:func:`fedzo_flwr.measure.memory_model.zo_breakdown` counts it):

=================  ============================================================================
item               counted as
=================  ============================================================================
weights            every parameter of the ordinary model plus the stage's output module
mask               1 B per prunable weight of the model and of the stage's output module
                   (``torch.bool``; 0 when nothing is pruned)
batch              the float32 input batch
prefix             the largest ``input + output`` of one leaf layer of the frozen prefix in a
                   no-grad forward pass (the prefix runs once, before the perturbed passes)
features           the prefix's output, held through the K (+1) passes (0 at stage 0: the
                   batch itself)
activations        the largest ``input + output`` of one leaf layer of the active part in a
                   no-grad forward pass
perturbation       the saved kept values and one direction (4 B per coordinate of the stage's
                   KeptSpace each) and the int64 index tables of its partly pruned tensors
=================  ============================================================================

``total_bytes = weights + mask + batch + max(prefix, features + activations + perturbation -
overlap)``, ``overlap = min(direction, activations)`` (a direction is freed before its pass).
Nothing is saved for backward, there are no gradients and no optimizer state (the server steps).
The ``fused`` and ``batched`` engines evaluate several directions at once in a working set
bounded by ``engine-memory-mb``; that workspace is not in this count (the ``lean`` engine runs in
it), nor are the runtime and allocator slack.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from fedzo_flwr.measure.memory_model import activation_bytes
from fedzo_flwr.progressive.staged import OUTPUT_PREFIX, StagedModel
from fedzo_flwr.sparse.mask import Mask, kept_count, prunable_parameters
from fedzo_flwr.sparse.space import KeptSpace

__all__ = [
    "ForwardStageMemory",
    "MemoryPlan",
    "StageMemory",
    "forward_stage_memory",
    "full_backprop_memory",
    "memory_plan",
    "stage_memory",
]

_FLOAT = 4


@dataclass(frozen=True)
class StageMemory:
    """Bytes of each item of one local step (see the module docstring)."""

    label: str
    weights: int
    batch: int
    gradients: int
    optimizer_state: int
    saved: int
    transient: int

    @property
    def total_bytes(self) -> int:
        """Everything the step needs (sum of the items)."""
        return (
            self.weights
            + self.batch
            + self.gradients
            + self.optimizer_state
            + self.saved
            + self.transient
        )

    def as_dict(self) -> dict[str, int | str]:
        """Plain dict with the total."""
        return {**asdict(self), "total_bytes": self.total_bytes}


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _trace(
    forward: Callable[[torch.Tensor], torch.Tensor],
    modules: Sequence[nn.Module],
    params: Sequence[torch.Tensor],
    x: torch.Tensor,
) -> tuple[int, int]:
    """``(saved, transient)`` bytes of ``forward(x)`` with grad enabled (see module doc)."""
    excluded = {p.untyped_storage().data_ptr() for p in params}
    excluded.add(x.untyped_storage().data_ptr())
    seen: dict[int, int] = {}
    kept: list[torch.Tensor] = []  # keep every saved tensor alive: no storage address reuse

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in excluded:
            seen[storage.data_ptr()] = storage.nbytes()
            kept.append(t)
        return t

    transient = 0

    def hook(module: nn.Module, args: object, output: object) -> None:
        nonlocal transient
        if isinstance(output, torch.Tensor):
            transient = max(transient, _nbytes(output))

    leaves = {id(m): m for root in modules for m in root.modules() if not list(m.children())}
    handles = [m.register_forward_hook(hook) for m in leaves.values()]
    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = forward(x)
    finally:
        for handle in handles:
            handle.remove()
    del out
    kept.clear()
    return sum(seen.values()), transient


def _probe(batch_size: int) -> torch.Tensor:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch-size must be an int >= 1, got {batch_size!r}")
    return torch.zeros(batch_size, 3, 32, 32)


def stage_memory(staged: StagedModel, stage: int, batch_size: int) -> StageMemory:
    """Analytic memory of one local step of stage ``stage`` at ``batch_size``.

    The model's ``requires_grad`` flags are restored afterwards.
    """
    x = _probe(batch_size)
    flags = [(p, p.requires_grad) for p in staged.parameters()]
    try:
        trainable = list(staged.prepare_stage(stage).values())
        modules = [staged.model, *staged.output_modules]
        saved, transient = _trace(
            lambda inp: staged.forward_stage(inp, stage), modules, list(staged.parameters()), x
        )
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)
    train_floats = sum(p.numel() for p in trainable)
    weights = sum(_nbytes(p) for p in staged.model.parameters())
    if stage < staged.num_stages - 1:
        weights += sum(_nbytes(p) for p in staged.output_modules[stage].parameters())
    return StageMemory(
        label=f"stage {stage}",
        weights=weights,
        batch=_nbytes(x),
        gradients=_FLOAT * train_floats,
        optimizer_state=_FLOAT * train_floats,
        saved=saved,
        transient=transient,
    )


@dataclass(frozen=True)
class ForwardStageMemory:
    """Bytes of each item of one forward-only (zeroth-order) step of a stage (module docstring)."""

    label: str
    weights: int
    mask: int
    batch: int
    prefix: int
    features: int
    activations: int
    perturbation: int
    overlap: int

    @property
    def step_bytes(self) -> int:
        """What the step adds to a client holding the weights, mask and batch."""
        return max(self.prefix, self.features + self.activations + self.perturbation - self.overlap)

    @property
    def total_bytes(self) -> int:
        """Everything the step needs: weights, mask and batch included (no runtime)."""
        return self.weights + self.mask + self.batch + self.step_bytes

    def as_dict(self) -> dict[str, int | str]:
        """Plain dict with the two totals."""
        return {**asdict(self), "step_bytes": self.step_bytes, "total_bytes": self.total_bytes}


def _active_part(staged: StagedModel, stage: int) -> nn.Sequential:
    last = stage == staged.num_stages - 1
    return nn.Sequential(
        staged.blocks[stage], staged.head if last else staged.output_modules[stage]
    )


@torch.no_grad()
def forward_stage_memory(
    staged: StagedModel, stage: int, batch_size: int, mask: Mask | None = None
) -> ForwardStageMemory:
    """Analytic memory of one forward-only step of stage ``stage`` at ``batch_size``.

    Parameters
    ----------
    staged : StagedModel
        The staged model (only shapes are read; ``requires_grad`` flags are restored).
    stage : int
        The stage.
    batch_size : int
        Examples per step.
    mask : Mask, optional
        The staged mask (the model's prunable weights under their keys, the output modules'
        under ``output.<t>.<name>``; :func:`fedzo_flwr.progressive.zo.staged_mask`); ``None``
        is dense.
    """
    x = _probe(batch_size)
    flags = [(p, p.requires_grad) for p in staged.parameters()]
    try:
        trainable = staged.prepare_stage(stage)
        active = _active_part(staged, stage)
        by_id = {id(p): n for n, p in trainable.items()}
        active_mask: Mask = {}
        if mask is not None:
            for name, param in prunable_parameters(active):
                active_mask[name] = mask[by_id[id(param)]]
        space = KeptSpace(active, active_mask or None)
        prefix = nn.Sequential(*staged.blocks[:stage])
        prefix_peak = activation_bytes(prefix, x)[1] if stage > 0 else 0
        features = staged.features(x, stage)
        _, active_peak = activation_bytes(active, features)
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)
    weights = sum(_nbytes(p) for p in staged.model.parameters())
    held = [n for n, _ in prunable_parameters(staged.model)]
    if stage < staged.num_stages - 1:
        output = staged.output_modules[stage]
        weights += sum(_nbytes(p) for p in output.parameters())
        held += [f"{OUTPUT_PREFIX}{stage}.{n}" for n, _ in prunable_parameters(output)]
    mask_bytes = 0
    if mask is not None:
        held_mask = {n: mask[n] for n in held}
        if kept_count(held_mask) < sum(m.numel() for m in held_mask.values()):
            mask_bytes = sum(m.numel() for m in held_mask.values())
    index_bytes = sum(8 * int(idx.numel()) for idx in space.indices if idx is not None)
    direction = _FLOAT * space.dim
    return ForwardStageMemory(
        label=f"stage {stage}",
        weights=weights,
        mask=mask_bytes,
        batch=_nbytes(x),
        prefix=prefix_peak,
        features=_nbytes(features) if stage > 0 else 0,
        activations=active_peak,
        perturbation=_FLOAT * space.dim + direction + index_bytes,
        overlap=min(direction, active_peak),
    )


def full_backprop_memory(model: nn.Module, batch_size: int) -> StageMemory:
    """Analytic memory of one local step of ordinary backprop (all parameters trainable)."""
    x = _probe(batch_size)
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    try:
        for param in params:
            param.requires_grad_(True)
        saved, transient = _trace(model, [model], params, x)
    finally:
        for param, flag in zip(params, flags):
            param.requires_grad_(flag)
    floats = sum(p.numel() for p in params)
    return StageMemory(
        label="full backprop",
        weights=sum(_nbytes(p) for p in params),
        batch=_nbytes(x),
        gradients=_FLOAT * floats,
        optimizer_state=_FLOAT * floats,
        saved=saved,
        transient=transient,
    )


@dataclass(frozen=True)
class MemoryPlan:
    """Per-stage needs of one model at one batch size, against full backprop.

    Attributes
    ----------
    stages : tuple of StageMemory
        One per stage.
    full : StageMemory
        Full-model backprop.
    rounds : tuple of int
        Rounds of each stage (the weights of the time average).

    """

    stages: tuple[StageMemory, ...]
    full: StageMemory
    rounds: tuple[int, ...]

    @property
    def needs(self) -> tuple[int, ...]:
        """``total_bytes`` of each stage."""
        return tuple(s.total_bytes for s in self.stages)

    @property
    def peak_bytes(self) -> int:
        """Largest need over the stages."""
        return max(self.needs)

    @property
    def average_bytes(self) -> float:
        """Need averaged over rounds (stage ``t`` weighted by ``rounds[t]``)."""
        return sum(n * r for n, r in zip(self.needs, self.rounds)) / sum(self.rounds)

    def as_dict(self) -> dict[str, object]:
        """Plain dict: every stage, the full model, the peak and the average."""
        return {
            "stages": [s.as_dict() for s in self.stages],
            "full": self.full.as_dict(),
            "rounds": list(self.rounds),
            "peak_bytes": self.peak_bytes,
            "average_bytes": self.average_bytes,
            "peak_vs_full": self.peak_bytes / self.full.total_bytes,
            "average_vs_full": self.average_bytes / self.full.total_bytes,
        }


def memory_plan(
    staged: StagedModel, batch_size: int, rounds: Sequence[int] | None = None
) -> MemoryPlan:
    """Needs of every stage and of full backprop; ``rounds`` default to one per stage."""
    counts = tuple(rounds) if rounds is not None else (1,) * staged.num_stages
    if len(counts) != staged.num_stages:
        raise ValueError(f"rounds has {len(counts)} entries for {staged.num_stages} stages")
    if any(isinstance(r, bool) or not isinstance(r, int) or r < 0 for r in counts) or not any(
        counts
    ):
        raise ValueError(f"rounds must be ints >= 0, not all 0, got {counts!r}")
    stages = tuple(stage_memory(staged, t, batch_size) for t in range(staged.num_stages))
    return MemoryPlan(stages, full_backprop_memory(staged.model, batch_size), counts)
