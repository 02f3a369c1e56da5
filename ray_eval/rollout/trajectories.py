"""The trajectories TensorDict that TorchRL's ``metrics_fn`` receives.

TorchRL calls ``metrics_fn`` once per evaluation with the whole batch of
trajectories its collector gathered. ray_eval's workers record each episode's
steps (only when a ``metrics_fn`` is given) and this module lays them out the
way TorchRL's collector does:

* ``"pad"`` (TorchRL's default): shape ``[num_episodes, T]`` with ``T`` the
  longest episode, shorter ones zero-padded; ``("collector", "mask")`` marks
  the real steps;
* ``"cat"`` (``collector_kwargs={"traj_format": "cat"}``): every step of every
  episode one after the other, shape ``[total_steps]``.

Both carry ``("collector", "traj_ids")``: the episode index of every step.
"""

from __future__ import annotations

import torch
from tensordict import TensorDictBase, pad


def trajectories(batches: list, traj_format: str = "pad") -> TensorDictBase:
    """One TensorDict of every recorded episode of ``batches``, in plan order."""
    episodes = [td for batch in batches for td in batch.trajectories]
    lengths = [td.shape[0] for td in episodes]
    if traj_format == "cat":
        out = torch.cat(episodes, 0)
        ids = torch.repeat_interleave(torch.arange(len(episodes)), torch.tensor(lengths))
        out.set(("collector", "traj_ids"), ids)
        return out
    longest = max(lengths)
    out = torch.stack([pad(td, [0, longest - td.shape[0]]) for td in episodes], 0)
    steps = torch.arange(longest).expand(len(episodes), longest)
    out.set(("collector", "mask"), steps < torch.tensor(lengths)[:, None])
    out.set(("collector", "traj_ids"), torch.arange(len(episodes))[:, None].expand_as(steps))
    return out
