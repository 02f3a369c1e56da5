"""What an evaluation gives back: episodes, statistics, files, tables, plots, video.

- ``episodes``: per-episode outcomes (``EpisodeData``).
- ``metrics``: aggregation into the flat result dict and its statistics (``EvalResult``).
- ``results_file``: the JSONL results file, appended atomically.
- ``display``, ``plotting``, ``video``: tables and progress, reward curves, video files.

The lowest wing: it imports no other wing.
"""
