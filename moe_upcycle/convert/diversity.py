"""Diversity at initialisation: per-expert Gaussian noise and Drop-Upcycling.

Drop-Upcycling (Nakamura et al., ICLR 2025, arXiv 2502.19261): for each expert, a random fraction ``r`` of
the intermediate neurons is re-initialised -- their rows of the gate/up projections and their columns of
the down projection are drawn from a normal distribution with the mean and standard deviation of the
original weight matrix -- and the rest is copied. The paper's choice is ``r = 0.5``. Both methods are
deliberately not exact.
"""

from __future__ import annotations

import torch


def seeded_generator(seed: int, layer: int, slot: int, salt: int | str) -> torch.Generator:
    """The one seed formula of a conversion: a generator per (seed, layer, expert slot, what it draws), so that
    every random tensor is reproducible on its own, whatever order the plan produces them in."""
    salt = sum(map(ord, salt)) if isinstance(salt, str) else salt
    return torch.Generator().manual_seed((seed * 1_000_003 + layer * 10_007 + slot * 101 + salt) % (2**63))


def dropped_neurons(seed: int, layer: int, expert: int, intermediate: int, ratio: float) -> torch.Tensor:
    """The sorted intermediate-neuron indices [round(ratio * I)] re-initialised in ``expert`` of ``layer``.

    The same indices are used for every tensor of the expert (gate, up, down, biases).
    """
    count = round(ratio * intermediate)
    return torch.randperm(intermediate, generator=seeded_generator(seed, layer, expert, 7))[:count].sort().values


def neuron_layout(name: str, shape: tuple[int, ...]) -> tuple[int, list[tuple[int, int]]]:
    """(axis of the neuron index, [(offset, size I)] per original matrix) of an expert tensor."""
    if name == "gate_up_proj" or name == "gate_up_proj_bias":
        half = shape[0] // 2
        return 0, [(0, half), (half, half)]  # gate rows, then up rows: two original matrices
    if name in ("up_proj", "up_proj_bias"):
        return 0, [(0, shape[0])]
    if name == "down_proj":
        return 1, [(0, shape[1])]
    return -1, []  # down_proj_bias has no intermediate axis


def slice_neurons(tensor: torch.Tensor, name: str, start: int, width: int) -> torch.Tensor:
    """Neurons ``[start, start + width)`` of one expert tensor (both halves of a fused ``gate_up_proj``).

    E.g. gate_up_proj [2I, H] -> [2w, H] (gate rows, then up rows); down_proj [H, I] -> [H, w]; a tensor
    without an intermediate axis (``down_proj_bias``) is returned unchanged.
    """
    axis, matrices = neuron_layout(name, tuple(tensor.shape))
    if axis < 0:
        return tensor
    return torch.cat([tensor.narrow(axis, offset + start, width) for offset, _ in matrices], dim=axis)


def diversify(base: torch.Tensor, name: str, *, layer: int, expert: int, seed: int, drop_ratio: float,
              noise: float) -> torch.Tensor:
    """One expert's copy of ``base`` (float32) with Drop-Upcycling and/or relative Gaussian noise applied.

    Args:
        base: the dense tensor for one expert, e.g. gate_up_proj [2I, H] or down_proj [H, I].
        name: the expert tensor name (decides which axis indexes intermediate neurons).
        drop_ratio: fraction r of intermediate neurons to re-initialise (0 = none).
        noise: relative noise std (x the tensor's std) added to weights, not biases (0 = none).
    """
    out = base.float().clone()
    axis, matrices = neuron_layout(name, tuple(base.shape))
    if drop_ratio > 0 and axis >= 0:
        intermediate = matrices[0][1]
        idx = dropped_neurons(seed, layer, expert, intermediate, drop_ratio)
        generator = seeded_generator(seed, layer, expert, 13 + sum(map(ord, name)))
        for offset, size in matrices:
            original = base.float().narrow(axis, offset, size)
            mean, std = original.mean(), original.std() if original.numel() > 1 else torch.tensor(0.0)
            target = out.narrow(axis, offset, size)
            shape = list(original.shape)
            shape[axis] = idx.numel()
            fresh = torch.randn(shape, generator=generator) * std + mean
            target.index_copy_(axis, idx, fresh)
    if noise > 0 and not name.endswith("_bias"):
        generator = seeded_generator(seed, layer, expert, 3 + sum(map(ord, name)))
        out += torch.randn(out.shape, generator=generator) * (noise * base.float().std())
    return out
