"""Where evaluations run: a pool of Ray actors, or this process.

- ``ray_backend``: the Ray backend; the one ``ray.put`` of the weights happens here.
- ``pool``: the ``WorkerPool`` actor that owns the workers, hands out chunks, restarts them.
- ``worker``: the worker actor's body: env copies and a policy, built once, run per chunk.
- ``local_backend``: the same worker in this process, on a background thread (no Ray).
- ``resources``, ``ray_session``: can the cluster host the workers; connecting to Ray.
- ``pickling``, ``env_instances``: what travels to the workers, user modules by value.

This file imports nothing: the pool actor imports ``backends.pool`` and must not pay
for torch and TorchRL.
"""
