"""Running a multi-process launch (torchrun, accelerate launch) from a test, never leaving processes behind."""

from __future__ import annotations

import os
import signal
import subprocess


def run_launch(cmd: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    """Run `cmd` in its own process group; past `timeout` seconds kill the whole group (the launcher and every
    process it started, which would otherwise wait on each other forever) and raise `subprocess.TimeoutExpired`."""
    with subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    ) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
