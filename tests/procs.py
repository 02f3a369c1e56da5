"""Process helpers for the command-line tests: start in a new session, clean up by pid.

Every process a test starts runs in a session of its own, so whatever it
spawns (a local Ray: GCS, raylet, workers) can be found by session id and
ended by pid afterwards, without touching anything the test did not start.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the virtualenv's bin: ray, ray-eval


def env_for_subprocess(**extra: str) -> dict[str, str]:
    """This environment with the virtualenv first on PATH and no Ray address inherited."""
    env = {
        k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")
    }
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def session_pids(sid: int) -> list[int]:
    """Pids of the live processes in session ``sid`` (read from /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        state, session = fields[0], int(fields[3])
        if session == sid and state != "Z":
            pids.append(int(entry.name))
    return pids


def end_session(sid: int, *, grace: float = 10.0) -> None:
    """SIGTERM then SIGKILL every process of session ``sid``, by pid; wait until none is left."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        for pid in session_pids(sid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while session_pids(sid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not session_pids(sid):
            return
    left = session_pids(sid)
    assert not left, f"processes of session {sid} still alive: {left}"


def start(args: list[str], **kwargs) -> subprocess.Popen:
    """Popen in a new session (its pid is the session id)."""
    kwargs.setdefault("env", env_for_subprocess())
    kwargs.setdefault("cwd", ROOT)
    return subprocess.Popen(args, start_new_session=True, **kwargs)
