"""The active part of a zeroth-order progressive stage: one module, its mask, its KeptSpace.

Stage ``t`` of ``zo-progressive`` perturbs block ``t`` and its output module (the head at the
last stage) and nothing else. :class:`ActiveStage` wraps exactly those two modules as one
``nn.Sequential(block, output)`` whose parameters are the staged model's own tensors (by
identity), so the zeroth-order engines, the direction generator, the reconstruction and
:class:`~fedzo_flwr.zo.server.ZOServer` run on it unchanged, with the frozen prefix's output as
its input. Its :class:`~fedzo_flwr.sparse.space.KeptSpace` is the stage's coordinate space:
directions, fingerprints, optimizer state and the replay history live in it.

Masks [ours]. The blocks keep the data-free NTK-SAP mask of the ordinary model, exactly as for
``zo-pruned`` (:func:`fedzo_flwr.run.setup.initial_model`). The output modules are not part of
the ordinary model, so that mask does not cover them; left dense they would dominate the
perturbed dimension of the early stages and undo what training one block at a time gains for
the estimator (ResNet-20, density 0.1: output module 0 has 23,690 weights, block 0 14,256; with
both pruned, stage 0 perturbs 4,890 coordinates against 28,220 for the whole model and 26,202 with
a dense output module). Each output module is therefore pruned at the run's
density with its **own data-free NTK-SAP** (:func:`output_masks`): the same scoring as the
model's, on Gaussian inputs of the shape the block hands the output module, seeded
``derive_seed(pruning seed, "progressive/output-mask", t)``. The model's mask plus the output
modules' masks, keyed ``output.<t>.<name>`` like the output-module tensors, is the **staged
mask** (:func:`staged_mask`).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from fedzo_flwr.errors import ConfigError
from fedzo_flwr.progressive.staged import OUTPUT_PREFIX, StagedModel
from fedzo_flwr.pruning.ntk_sap import NTKSAPConfig, ntk_sap_mask
from fedzo_flwr.seeding import derive_seed
from fedzo_flwr.sparse.mask import Mask, dense_mask, prunable_parameters, validate_mask
from fedzo_flwr.sparse.space import KeptSpace

__all__ = [
    "ActiveStage",
    "apply_staged_mask_",
    "feature_shape",
    "output_mask_seed",
    "output_masks",
    "staged_mask",
    "staged_mask_template",
]

_OUTPUT_MASK_STREAM = "progressive/output-mask"


def output_mask_seed(seed: int, stage: int) -> int:
    """Seed of output module ``stage``'s NTK-SAP mask (sub-stream of the pruning seed)."""
    return derive_seed(seed, _OUTPUT_MASK_STREAM, stage)


@torch.no_grad()
def feature_shape(staged: StagedModel, stage: int) -> tuple[int, ...]:
    """Shape of one example's input to block ``stage`` (the frozen prefix's output)."""
    return tuple(staged.features(torch.zeros(1, 3, 32, 32), stage).shape[1:])


@torch.no_grad()
def _output_input_shape(staged: StagedModel, stage: int) -> tuple[int, ...]:
    h = staged.blocks[stage](staged.features(torch.zeros(1, 3, 32, 32), stage))
    return tuple(h.shape[1:])


def output_masks(
    staged: StagedModel,
    model_name: str,
    density: float,
    config: NTKSAPConfig | None = None,
    seed: int = 0,
) -> Mask:
    """Data-free NTK-SAP masks of every output module at ``density``, keyed ``output.<t>.<n>``.

    Output module ``t`` is scored alone, on ``N(0, I)`` inputs of the shape block ``t`` feeds
    it, its weights redrawn from ``model_name``'s initialiser (the one that initialised it),
    with ``config``'s other settings and seed :func:`output_mask_seed` ``(seed, t)``. Density 1
    gives dense masks. The output modules' weights are not modified.
    """
    config = NTKSAPConfig() if config is None else config
    out: Mask = {}
    for t, module in enumerate(staged.output_modules):
        if density >= 1.0:
            mask = dense_mask(module)
        else:
            shaped = dataclasses.replace(config, input_shape=_output_input_shape(staged, t))
            mask = ntk_sap_mask(module, model_name, density, shaped, seed=output_mask_seed(seed, t))
        out.update((f"{OUTPUT_PREFIX}{t}.{name}", m) for name, m in mask.items())
    return out


def staged_mask(
    staged: StagedModel,
    model_mask: Mask,
    model_name: str,
    density: float,
    config: NTKSAPConfig | None = None,
    seed: int = 0,
) -> Mask:
    """The model's mask (validated against ``staged.model``) plus :func:`output_masks`.

    In the canonical order of :func:`staged_mask_template` (the order its bitmap travels in).
    """
    validate_mask(staged.model, model_mask)
    mask = {**model_mask, **output_masks(staged, model_name, density, config, seed)}
    return {name: mask[name] for name in staged_mask_template(staged)}


