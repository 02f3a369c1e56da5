"""Weights: from the trainer's module to detached CPU arrays, and into a policy.

The driver turns ``weights`` (an ``nn.Module``, a ``TensorDictBase`` or a
``state_dict``-like mapping) into a flat ``{"module.0.weight": ndarray}`` dict.
Ray stores numpy arrays without pickling them and workers read them from the
object store without a copy, so the put is fast and shared by every worker.
Workers copy the arrays into their policy's parameters after checking every
key and shape (``TensorDict.to_module`` alone would accept a wrong shape).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import numpy as np
import torch
from tensordict import TensorDict, TensorDictBase
from torch import nn

from ray_eval.errors import WeightsMismatchError

WeightsLike = nn.Module | TensorDictBase | Mapping
Payload = dict[str, np.ndarray]
# What a policy's parameters look like: flat key -> (shape, dtype name).
ParamSpec = dict[str, tuple[tuple[int, ...], str]]


def module_params(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's parameters and buffers under flat dotted keys (live tensors)."""
    flat = TensorDict.from_module(module).flatten_keys(".")
    return dict(flat.items())


def param_spec(module) -> ParamSpec:
    if not isinstance(module, nn.Module):
        return {}
    return {k: (tuple(v.shape), str(v.dtype)) for k, v in module_params(module).items()}


def to_payload(weights: WeightsLike, *, copy: bool) -> Payload:
    """Detached CPU numpy arrays of ``weights``, keyed by flat dotted names.

    ``copy=False`` shares memory with CPU tensors; use it only when the payload
    is copied right away (``ray.put`` does).
    """
    if isinstance(weights, nn.Module):
        items = module_params(weights).items()
    elif isinstance(weights, TensorDictBase):
        items = weights.flatten_keys(".").items()
    elif isinstance(weights, Mapping):
        items = _flatten_mapping(weights).items()
    else:
        raise TypeError(
            f"weights must be an nn.Module, a TensorDictBase or a mapping of tensors, "
            f"got {type(weights).__name__}"
        )
    payload = {}
    for key, value in items:
        if isinstance(value, torch.Tensor):
            array = value.detach().cpu().numpy()
        else:
            array = np.asarray(value)
        payload[key] = array.copy() if copy else array
    return payload


def _flatten_mapping(mapping: Mapping, prefix: str = "") -> dict:
    flat = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping | TensorDictBase):
            flat.update(_flatten_mapping(dict(value.items()), name + "."))
        else:
            flat[name] = value
    return flat


def check_payload(payload: Payload, spec: ParamSpec) -> None:
    """Raise ``WeightsMismatchError`` naming the first bad key and both shapes."""
    if not spec:
        raise WeightsMismatchError(
            "weights were given but the policy has no parameters to load them into"
        )
    missing = sorted(set(spec) - set(payload))
    unexpected = sorted(set(payload) - set(spec))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        raise WeightsMismatchError(
            "weights do not match the policy: "
            + "; ".join(parts)
            + f". The policy's keys are {sorted(spec)[:8]}"
        )
    for key, (shape, _dtype) in spec.items():
        got = tuple(payload[key].shape)
        if got != tuple(shape):
            raise WeightsMismatchError(
                f"weights key {key!r} has shape {got}, the policy expects {tuple(shape)}"
            )


def load_payload(targets: dict[str, torch.Tensor], payload: Payload) -> None:
    """Copy ``payload`` into the live tensors ``targets`` (see ``module_params``)."""
    with torch.no_grad(), warnings.catch_warnings():
        # Arrays read from the object store are read-only; we only copy from them.
        warnings.simplefilter("ignore", UserWarning)
        for key, tensor in targets.items():
            tensor.copy_(torch.from_numpy(payload[key]))
