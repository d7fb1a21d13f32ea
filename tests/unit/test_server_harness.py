"""The test harness never leaves a ComfyUI server behind: a stand-in server process started by
the harness dies with the pytest process that started it, however that process ends."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

CHILD = textwrap.dedent("""
    import subprocess, sys, time
    from stylekit.tests.support import server as s
    # The harness's own start path with a stand-in command (no ComfyUI needed): sleep forever.
    s.server_command = lambda *a, **k: [sys.executable, "-c", "import time; time.sleep(600)"]
    srv = s.ComfyServer(port=s.free_port())
    srv.get = lambda *a, **k: {}
    srv.start(timeout=5)
    print(srv.process.pid, flush=True)
    time.sleep(600)
""")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] != "Z"


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL])
def test_the_server_is_stopped_when_the_test_run_is_terminated(how):
    if not sys.platform.startswith("linux"):
        pytest.skip("Linux process checks")
    runner = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True)
    server_pid = int(runner.stdout.readline())
    assert _alive(server_pid)
    runner.send_signal(how)
    runner.wait(timeout=30)
    deadline = time.monotonic() + 15
    while _alive(server_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(server_pid), f"the server outlived a {signal.Signals(how).name} to the test run"