def staged_mask_template(staged: StagedModel) -> Mask:
    """A dense staged mask: every prunable weight of the model, then of each output module.

    Its keys and order are those of every staged mask (:func:`staged_mask`), so a client
    decodes a received bitmap against it (:func:`fedzo_flwr.protocol.wire.decode_mask`).
    """
    return {
        name: torch.ones_like(param, dtype=torch.bool)
        for name, param in _staged_prunable(staged).items()
    }


def _staged_prunable(staged: StagedModel) -> dict[str, nn.Parameter]:
    params = dict(prunable_parameters(staged.model))
    for t, module in enumerate(staged.output_modules):
        params.update((f"{OUTPUT_PREFIX}{t}.{n}", p) for n, p in prunable_parameters(module))
    return params


def _check_staged_mask(staged: StagedModel, mask: Mask) -> dict[str, nn.Parameter]:
    params = _staged_prunable(staged)
    missing = sorted(set(params) - set(mask))
    extra = sorted(set(mask) - set(params))
    if missing or extra:
        raise ValueError(f"staged mask: missing {missing}, unexpected {extra}")
    for name, param in params.items():
        m = mask[name]
        if not isinstance(m, torch.Tensor) or m.dtype != torch.bool or m.shape != param.shape:
            raise ValueError(f"staged mask[{name!r}] must be a bool tensor of {tuple(param.shape)}")
    return params


@torch.no_grad()
def apply_staged_mask_(staged: StagedModel, mask: Mask) -> None:
    """Zero every pruned weight of the model and of the output modules in place."""
    for name, param in _check_staged_mask(staged, mask).items():
        param.mul_(mask[name].to(param.dtype))


class ActiveStage:
    """Block ``stage`` and its output module (the head at the last stage) as one module.

    Parameters
    ----------
    staged : StagedModel
        The staged model; its tensors are shared, not copied. :meth:`StagedModel.prepare_stage`
        is called, so exactly the stage's parameters require grad afterwards (the KeptSpace
        takes the trainable parameters of the module).
    stage : int
        The active stage.
    mask : Mask
        The staged mask (:func:`staged_mask`): every prunable weight of the model and of the
        output modules.

    Attributes
    ----------
    module : nn.Sequential
        ``Sequential(block, output)``; ``module(staged.features(x, stage))`` equals
        ``staged.forward_stage(x, stage)``.
    mask : Mask
        The staged mask restricted to ``module``, under ``module``'s parameter names.
    space : KeptSpace
        The stage's coordinates: kept weights of the block and output module, their biases and
        norm parameters. Its order is that of :meth:`StagedModel.stage_parameters`.
    names : dict of str to str
        ``module`` parameter name -> the stage tensor's name (ordinary key or ``output.<t>.*``).

    """

    def __init__(self, staged: StagedModel, stage: int, mask: Mask) -> None:
        trainable = staged.prepare_stage(stage)
        prunable = _check_staged_mask(staged, mask)
        last = stage == staged.num_stages - 1
        output = staged.head if last else staged.output_modules[stage]
        self.staged = staged
        self.stage = stage
        self.staged_mask = mask
        self.module = nn.Sequential(staged.blocks[stage], output)
        by_id = {id(p): n for n, p in trainable.items()}
        self.names = {n: by_id[id(p)] for n, p in self.module.named_parameters()}
        if sorted(self.names.values()) != sorted(trainable):
            raise ConfigError(f"stage {stage}: the active module does not hold the stage tensors")
        prunable_ids = {id(p) for p in prunable.values()}
        self.mask: Mask = {
            n: mask[self.names[n]]
            for n, p in prunable_parameters(self.module)
            if id(p) in prunable_ids
        }
        self.space = KeptSpace(self.module, self.mask)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen prefix's output for ``x`` (no_grad): the active module's input."""
        return self.staged.features(x, self.stage)

    def prefix(self) -> nn.Sequential:
        """The frozen blocks ``0..stage-1`` as one module (empty at stage 0)."""
        return nn.Sequential(*self.staged.blocks[: self.stage])

    def prefix_mask(self) -> Mask:
        """The staged mask restricted to :meth:`prefix`, under its parameter names."""
        names = {id(p): n for n, p in prunable_parameters(self.staged.model)}
        return {n: self.staged_mask[names[id(p)]] for n, p in prunable_parameters(self.prefix())}

    def __repr__(self) -> str:
        return f"ActiveStage(stage={self.stage}, dim={self.space.dim})"
