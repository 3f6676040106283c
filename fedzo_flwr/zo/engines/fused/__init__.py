"""The ``fused`` engine: many perturbed forward passes as one direction-batched forward.

A zeroth-order client step evaluates the same mini-batch under ``R`` perturbed copies of the
weights (``R = K`` forward differences, ``2K`` central). Done one copy at a time this is ``R``
small forward passes, each too small to keep a CPU busy (LeNet-5 at batch 32: ~11 GFLOP/s). This
engine evaluates a chunk of ``r`` copies at once by rewriting the model's forward pass so that
every layer works on all ``r`` copies in one large kernel:

* **The first layer sees the same input for every copy.** Its ``r`` weight copies are stacked
  along the output channels, so ``conv(x, W_1) ... conv(x, W_r)`` is *one* wide convolution with
  ``r * out_channels`` filters (for a linear layer, one matrix product). Activations then live in
  the **folded** layout ``(B, r * C, H, W)`` (copy ``j`` owns channels ``j*C .. (j+1)*C - 1``),
  stored channels-last.
* **Later convolutions** take a different input *and* different weights for each copy: in the
  folded layout that is exactly a grouped convolution with ``groups = r * groups`` and the ``r``
  weight copies stacked along the output channels — one oneDNN call for the whole chunk.
* **GroupNorm / BatchNorm (eval)** become one normalisation with ``r * groups`` groups and the
  stacked affine terms; **pooling and activations** act per channel or per element, so they run
  unchanged on the folded tensor.
* **Linear layers** on per-copy inputs are one batched matrix product (``baddbmm``) over the
  **leading** layout ``(r, B, features)``; flattening moves from folded to leading.

Which layer does what is read from the model's structure, never from its name: the model is
traced once with :mod:`torch.fx` and every node is translated by the rules above (see
:data:`SUPPORTED_MODULES` and :data:`SUPPORTED_FUNCTIONS`). A model that uses anything else
(a module, function or layout the rules do not cover) raises :class:`UnsupportedModel` when its
plan is built, and :func:`~fedzo_flwr.zo.estimator.loss_differences` falls back to the ``lean``
engine with a warning. The failure is remembered per model kind
(:func:`~fedzo_flwr.zo.engines.fused.engine.model_kind`: class, parameter and buffer shapes,
modes, input shape): later steps, and new model objects of the same kind, fall back at once,
without a new trace or a new warning. Each plan is also **verified** before first use: two
weight copies (the current weights and a random perturbation of the kept coordinates) are run
through the translated forward on one example and compared with the ordinary forward pass under
those weights (:func:`torch.func.functional_call`); a mismatch means the translation is wrong
for this model and triggers the same fallback.

Two more rewrites keep the memory-bound work small: a monotone activation (ReLU, ReLU6, ...)
followed by a max-pool is applied after the pool (same numbers, a quarter of the values), and
non-overlapping max-pools are an elementwise maximum of strided views.

The weights of a chunk live in one preallocated ``(r, numel)`` block per parameter, reused by
every chunk of a step. A partly pruned parameter's block holds its current values (pruned
entries 0) and only its kept columns are overwritten, with ``w + s σ u_k`` computed for the kept
coordinates only (``u_k`` is the direction over the KeptSpace, never expanded to the dense
shape). Pruned weights are therefore exactly 0 in every forward pass, the model itself is never
modified, and the perturbed weights are bit-identical to those of the ``lean`` engine (the same
``torch.add(w, u, alpha=s σ)``). Directions come from
:meth:`~fedzo_flwr.zo.directions.DirectionGenerator.block`, one chunk at a time.

**Threads.** This engine never changes torch's thread settings; the caller (the ClientApp,
``client-threads``) owns them. By default one worker evaluates the chunks one after another on
the caller's intra-op threads. With ``workers=n`` > 1, ``n`` worker threads take chunks from a
shared queue (:func:`~fedzo_flwr.zo.engines.fused.schedule.run_chunks`); each runs its kernels
on the intra-op threads torch gives a new thread, so ``n`` single-threaded workers are
``torch.set_num_threads(1)`` plus ``workers=n``: every kernel of a chunk is large enough for
one core, independent workers need no barrier per kernel, and a worker that loses its core to
another process simply takes fewer chunks. The ``K`` directions are cut into chunks of equal
size (±1) whose number is a multiple of ``n`` (:func:`balanced_chunks`), so no worker waits on
a last, lone chunk. Which worker evaluates a chunk does not change its numbers: the result is
deterministic.

**Memory.** A chunk of ``r`` copies holds ``r`` weight copies, ``r`` directions and ``r``
copies of the live activations; ``workers`` chunks are in flight at once. The per-copy
activation bytes are measured while the plan is verified (peak of the live folded/leading
tensors on one example, scaled by the batch size), and the chunk is the largest that keeps the
total of all workers under ``memory_budget_mb`` (:func:`chunk_for_budget`). The default budget
(:data:`DEFAULT_MEMORY_BUDGET_MB`) is set where larger chunks stop paying off on a 2-core CPU
(see ``docs/performance.md``).

Modules: :mod:`.stacked` (the per-copy values), :mod:`.weights` (the chunk's weight copies),
:mod:`.layers` and :mod:`.ops` (the translation rules), :mod:`.rewrite` (graph rewrites),
:mod:`.translate` and :mod:`.plan` (the traced, translated forward), :mod:`.schedule` (chunks
and workers), :mod:`.engine` (one step).
"""

from fedzo_flwr.zo.engines.fused.engine import (
    DEFAULT_MEMORY_BUDGET_MB,
    FAILURE_CACHE_SIZE,
    fused_engine,
    fused_loss_differences,
    model_kind,
    planned_chunk,
)
from fedzo_flwr.zo.engines.fused.layers import SUPPORTED_MODULES
from fedzo_flwr.zo.engines.fused.ops import SUPPORTED_FUNCTIONS
from fedzo_flwr.zo.engines.fused.plan import FusedPlan, get_plan
from fedzo_flwr.zo.engines.fused.schedule import balanced_chunks, chunk_for_budget
from fedzo_flwr.zo.engines.fused.stacked import UnsupportedModel
from fedzo_flwr.zo.engines.fused.weights import ChunkWeights

__all__ = [
    "DEFAULT_MEMORY_BUDGET_MB",
    "FAILURE_CACHE_SIZE",
    "SUPPORTED_FUNCTIONS",
    "SUPPORTED_MODULES",
    "ChunkWeights",
    "FusedPlan",
    "UnsupportedModel",
    "balanced_chunks",
    "chunk_for_budget",
    "fused_engine",
    "fused_loss_differences",
    "get_plan",
    "model_kind",
    "planned_chunk",
]
