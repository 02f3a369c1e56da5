"""The episode loops and everything about envs and policies. No Ray in this wing.

- ``chunk``: the unit of work a loop runs (planned episodes and their seeds).
- ``loops``: ``GymnasiumRollout`` (vectorized gymnasium) and ``TorchRLRollout`` (``EnvBase``).
- ``vector_loop``, ``vector_sources``: native vector envs (EnvPool, gymnasium's
  ``vector_entry_point``): building them and their loop.
- ``batched_loop``: batched TorchRL envs (``batch_size=[N]``), stepped as one batch;
  ``env_keys``: their (and every TorchRL env's) action, reward and done keys, by agent group.
- ``adapters``: env copies and a policy turned into a loop; the action check.
- ``policies``: whatever the user passed, called once per step on a batch.
- ``torchrl_env``, ``env_parts``, ``trajectories``: seeding and info of TorchRL envs,
  frozen normalization and video dumps, the trajectories ``metrics_fn`` receives;
  ``env_part_names``: what ``weights_dict`` can load, as plain data a pool can unpickle
  without torch.

The same code runs in a worker actor and in-process; ``tests/test_layout.py`` imports
it with Ray blocked.
"""
