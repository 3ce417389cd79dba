"""Processes run as a container's are: in a new pid namespace, where the first process is pid 1, so that
a process started after a killed one gets the pid the killed one had, on the same host name."""

import os
import signal
import subprocess
from pathlib import Path

import pytest

IN_NEW_PIDS = ["unshare", "--pid", "--fork", "--mount-proc"]

needs_new_pids = pytest.mark.skipif(
    subprocess.run([*IN_NEW_PIDS, "true"], capture_output=True).returncode != 0,
    reason="needs unshare with new pid namespaces (root, or user namespaces)",
)


def killed_in_new_pids(command: list[str], ready: bytes) -> None:
    """`command` run as a container's first process, then SIGKILLed once it prints the line `ready`."""
    started = subprocess.Popen([*IN_NEW_PIDS, *command], stdout=subprocess.PIPE)
    try:
        assert started.stdout.readline() == ready
        (child,) = Path(f"/proc/{started.pid}/task/{started.pid}/children").read_text().split()
        os.kill(int(child), signal.SIGKILL)
    finally:
        started.wait()
