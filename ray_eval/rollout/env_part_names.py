"""What ``weights_dict`` can load into an env, as plain data.

Each worker reports it; the pool actor passes the report on without importing
torch or TorchRL to unpickle it (that import is seconds of a pool's start-up).
``env_parts`` finds the parts in a live env.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EnvParts:
    """What ``weights_dict`` can load into one env: its ``nn.Module`` parts.

    ``parts`` maps each model id (``"env"``, ``"env.transform"``,
    ``"env.transform[0]"``, ...) to the part's type name and state_dict keys.
    Envs that are not ``nn.Module``s (gymnasium envs, native vector envs) have none.
    """

    env_type: str  # the env's type name, for messages
    loop: str  # the rollout loop that runs it, for messages
    parts: dict[str, tuple[str, tuple[str, ...]]]
