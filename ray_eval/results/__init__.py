"""ray_eval.results."""
