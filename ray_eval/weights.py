"""Weights: from the trainer's module to detached CPU arrays, and into a policy.

The driver turns ``weights`` (an ``nn.Module``, a ``TensorDictBase`` or a
``state_dict``-like mapping) into a flat ``{"module.0.weight": ndarray}`` dict.
Ray stores numpy arrays without pickling them and workers read them from the
object store without a copy, so the put is fast and shared by every worker.
Workers copy the arrays into their policy's parameters after checking every
key and shape (``TensorDict.to_module`` alone would accept a wrong shape),
writing only the bytes that changed, and then unmap the object store's pages
they read (``memory.release_store_pages``): Ray never unmaps them itself, so a worker
would otherwise keep every weights object it ever read in its resident memory.
"""

from __future__ import annotations

import ctypes
import re
import warnings
from collections.abc import Mapping

import numpy as np
import torch
from tensordict import TensorDict, TensorDictBase
from torch import nn

from ray_eval.errors import WeightsMismatchError
from ray_eval.memory import libc_function
from ray_eval.rollout.env_part_names import EnvParts

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


def load_payload(targets: dict[str, torch.Tensor], payload: Payload) -> int:
    """Copy ``payload`` into the live tensors ``targets`` (see ``module_params``).

    Returns the bytes written. Bytes that are already equal are not written:
    each CPU tensor is compared with its array chunk by chunk up to the first
    chunk that differs, and copied from there on. So the same weights again
    write nothing (and cost one read of both), while new weights cost a copy
    and one chunk's comparison per tensor. Equality is bitwise (a NaN equals
    the same NaN, ``-0.0`` differs from ``0.0``).
    """
    written = 0
    with torch.no_grad(), warnings.catch_warnings():
        # Arrays read from the object store are read-only; we only copy from them.
        warnings.simplefilter("ignore", UserWarning)
        for key, tensor in targets.items():
            written += _copy_changed(tensor, torch.from_numpy(np.asarray(payload[key])))
    return written


_CHUNK = 1 << 20  # bytes compared at a time: a multiple of every element size


def _copy_changed(dst: torch.Tensor, src: torch.Tensor) -> int:
    nbytes = dst.numel() * dst.element_size()
    comparable = (
        dst.device.type == "cpu"
        and dst.dtype == src.dtype
        and dst.shape == src.shape
        and dst.is_contiguous()
        and src.is_contiguous()
    )
    if not comparable:  # another device, a cast or a strided tensor: copy it all
        dst.copy_(src)
        return nbytes
    first = _first_difference(dst.data_ptr(), src.data_ptr(), nbytes)
    if first is None:
        return 0
    start = first // dst.element_size()
    dst.view(-1)[start:].copy_(src.reshape(-1)[start:])
    return nbytes - first


def _first_difference(a: int, b: int, nbytes: int) -> int | None:
    """Offset of the first ``_CHUNK`` that differs between two buffers, or None."""
    for offset in range(0, nbytes, _CHUNK):
        size = min(_CHUNK, nbytes - offset)
        if _memcmp is not None:
            differs = _memcmp(a + offset, b + offset, size) != 0
        else:
            chunk = (ctypes.c_uint8 * size).from_address
            differs = bytes(chunk(a + offset)) != bytes(chunk(b + offset))
        if differs:
            return offset
    return None


_memcmp = libc_function("memcmp", [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t], ctypes.c_int)


EnvState = dict[str, dict]  # model id ("env.transform[0]") -> its state_dict

_PART_PATH = re.compile(r"\.(\w+)|\[(\d+)\]")


def payloads(
    weights: WeightsLike | None,
    weights_dict: Mapping | None,
    spec: ParamSpec,
    env_parts: Mapping[str, EnvParts] | None = None,
    *,
    copy: bool,
) -> tuple[Payload | None, EnvState | None]:
    """The policy's payload and the env parts' states of one request, checked.

    ``weights_dict`` is TorchRL's ``{model id: weights}``: ``"policy"`` is the
    policy (``weights`` fills it when absent); ids starting with ``"env"`` name
    a part of every env copy, e.g. ``"env.transform[0]"`` for a ``VecNormV2``
    whose statistics must travel with the weights (its state_dict, extra state
    included, is loaded into each copy). ``env_parts`` (suite member -> what its
    env has, as the workers reported it) checks each id and its state's keys
    here, before anything is sent: an id the env lacks, or an env with no parts
    to load (gymnasium and native vector envs), is refused, naming the key.
    """
    parts = dict(weights_dict or {})
    if weights is not None:
        parts.setdefault("policy", weights)
    policy = parts.pop("policy", None)
    payload = None
    if policy is not None:
        payload = to_payload(policy, copy=copy)
        check_payload(payload, spec)
    env_state = {}
    for key, value in parts.items():
        if not isinstance(key, str) or not _is_env_id(key):
            raise ValueError(
                f"weights_dict key {key!r}: ray_eval loads 'policy' and parts of the env "
                f"named from it, e.g. 'env.transform[0]'"
            )
        env_state[key] = _state_of(key, value)
        if env_parts is not None:
            check_env_part(key, env_state[key], env_parts)
    return payload, env_state or None


