"""``python -m swarm`` nodes as child processes: start, read their announcements, stop.

Used by ``demo`` (and by tests and benchmarks). Each child runs in its own session (a
Ctrl-C in the parent's terminal reaches the parent only, which stops the children itself),
its stdout lines are read by a thread into a queue, its stderr goes to a log file. On Linux
a child also gets SIGTERM when the thread that started it dies (killed test runs and crashed
demos leave no node behind); start children from a thread that outlives them.
"""

from __future__ import annotations

import ctypes
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child, before exec: ask the kernel for SIGTERM when the parent goes away."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class NodeFailed(RuntimeError):
    """A child node exited, or did not say what was expected in time."""


class NodeProcess:
    """One ``python -m swarm <args>`` child process."""

    def __init__(
        self,
        args: Sequence[str],
        *,
        log_path: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.args = list(args)
        self.log_path = log_path
        self._log = open(log_path, "w") if log_path is not None else subprocess.DEVNULL
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "swarm", *self.args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            bufsize=1,
            env={**os.environ, **(env or {})},
            start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
        self.lines: list[str] = []
        """The stdout lines read so far (all of them once the process is stopped)."""
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def __repr__(self) -> str:
        return f"<NodeProcess {self.popen.pid} swarm {' '.join(self.args[:1])}>"

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, prefix: str, timeout: float) -> str:
        """The next stdout line starting with ``prefix`` (``NodeFailed`` if none comes)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise NodeFailed(f"{self!r} said no {prefix!r} within {timeout:g}s{self._tail()}")
            try:
                line = self._queue.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                self._queue.put(None)
                code = self.popen.wait()
                raise NodeFailed(f"{self!r} exited with {code} before {prefix!r}{self._tail()}")
            self.lines.append(line)
            if line.startswith(prefix):
                return line

    def addr(self, timeout: float) -> str:
        """The first multiaddr the node listens on."""
        return self.wait_for("listening on ", timeout).removeprefix("listening on ")

    def _tail(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        lines = self.log_path.read_text(errors="replace").splitlines()[-15:]
        return "; its log ends:\n" + "\n".join(lines)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGINT (a graceful stop), then SIGKILL after ``timeout``; the exit code."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGINT)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._close()
        return self.popen.wait()

    def kill(self) -> None:
        """SIGKILL the process (and wait for it)."""
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait()
        self._close()

    def _close(self) -> None:
        self._reader.join(timeout=5)
        while not self._queue.empty():
            line = self._queue.get_nowait()
            if line is not None:
                self.lines.append(line)
        if self.popen.stdout is not None:
            self.popen.stdout.close()
        if not isinstance(self._log, int):
            self._log.close()


def stop_all(nodes: Sequence[NodeProcess], timeout: float = 30.0) -> None:
    """Stop every node gracefully, all at once, killing those that take too long."""
    for node in nodes:
        if node.popen.poll() is None:
            node.popen.send_signal(signal.SIGINT)
    deadline = time.monotonic() + timeout
    for node in nodes:
        try:
            node.popen.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        node.kill()
