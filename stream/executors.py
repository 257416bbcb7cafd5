"""Where the lanes' packets run: in this process, or across stage worker processes over torch.distributed.

Both take packets in order (`submit`) and hand back the outputs of the packets that asked for one (`result`), in
submission order: a pipeline is first in, first out, so the orchestrator always knows whose output comes next.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from typing import Protocol

from framecast.models.dit import CausalWanDiT
from framecast.stream.engine import EngineConfig
from framecast.stream.stage import Stage, stage_specs
from framecast.stream.stage_worker import WorkerSpec, spare_main, worker_main
from framecast.stream.wire import (
    Kind, Packet, StageFailed, free_port, open_group, receive_forever, wait_watched, watched,
)


class Executor(Protocol):
    def submit(self, packet: Packet) -> None: ...  # non-blocking where the executor can be
    def result(self) -> Packet: ...  # the next output packet, in submission order; raises StageFailed
    stage_busy_s: list[float]  # seconds each stage has computed, as of the newest output
    def close(self, graceful: bool = True) -> None: ...

    @property
    def describe(self) -> str: ...


class LocalExecutor:
    """All stages in this process, one after the other (the one-process fallback; also the split's unit test)."""

    def __init__(self, dit: CausalWanDiT, config: EngineConfig, lanes: int, split: Sequence[range] | None = None) -> None:
        split = tuple(split) if split else (range(dit.config.num_layers),)
        self.stages = [Stage(dit, spec, config, lanes, own_model=False) for spec in stage_specs(split)]
        self.stage_busy_s = [0.0] * len(self.stages)
        self._outputs: deque[Packet] = deque()

    def submit(self, packet: Packet) -> None:
        for stage in self.stages:
            packet = stage.run(packet)
        self.stage_busy_s = [stage.busy_s for stage in self.stages]
        if packet.output:
            self._outputs.append(packet)

    def result(self) -> Packet:
        return self._outputs.popleft()

    def close(self, graceful: bool = True) -> None:
        self._outputs.clear()

    @property
    def describe(self) -> str:
        return f"local ({len(self.stages)} stage(s) in one process)"


def _kill_and_join(processes: list, receiver: threading.Thread | None) -> None:
    """Kill the stage processes still running, then wait for the receiver thread: its wait fails once the stages
    are gone, and a thread still inside gloo when the interpreter exits would abort the process."""
    for process in processes:
        if process.is_alive():
            process.kill()
            process.join(1.0)
    if receiver is not None:
        receiver.join(2.0)


class SparePool:
    """Warm spare stage processes (torch imported, model built) waiting for a stage: a rebuild onto fresh processes
    then costs the group's rendezvous, not a process start and a model load."""

    def __init__(self, model: Callable[..., CausalWanDiT], count: int, threads: int = 1, device: str = "cpu") -> None:
        self.model, self.threads, self.device = model, threads, device
        self._spares: list = []
        self.add(count)

    def add(self, count: int) -> None:
        context = multiprocessing.get_context("spawn")
        for _ in range(count):
            mine, theirs = context.Pipe()
            process = context.Process(
                target=spare_main, args=(self.model, self.device, self.threads, theirs, os.getpid()), daemon=True,
                name="spare stage",
            )
            process.start()
            self._spares.append((process, mine))

    def take(self, count: int) -> list:
        """Up to `count` live spares, as (process, control pipe) pairs; they leave the pool."""
        self._spares = [(process, pipe) for process, pipe in self._spares if process.is_alive()]
        taken, self._spares = self._spares[:count], self._spares[count:]
        return taken

    def __len__(self) -> int:
        return sum(1 for process, _ in self._spares if process.is_alive())

    def close(self) -> None:
        for process, pipe in self._spares:
            pipe.close()
            if process.is_alive():
                process.kill()
                process.join(1.0)
        self._spares.clear()


class PipelineExecutor:
    """One spawned process per stage, joined in a process group with this process as rank 0.

    `result()` polls its receive and raises StageFailed when a stage process has died, a connection broke, or the
    output has not come within `stage_timeout_s` of the moment it became due (a hung stage).
    """

    def __init__(
        self,
        model: Callable[..., CausalWanDiT],
        config: EngineConfig,
        lanes: int,
        split: Sequence[range],
        *,
        backend: str = "gloo",
        addr: str = "127.0.0.1",
        port: int | None = None,
        threads: int = 1,
        devices: Sequence[str] | None = None,
        start_timeout_s: float = 60.0,
        stage_timeout_s: float = 10.0,
        idle_timeout_s: float = 24 * 3600.0,
        pin: bool = False,
        spares: list | None = None,
    ) -> None:
        """`spares`: (process, pipe) pairs from a SparePool, used for the first stages instead of new processes."""
        specs = stage_specs(tuple(split))
        cpus = sorted(os.sched_getaffinity(0)) if pin else []
        self.stage_timeout_s = stage_timeout_s
        port = port or free_port(addr)
        devices = list(devices) if devices else ["cpu"] * len(specs)
        context = multiprocessing.get_context("spawn")
        self.processes = []
        for spec, device in zip(specs, devices):
            worker = WorkerSpec(
                spec, model, config, lanes, backend, addr, port, threads, device, start_timeout_s, idle_timeout_s,
                cpus=(cpus[spec.index % len(cpus)],) if cpus else None,
            )
            if spares:
                process, pipe = spares.pop(0)
                pipe.send(worker)
            else:
                process = context.Process(target=worker_main, args=(worker, os.getpid()), daemon=True, name=f"stage-{spec.index}")
                process.start()
            self.processes.append(process)
        self.specs = specs
        self.stage_busy_s = [0.0] * len(specs)  # each stage's compute seconds, as of the newest output
        self._closed = False
        self._results: queue.Queue = queue.Queue()
        try:
            deadline = time.monotonic() + start_timeout_s
            self.group = watched(
                lambda: open_group(
                    backend, addr, port, 0, len(specs) + 1, start_timeout_s=start_timeout_s,
                    idle_timeout_s=idle_timeout_s, device=devices[0] if backend == "nccl" else "cpu",
                ),
                deadline, self._alive, "starting the pipeline",
            )
            for rank in range(1, len(specs) + 1):
                ready = watched(lambda: self.group.recv(rank), deadline, self._alive, f"waiting for stage {rank - 1}")
                if ready.kind is not Kind.READY:
                    raise StageFailed(f"rank {rank} sent {ready.kind.name} before READY")
        except BaseException:
            self.close()
            raise
        self._receiver = threading.Thread(  # the last stage's outputs
            target=receive_forever, args=(self.group, len(specs), self._results), daemon=True, name="pipeline results")
        self._receiver.start()
        # a pipeline left open at interpreter exit: stop its stages so that no thread is inside gloo at teardown
        self._at_exit = weakref.finalize(self, _kill_and_join, self.processes, self._receiver)

    def _alive(self) -> bool:
        return all(process.is_alive() for process in self.processes)

    def dead_stages(self) -> list[int]:
        return [index for index, process in enumerate(self.processes) if not process.is_alive()]

    def submit(self, packet: Packet) -> None:
        self.group.isend(packet, 1)

    def result(self) -> Packet:
        deadline = time.monotonic() + self.stage_timeout_s
        try:
            packet = wait_watched(self._results, deadline, self._alive, "waiting for the pipeline's output")
        except StageFailed as error:
            dead = self.dead_stages()
            detail = f"stage(s) {dead} died (exit codes {[self.processes[i].exitcode for i in dead]})" if dead else str(error)
            raise StageFailed(f"pipeline of {len(self.specs)} stages failed: {detail}") from error
        if packet.kind is Kind.CALL:
            self.stage_busy_s = [us / 1e6 for us in packet.busy_us[: len(self.specs)]]
        return packet

    def close(self, graceful: bool = True) -> None:
        """Stop the workers: a STOP packet when all are alive (and `graceful`), then kill whatever still runs."""
        if self._closed:
            return
        self._closed = True
        if graceful and hasattr(self, "group") and self._alive():
            try:
                self.group.isend(Packet(lane=0, kind=Kind.STOP), 1)
            except (RuntimeError, StageFailed):
                pass
        deadline = time.monotonic() + (2.0 if graceful else 0.0)
        for process in self.processes:
            process.join(max(0.0, deadline - time.monotonic()))
        if hasattr(self, "_at_exit"):
            self._at_exit()
        else:
            _kill_and_join(self.processes, None)

    @property
    def describe(self) -> str:
        return f"pipeline of {len(self.specs)} stage processes, layers {[(s.layers.start, s.layers.stop) for s in self.specs]}"
