"""What the CI scripts that run sidekey for real share: ephemeral ports, waiting for a
process with a deadline, the in-repo mock vendor, and stopping every process started (by
pid, SIGTERM then SIGKILL) and removing the scratch directory, whatever happens.

    with Harness("metrics-check", "sidekey-metrics.") as h:
        mock_port = h.start_mock(bins, "--miradore-key", KEY)
        sk = h.start([sidekey, "serve", ...], env=env)
        h.wait_until("sidekey /readyz", lambda: ready(admin_port), sk)
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

DEADLINE_S = 60


class Harness:
    def __init__(self, name, tmp_prefix):
        self.name = name
        self.tmp_prefix = tmp_prefix
        self.procs = []
        self.tmp = None

    def __enter__(self):
        self.tmp = tempfile.mkdtemp(prefix=self.tmp_prefix)
        return self

    def __exit__(self, *exc):
        for proc in self.procs:
            proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(self.tmp, ignore_errors=True)
        return False

    def fail(self, message):
        sys.exit(f"{self.name}: {message}")

    def start(self, argv, **kwargs):
        """A process stopped when the harness ends."""
        proc = subprocess.Popen(argv, **kwargs)
        self.procs.append(proc)
        return proc

    def wait_until(self, what, cond, proc):
        """Polls `cond` until it holds; fails if `proc` exits first or after DEADLINE_S."""
        end = time.monotonic() + DEADLINE_S
        while not cond():
            if proc.poll() is not None:
                self.fail(f"{what}: process exited with {proc.returncode}")
            if time.monotonic() > end:
                self.fail(f"{what} not within {DEADLINE_S} s")
            time.sleep(0.05)

    def start_mock(self, bins, *args):
        """The mock vendor (examples/mock_vendor.rs) on an ephemeral port, with its own CA
        in the scratch directory; returns (port, the CA's directory)."""
        mock_dir = os.path.join(self.tmp, "mock")
        mock = self.start([
            os.path.join(bins, "examples", "mock_vendor"), "--port", "0", "--ca-dir", mock_dir,
            *args,
        ])
        port_file = os.path.join(mock_dir, "port")
        self.wait_until("the mock vendor", lambda: os.path.exists(port_file), mock)
        with open(port_file) as f:
            return int(f.read().strip()), mock_dir


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ready(port):
    """Whether sidekey's admin listener on `port` answers /readyz with 200."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False
