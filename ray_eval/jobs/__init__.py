"""ray_eval.jobs."""
