"""`framecast serve` as a subprocess on 127.0.0.1 and a free port, for tests that need the real command."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Served:
    port: int
    output: str = ""  # what the command printed, once it has ended


@contextmanager
def framecast_serve(*args: str, token: str, timeout_s: float = 60.0) -> Iterator[Served]:
    """Start `framecast serve --port N --token T <args>`; yield once /metrics answers; terminate it on exit."""
    served = Served(free_port())
    process = subprocess.Popen(
        [sys.executable, "-m", "framecast.stream.cli", "serve", "--port", str(served.port), "--token", token, *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{served.port}/metrics", timeout=2) as response:
                    response.read()
                break
            except OSError:
                assert process.poll() is None, process.stdout.read()
                assert time.monotonic() < deadline, f"the server did not answer within {timeout_s:.0f} s"
                time.sleep(0.2)
        yield served
    finally:
        process.terminate()
        served.output = process.communicate(timeout=20)[0]
