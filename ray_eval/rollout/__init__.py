"""ray_eval.rollout."""