def _is_env_id(key: str) -> bool:
    """``env`` followed by ``.name`` and ``[index]`` steps only."""
    return (
        key.startswith("env") and "".join(m.group(0) for m in _PART_PATH.finditer(key)) == key[3:]
    )


def check_env_part(key: str, state: dict, env_parts: Mapping[str, EnvParts]) -> None:
    """Raise ``ValueError`` naming ``key`` unless every member's env can load ``state`` there."""
    for member, env in env_parts.items():
        where = f"suite member {member!r}: " if member else ""
        if not env.parts:
            raise ValueError(
                f"weights_dict key {key!r}: {where}the env ({env.env_type}, run by "
                f"{env.loop}) has no parts that weights_dict can load: env parts are the "
                f"nn.Module parts of a TorchRL env (e.g. a VecNormV2 transform); gymnasium "
                f"envs and native vector envs have none"
            )
        if key not in env.parts:
            known, missing = _deepest_known(key, env.parts)
            listed = ", ".join(sorted(env.parts)[:8]) + (" ..." if len(env.parts) > 8 else "")
            raise ValueError(
                f"weights_dict key {key!r}: {where}the env ({env.env_type}) has no "
                f"{missing} there"
                + (f" (below {known})" if known != "env" else "")
                + f"; its parts are {listed}"
            )
        part_type, keys = env.parts[key]
        if set(state) != set(keys):
            raise ValueError(
                f"weights_dict key {key!r}: {where}the state given has keys "
                f"{sorted(state)[:8]}, the env's {part_type} there has {sorted(keys)[:8]}"
            )


def _deepest_known(key: str, parts: Mapping) -> tuple[str, str]:
    """The longest prefix of ``key`` that is a part, and the step after it."""
    known = "env"
    for match in _PART_PATH.finditer(key):
        step = match.group(0)
        if known + step not in parts:
            return known, step
        known += step
    return known, ""


def _state_of(key: str, value) -> dict:
    if isinstance(value, nn.Module):
        state = value.state_dict()
    elif isinstance(value, TensorDictBase):
        state = value.to_dict()
    elif isinstance(value, Mapping):
        state = dict(value)
    else:
        raise TypeError(
            f"weights_dict[{key!r}] must be an nn.Module, a TensorDict or a state_dict, "
            f"got {type(value).__name__}"
        )
    return {
        k: v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()
    }


def resolve_part(env, key: str):
    """The part of ``env`` that model id ``key`` names (``"env.transform[0]"``)."""
    target = env
    path = key[len("env") :]
    for token in _PART_PATH.findall(path):
        attribute, index = token
        try:
            target = getattr(target, attribute) if attribute else target[int(index)]
        except (AttributeError, IndexError, KeyError, TypeError):
            raise ValueError(
                f"weights_dict key {key!r}: the env ({type(env).__name__}) has no "
                f"{'.' + attribute if attribute else f'[{index}]'} there"
            ) from None
    return target


# TorchRL's VecNorm (v1) warns when statistics are loaded into a copy that has
# not run yet: its concern is processes that share one live statistic. Each of
# ray_eval's env copies gets the trainer's statistics loaded by ray_eval itself,
# so the warning would only make users think the statistics did not travel.
_UNSHARED_VECNORM_WARNING = r"VecNorm wasn't initialized and the tensordict is not shared"


def load_env_state(env, env_state: EnvState) -> None:
    """Load each part's state into ``env`` (one env copy)."""
    for key, state in env_state.items():
        part = resolve_part(env, key)
        if not isinstance(part, nn.Module):
            raise ValueError(f"weights_dict key {key!r} names a {type(part).__name__}")
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", _UNSHARED_VECNORM_WARNING, UserWarning)
                part.load_state_dict(state)
        except Exception as error:
            raise ValueError(
                f"weights_dict key {key!r}: its state does not load into the env's "
                f"{type(part).__name__}: {type(error).__name__}: {error}"
            ) from None
