"""Process helpers for the command-line tests: start in a new session, clean up by pid.

Every process a test starts runs in a session of its own, so whatever it
spawns (a local Ray: GCS, raylet, workers) can be found by session id and
ended by pid afterwards, without touching anything the test did not start.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
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


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free on this machine right now."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class RayHead:
    """``ray start --head --block`` on free local ports and its own temp dir, in a
    session of its own: whatever it starts (its nodes' processes too) is ended by
    pid at ``stop``, and nothing else on the machine is touched.

    Its ports are chosen when it is created (``gcs_port``, ``dashboard``), so that a
    config naming them can be written before ``start``.
    """

    def __init__(self, temp_dir: Path) -> None:
        self.temp_dir = temp_dir
        self._ports = free_ports(7)
        self.gcs_port = self._ports[0]
        self.dashboard = f"http://127.0.0.1:{self._ports[1]}"
        self.log = temp_dir / "head.log"
        self.proc: subprocess.Popen | None = None

    def start(
        self, args: list[str], env: dict[str, str] | None = None, timeout: float = 120.0
    ) -> None:
        """Start it with more ``ray start`` arguments ``args``; return once it is up."""
        gcs, dashboard, client, agent, agent_grpc, metrics, runtime_env = self._ports
        self.proc = start(
            [
                str(BIN / "ray"),
                "start",
                "--head",
                "--block",
                f"--port={gcs}",
                f"--dashboard-port={dashboard}",
                f"--ray-client-server-port={client}",
                f"--dashboard-agent-listen-port={agent}",
                f"--dashboard-agent-grpc-port={agent_grpc}",
                f"--metrics-export-port={metrics}",
                f"--runtime-env-agent-port={runtime_env}",
                f"--temp-dir={self.temp_dir}",
                "--disable-usage-stats",
                *args,
            ],
            env=env or env_for_subprocess(),
            stdout=self.log.open("w"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while "Ray runtime started" not in self.log.read_text():
            assert self.proc.poll() is None, f"ray start failed:\n{self.log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, (
                f"ray start timed out:\n{self.log.read_text()[-3000:]}"
            )
            time.sleep(0.25)

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM to ``ray start`` (it stops what it started), then every process left
        in its session by pid; none may be left. The temp dir goes too."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        if self.proc is not None:
            end_session(self.proc.pid, grace=grace)
            assert not session_pids(self.proc.pid)
        subprocess.run(["rm", "-rf", str(self.temp_dir)], check=False)
