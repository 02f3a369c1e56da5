"""Video of recorded episodes: frames rendered on the workers, files written here.

With ``record_video=k`` the first ``k`` episodes of each evaluation (per suite
member) render an RGB frame after reset and after every step; the other
episodes never render, so they run at full speed. The driver writes one file
per recorded episode (MP4 through imageio's ffmpeg plugin, or GIF) and/or hands
the frames to a TorchRL logger's ``log_video``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

VIDEO_FORMATS = ("mp4", "gif")


def check_renders(env, name: str) -> None:
    """Raise ``ValueError`` unless ``env`` renders RGB arrays."""
    mode = _render_mode(env)
    if mode != "rgb_array":
        raise ValueError(
            f"record_video needs env {name!r} to render RGB frames, but its render_mode is "
            f"{mode!r}: create it with render_mode='rgb_array' (a gymnasium id is made so "
            f"automatically)"
        )


def _render_mode(env) -> str | None:
    base = env
    while hasattr(base, "base_env"):  # TorchRL TransformedEnv
        base = base.base_env
    inner = getattr(base, "_env", base)  # TorchRL GymEnv -> gymnasium env
    return getattr(inner, "render_mode", None)


def write_video(frames: np.ndarray, path: Path, fps: int = 30) -> Path:
    """Write ``(T, H, W, 3)`` uint8 frames to ``path`` (its suffix picks MP4 or GIF)."""
    import imageio.v3 as iio

    path.parent.mkdir(parents=True, exist_ok=True)
    frames = np.ascontiguousarray(frames, dtype=np.uint8)
    if path.suffix == ".gif":
        iio.imwrite(path, frames, duration=1000 / fps, loop=0)
    else:
        iio.imwrite(path, frames, fps=fps, codec="libx264", macro_block_size=1)
    return path


def publish_videos(
    result,
    *,
    prefix: str,
    directory: str | Path | None,
    video_format: str,
    fps: int,
    logger=None,
) -> list[str]:
    """Write the result's recorded episodes to files and/or ``logger.log_video``."""
    episodes = result.episodes
    if episodes is None or not episodes.frames:
        return []
    step = int(result[f"{prefix}/step"])
    written = []
    for (member, index), frames in sorted(episodes.frames.items()):
        tag = f"{member}_" if member else ""
        if directory is not None:
            path = Path(directory) / f"{prefix}_{tag}step{step}_episode{index}.{video_format}"
            written.append(str(write_video(frames, path, fps)))
        if logger is not None:
            import torch

            # TorchRL loggers take (N, T, C, H, W) uint8.
            video = torch.from_numpy(np.array(frames)).permute(0, 3, 1, 2)[None]
            name = f"{prefix}/{member}/video_{index}" if member else f"{prefix}/video_{index}"
            logger.log_video(name, video, step=step)
    return written
