"""The process of one pipeline stage: join the group, build the stage, then receive -> run -> send until told to stop.

Rank r = stage index + 1 receives from rank r - 1 (rank 0, the orchestrator, feeds the first stage) and sends to
rank r + 1, the last stage back to rank 0. A worker whose orchestrator is gone exits by itself (a watchdog thread
checks the parent), so a crashed test or server leaves no process behind.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import traceback
from dataclasses import dataclass, replace
from typing import Callable

import torch

from framecast.models.dit import CausalWanDiT
from framecast.stream.engine import EngineConfig
from framecast.stream.migration import give_layer, take_layer
from framecast.stream.stage import Stage, StageSpec
from framecast.stream.wire import Kind, Packet, StageFailed, open_group


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a stage process needs, picklable for `spawn`."""

    stage: StageSpec
    model: Callable[..., CausalWanDiT]  # e.g. RandomDiT, CheckpointDiT
    config: EngineConfig
    lanes: int
    backend: str
    addr: str
    port: int
    threads: int
    device: str
    start_timeout_s: float
    idle_timeout_s: float
    cpus: tuple[int, ...] | None = None  # CPU affinity of the process (None: the OS decides)

    @property
    def rank(self) -> int:
        return self.stage.index + 1

    @property
    def world(self) -> int:
        return self.stage.count + 1


def _exit_when_orphaned(parent: int) -> None:
    while True:
        if os.getppid() != parent:
            os._exit(0)
        time.sleep(0.5)


def _migrate(stage: Stage, group, packet: Packet, target: int) -> None:
    """Layer `packet.frames` moves to stage `packet.lane`, in order with the lanes' packets. A forward move rides on
    the packet; a backward move comes back from the next stage over its own message. The packet goes on to the last
    stage, which acknowledges it to the orchestrator."""
    layer, destination, me = packet.frames, packet.lane, stage.spec.index
    onward = replace(packet, tensors=())
    if layer in stage.spec.layers:  # we give
        blob = give_layer(stage, layer)
        if destination == me + 1:
            group.isend(replace(packet, tensors=(blob,)), target)
            return
        group.isend(replace(packet, tensors=(blob,)), destination + 1)
    elif destination == me:  # we take
        if packet.tensors:
            take_layer(stage, layer, packet.tensors[0])
        else:
            group.isend(onward, target)  # the giver is the next stage: let it see the packet, then get the layer
            take_layer(stage, layer, group.recv(me + 2).tensors[0])
            return
    group.isend(replace(onward, output=True) if stage.spec.is_last else onward, target)


def spare_main(model: Callable[..., CausalWanDiT], device: str, threads: int, control, parent: int) -> None:
    """Entry point of a warm spare: import torch and build the model now, then wait (on the `control` pipe) for the
    WorkerSpec of the stage to run, so that a rebuild does not wait for a process to start."""
    threading.Thread(target=_exit_when_orphaned, args=(parent,), daemon=True).start()
    torch.set_num_threads(threads)
    dit = model(device)
    try:
        spec = control.recv()
    except EOFError:  # the orchestrator closed the pipe: no stage for us
        os._exit(0)
    worker_main(spec, parent, dit)


def worker_main(spec: WorkerSpec, parent: int, dit: CausalWanDiT | None = None) -> None:
    """Entry point of a spawned stage process (`dit`: a model a spare built already)."""
    threading.Thread(target=_exit_when_orphaned, args=(parent,), daemon=True).start()
    torch.set_num_threads(spec.threads)
    if spec.cpus:
        os.sched_setaffinity(0, spec.cpus)
    try:
        group = open_group(
            spec.backend, spec.addr, spec.port, spec.rank, spec.world, start_timeout_s=spec.start_timeout_s,
            idle_timeout_s=spec.idle_timeout_s, device=spec.device,
        )
        stage = Stage(dit if dit is not None else spec.model(spec.device), spec.stage, spec.config, spec.lanes)
        group.isend(Packet(lane=0, kind=Kind.READY), 0)
        source = spec.rank - 1
        target = (spec.rank + 1) % spec.world
        while True:
            packet = group.recv(source)
            if packet.kind is Kind.STOP:
                if not spec.stage.is_last:
                    group.isend(packet, target)
                break
            if packet.kind is Kind.MIGRATE:
                _migrate(stage, group, packet, target)
                continue
            out = stage.run(packet)
            if not spec.stage.is_last or out.output:
                group.isend(out, target)
        group.flush()
        os._exit(0)  # skip interpreter teardown: the orchestrator is waiting to rebuild or finish
    except StageFailed:
        os._exit(3)  # a neighbour is gone; the orchestrator rebuilds without us
    except BaseException:
        traceback.print_exc(file=sys.stderr)
        sys.stderr.flush()
        os._exit(2)
