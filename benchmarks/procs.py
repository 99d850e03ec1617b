"""Server processes: start one (its own session, logs to a file), wait until it is ready,
watch its RSS and CPU (the whole process tree) while load runs, stop it by its own pid."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import psutil


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_model_dir(models_dir: Path, model: str, into: Path) -> Path:
    """A models_dir holding only `model` (a link to its folder): a server measured on one
    model opens no other (`make export-defaults` puts a generator beside the embedder, whose
    memory and start-up would count against the one measured)."""
    only = into / f"models-{model}"
    only.mkdir(parents=True, exist_ok=True)
    link = only / model
    if not link.exists():
        link.symlink_to((models_dir / model).resolve(), target_is_directory=True)
    return only


class Server:
    def __init__(
        self,
        name: str,
        cmd: list[str],
        *,
        ready_url: str,
        log: Path,
        cwd: Path,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.cmd = cmd
        self.ready_url = ready_url
        self.log = log
        self.cwd = cwd
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.startup_s: float | None = None

    def start(self, timeout: float = 240.0) -> float:
        """Spawn and wait for `ready_url` to answer 200; returns seconds to ready."""
        out = self.log.open("ab")
        started = time.perf_counter()
        self.proc = subprocess.Popen(
            self.cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=self.cwd,
            env=self.env,
            start_new_session=True,
        )
        out.close()
        deadline = started + timeout
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode} before it was ready; "
                    f"last log lines: {self.tail()}"
                )
            try:
                if httpx.get(self.ready_url, timeout=2).status_code == 200:
                    self.startup_s = time.perf_counter() - started
                    return self.startup_s
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.name} was not ready after {timeout:.0f}s: {self.tail()}")

    def tail(self, lines: int = 5) -> str:
        try:
            text = self.log.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(line[:200] for line in text[-lines:])

    def stop(self) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            # The group is the one this harness created for this server (start_new_session).
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


class Monitor:
    """Samples the RSS of a process tree every `interval` seconds; CPU time on demand."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.root = psutil.Process(pid)
        self.interval = interval
        self.peak_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def tree(self) -> list[psutil.Process]:
        try:
            return [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return []

    def rss(self) -> int:
        total = 0
        for p in self.tree():
            with contextlib.suppress(psutil.Error):
                total += p.memory_info().rss
        return total

    def cpu_seconds(self) -> float:
        total = 0.0
        for p in self.tree():
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
        return total

    def reset_peak(self) -> None:
        self.peak_rss = self.rss()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_rss = max(self.peak_rss, self.rss())

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)

    def wait_idle(self, threshold_pct: float = 15.0, window: float = 0.3, cap: float = 60.0):
        """Wait until the tree uses under `threshold_pct` of a core (work left over from the
        last load has drained); returns the seconds waited."""
        start = time.perf_counter()
        while time.perf_counter() - start < cap:
            c0, t0 = self.cpu_seconds(), time.perf_counter()
            time.sleep(window)
            if (self.cpu_seconds() - c0) / (time.perf_counter() - t0) * 100 < threshold_pct:
                break
        return time.perf_counter() - start
