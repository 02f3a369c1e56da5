"""Evaluation configs: YAML files validated into a typed ``EvalConfig``.

A config names the env (a gymnasium id or a ``module:function`` factory), the
policy (a built-in MLP, the built-in Nature-DQN CNN for stacked Atari frames, or
a ``module:function`` factory), the episodes and the workers. ``key=value``
overrides from the command line are applied to the YAML before validation, so
they are checked exactly like the file: an unknown key or a wrong type fails
with the key's dotted name.

Example (``configs/pendulum.yaml``)::

    name: pendulum
    env: {id: Pendulum-v1}
    policy: {type: mlp, hidden_sizes: [64, 64]}
    num_trajectories: 16
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import importlib
import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
OVERRIDE = re.compile(r"^([A-Za-z_][\w]*(?:\.[A-Za-z_][\w]*)*)=(.*)$", re.DOTALL)
# The fields that do not change the numbers an evaluation gives, and why: the config
# hash leaves out these, and only these (tests/test_cli.py changes every field in turn).
UNHASHED_FIELDS = {
    "name": "a label for tables and plots",
    "busy_policy": "how requests wait for each other, not what they compute",
    "timeout": "when to give up on an evaluation, not what it computes",
    "output": "where results are written",
    "loggers": "where results are sent",
    "workers.num_workers": "episodes carry their own seeds: any number of workers gives "
    "the same numbers",
    "workers.num_cpus": "where workers run, not what they compute",
    "workers.resources": "where workers run, not what they compute",
    "workers.placement": "where workers run, not what they compute",
    "workers.max_restarts": "a chunk run again gives the same episodes",
    "workers.startup_timeout": "when to give up on a worker's start",
    "checkpoint.allow_pickle": "whether a pickled module may be read, not what is read from it",
}
# Hashed with their value even at its default: the fields the hash covered from the start
# (``workers.envs_per_worker``: the env copies a worker steps as one batch fix the batch of
# every policy call, and a batched matrix product gives bit-for-bit different rows for
# different batch sizes). Every other hashed field enters the hash only when it differs from
# its default, so results files written before it existed keep their hashes.
ALWAYS_HASHED = (
    "env",
    "policy",
    "num_trajectories",
    "max_steps",
    "seed",
    "exploration_type",
    "log_prefix",
    "workers.envs_per_worker",
)


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message is one line."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def resolve_import_path(path: str) -> Any:
    """The object ``module:attr`` (``attr`` may be dotted) names; ``ValueError`` otherwise."""
    if not IMPORT_PATH.match(path):
        raise ValueError(f"{path!r} is not an import path of the form 'package.module:function'")
    module_name, attr = path.split(":")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"cannot import {module_name!r} (from {path!r}): {error}") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(f"module {module_name!r} has no attribute {attr!r}") from None
    return obj


def _check_callable_path(path: str) -> str:
    if not callable(resolve_import_path(path)):
        raise ValueError(f"{path!r} is not callable")
    return path


class EnvConfig(_Strict):
    """A gymnasium id (``id``) or a factory ``module:function`` called with ``kwargs``.

    ``id`` may name a native vector env: ``envpool:<task id>`` or
    ``vector:<gymnasium id>`` (``kwargs`` then go to the vector env's constructor).
    """

    id: str | None = None
    factory: str | None = None
    kwargs: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        """``env: Pendulum-v1`` or ``env: package.module:function`` alone."""
        if isinstance(value, str):
            vector = value.startswith(("envpool:", "vector:"))  # native vector env ids
            return {"factory": value} if IMPORT_PATH.match(value) and not vector else {"id": value}
        return value

    @field_validator("id")
    @classmethod
    def _registered(cls, value: str | None) -> str | None:
        if value is not None:
            import gymnasium as gym

            from ray_eval.rollout.vector_sources import (
                ENVPOOL_PREFIX,
                VECTOR_PREFIX,
                vector_source_from_id,
            )

            if value.startswith((ENVPOOL_PREFIX, VECTOR_PREFIX)):
                vector_source_from_id(value)  # a native vector env: raises if unknown
            elif value not in gym.registry:
                close = difflib.get_close_matches(value, list(gym.registry), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(f"{value!r} is not a registered gymnasium id{hint}")
        return value

    @field_validator("factory")
    @classmethod
    def _importable(cls, value: str | None) -> str | None:
        return None if value is None else _check_callable_path(value)

    @model_validator(mode="after")
    def _one_source(self) -> EnvConfig:
        if (self.id is None) == (self.factory is None):
            raise ValueError(
                "give exactly one of 'id' (a gymnasium id) or 'factory' (module:function)"
            )
        return self

    @property
    def label(self) -> str:
        """A short name for tables and plots."""
        return self.id or str(self.kwargs.get("env_id") or self.factory)

    def build(self) -> str | Callable[[], Any]:
        """What ``Evaluator(env=...)`` takes: the id, or a picklable zero-argument factory."""
        if self.id is not None:
            if not self.kwargs:
                return self.id
            from ray_eval.env_input import GymMake
            from ray_eval.rollout.vector_sources import vector_source_from_id

            return vector_source_from_id(self.id, self.kwargs) or GymMake(
                self.id, dict(self.kwargs)
            )
        return functools.partial(resolve_import_path(self.factory), **self.kwargs)


class MLPPolicyConfig(_Strict):
    """A small MLP built in each worker from the env's observation and action sizes."""

    type: Literal["mlp"] = "mlp"
    hidden_sizes: list[Annotated[int, Field(gt=0)]] = Field(default_factory=lambda: [64, 64])
    activation: Literal["tanh", "relu", "elu", "gelu"] = "tanh"
    init_seed: int = 0  # every worker builds the same initial weights

    def build(self) -> Callable[[Any], Any]:
        from ray_eval.factories import MLPPolicy

        return MLPPolicy(tuple(self.hidden_sizes), self.activation, self.init_seed)


class NatureCNNPolicyConfig(_Strict):
    """The Nature-DQN CNN, built in each worker for ``(frames, 84, 84)`` uint8 observations
    (``ray_eval.factories:atari_env``) and the env's discrete actions (greedy)."""

    type: Literal["nature_cnn"]
    init_seed: int = 0  # every worker builds the same initial weights

    def build(self) -> Callable[[Any], Any]:
        from ray_eval.factories import NatureCNNPolicy

        return NatureCNNPolicy(self.init_seed)


class FactoryPolicyConfig(_Strict):
    """``module:function`` called in each worker (with the env if it takes one) and ``kwargs``."""

    type: Literal["factory"] = "factory"
    factory: str
    kwargs: dict[str, Any] = Field(default_factory=dict)

    @field_validator("factory")
    @classmethod
    def _importable(cls, value: str) -> str:
        return _check_callable_path(value)

    def build(self) -> Callable[..., Any]:
        function = resolve_import_path(self.factory)
        return functools.partial(function, **self.kwargs) if self.kwargs else function


def _policy_kind(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("type", "factory" if "factory" in value else "mlp")
    return getattr(value, "type", None)


PolicyConfig = Annotated[
    Annotated[MLPPolicyConfig, Tag("mlp")]
    | Annotated[NatureCNNPolicyConfig, Tag("nature_cnn")]
    | Annotated[FactoryPolicyConfig, Tag("factory")],
    Discriminator(
        _policy_kind,
        custom_error_type="policy_type",
        custom_error_message=(
            "policy.type must be 'mlp' or 'factory', or 'nature_cnn' (the Atari CNN)"
        ),
    ),
]
_POLICY_MODELS = {
    "mlp": MLPPolicyConfig,
    "nature_cnn": NatureCNNPolicyConfig,
    "factory": FactoryPolicyConfig,
}
_UNION_TAGS = set(_POLICY_MODELS)


class WorkersConfig(_Strict):
    """The worker actors and the Ray resources each one holds."""

    # None: as many as the cluster has CPUs for; 0: in-process, without Ray.
    num_workers: Annotated[int, Field(ge=0)] | None = None
    num_cpus: Annotated[float, Field(ge=0)] = 1.0
    num_gpus: Annotated[float, Field(ge=0)] = 0.0
    resources: dict[str, Annotated[float, Field(ge=0)]] = Field(default_factory=dict)
    # None: the Evaluator's default (64 copies of a single env; for a native vector
    # env, a batch chosen from the episodes; a batched TorchRL env's own batch).
    envs_per_worker: Annotated[int, Field(gt=0)] | None = None
    max_restarts: Annotated[int, Field(ge=0)] = 3
    placement: Literal["pack", "spread", "strict_pack", "strict_spread"] | None = None
    startup_timeout: Annotated[float, Field(gt=0)] = 60.0


class CheckpointConfig(_Strict):
    """How checkpoint files are read."""

    allow_pickle: bool = False  # a whole pickled nn.Module runs code when loaded: opt in
    key: str | None = None  # entry of a training checkpoint dict that holds the policy weights


class LoggerConfig(_Strict):
    """A TorchRL logger that receives every result (through ``on_result``)."""

    type: Literal["csv", "tensorboard", "wandb"]
    log_dir: str = "outputs/logs"
    exp_name: str | None = None  # default: the config's name
    project: str = "ray-eval"  # wandb only; wandb always runs offline here


class EvalConfig(_Strict):
    """A whole evaluation job."""

    name: str | None = None  # default: the config file's stem
    env: EnvConfig
    policy: PolicyConfig = Field(default_factory=MLPPolicyConfig)
    num_trajectories: Annotated[int, Field(gt=0)] = 10
    max_steps: Annotated[int, Field(gt=0)] | None = None
    seed: int = 0
    busy_policy: Literal["error", "skip", "queue", "latest"] = "queue"
    exploration_type: Literal["deterministic", "random", "mode", "mean"] = "deterministic"
    log_prefix: str = "eval"
    timeout: Annotated[float, Field(gt=0)] | None = None  # seconds per evaluation
    workers: WorkersConfig = Field(default_factory=WorkersConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    output: str | None = None  # results file (JSON lines); --output wins
    loggers: list[LoggerConfig] = Field(default_factory=list)

    def config_hash(self) -> str:
        """A short hash of every field that decides the numbers (see ``UNHASHED_FIELDS``).

        Output, loggers, timeouts and the workers' number and resources are left
        out: the same evaluation on 1 or 8 workers gives the same numbers, so it
        keeps the same hash. ``checkpoint.key`` (which weights are read),
        ``workers.envs_per_worker`` (the batch: the last bits) and
        ``workers.num_gpus`` (where the policy runs: other kernels) are in.
        """
        data = _hashed(self, self.model_dump(mode="json"), "")
        text = json.dumps(data, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _hashed(model: BaseModel, dumped: dict, prefix: str) -> dict:
    """The part of ``dumped`` (``model``'s JSON dump) that the config hash covers."""
    out = {}
    for name, field in type(model).model_fields.items():
        path = prefix + name
        value = getattr(model, name)
        if path in UNHASHED_FIELDS:
            continue
        if path not in ALWAYS_HASHED and isinstance(value, _Strict):
            inner = _hashed(value, dumped[name], path + ".")
            if inner:
                out[name] = inner
        elif path in ALWAYS_HASHED or value != field.get_default(call_default_factory=True):
            out[name] = dumped[name]
    return out


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> EvalConfig:
    """Read, override and validate a YAML config; raises ``ConfigError`` (one line)."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except OSError as error:
        raise ConfigError(f"cannot read config {path}: {error.strerror or error}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"config {path} is not valid YAML{where}: {problem}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config {path} must be a mapping of keys, got {type(raw).__name__}")
    raw = apply_overrides(raw, overrides)
    raw.setdefault("name", path.stem)
    return validate_config(raw, source=str(path))


def validate_config(raw: dict, source: str = "config") -> EvalConfig:
    """Validate a config mapping; raises ``ConfigError`` naming every bad key."""
    try:
        return EvalConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(f"{source}: {format_errors(error)}") from None


def apply_overrides(raw: dict, overrides: Sequence[str]) -> dict:
    """A copy of ``raw`` with each ``dotted.key=value`` set (value parsed as YAML)."""
    raw = json.loads(json.dumps(raw, default=str)) if overrides else raw
    for item in overrides:
        match = OVERRIDE.match(item)
        if match is None:
            raise ConfigError(
                f"override {item!r} must look like key=value (dotted keys for nested ones, "
                f"e.g. workers.num_workers=2)"
            )
        key, text = match.groups()
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            value = text  # not YAML: keep the string
        node = raw
        parts = key.split(".")
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                where = ".".join(parts[: depth + 1])
                raise ConfigError(
                    f"override {item!r}: {where!r} is {type(child).__name__}, not a mapping"
                )
            node = child
        node[parts[-1]] = value
    return raw


def format_errors(error: ValidationError) -> str:
    """Pydantic's errors on one line: ``key.path: message; ...`` with spelling hints."""
    parts = []
    for item in error.errors():
        loc = _display_loc(item["loc"])
        kind = item["type"]
        if kind == "extra_forbidden":
            message = "unknown key" + _suggestion(item["loc"])
        elif kind == "missing":
            message = "required key is missing"
        elif kind == "value_error":
            message = str(item["ctx"]["error"])
        else:
            message = item["msg"]
            if "input" in item and kind not in ("policy_type",):
                message += f" (got {_short(item['input'])})"
        parts.append(f"{loc}: {message}" if loc else message)
    return "; ".join(parts)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _display_loc(loc: tuple) -> str:
    shown = []
    for i, part in enumerate(loc):
        if i > 0 and loc[i - 1] == "policy" and part in _UNION_TAGS:
            continue  # the union's tag, not a key
        shown.append(f"[{part}]" if isinstance(part, int) else str(part))
    return ".".join(shown).replace(".[", "[")


def _suggestion(loc: tuple) -> str:
    model: Any = EvalConfig
    for part in loc[:-1]:
        if part in _UNION_TAGS:
            model = _POLICY_MODELS[part]
            continue
        if isinstance(part, int) or model is None:
            continue
        field = model.model_fields.get(part)
        model = _model_in(field.annotation) if field else None
    if model is None or not hasattr(model, "model_fields"):
        return ""
    close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _model_in(annotation: Any) -> Any:
    """The pydantic model inside ``annotation`` (through Optional/list/Annotated)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_in(arg)
        if found is not None:
            return found
    return None
