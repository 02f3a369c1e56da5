"""ray_eval.backends."""
