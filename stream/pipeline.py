"""The pipeline-parallel orchestrator: lanes of streams through N stage processes, with rebuild on faults.

    orchestrator (rank 0): lanes (sampler, history, controls) --packets--> stage 0 -> stage 1 -> ... -> stage N-1
                           <-------------------------------- flows ------------------------------------------/

Each stage process owns a contiguous range of layers and those layers' cache (`stream/stage.py`); activations go
from rank to rank with torch.distributed send/recv (gloo on CPUs, NCCL on GPUs). Every lane is a stream that equals
`StreamEngine` bit for bit (same calls, same order, same noise); controls travel with the chunk they apply to, and
a prompt switch's recache runs inside the pipeline, without a restart.

Why lanes: one stream cannot keep N stages busy. Each denoising step needs the previous step's output through the
whole network, so only the clean context pass of chunk c overlaps step 0 of chunk c+1 (with 4 steps, at most
~1.11x on 2 stages). With L independent lanes in flight, stage k works on lane A while stage k-1 works on lane B.

Balance: the first split minimises the slowest stage from measured per-layer times (`layer_split`); while running,
every stage reports its compute seconds in each packet, and when their rates drift apart a boundary layer moves to
the neighbour with its weights and every lane's cache (`migration`), in order with the packets, without a pause or a
change in any number.

Faults: a stage that dies, breaks its connection or does not answer within `stage_timeout_s` raises StageFailed
inside `chunks()`; the orchestrator drops the pipeline, rebuilds it (`on_fault`: in this process, or N-1 fresh
stage processes), rebuilds every lane's memory from its last committed chunk, and goes on. Chunk numbers go on
without a gap or a repeat.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from framecast.models.config import DiTConfig
from framecast.models.dit import CausalWanDiT
from framecast.models.errors import ConfigError
from framecast.stream.engine import EngineConfig, LatentChunk, SwitchPolicy
from framecast.stream.executors import Executor, LocalExecutor, PipelineExecutor, SparePool
from framecast.stream.lane import AWAIT, Lane, Program
from framecast.stream.layer_split import (
    LayerCosts, balanced_split, even_split, measure_layer_seconds, move_layer, rebalance_move, split_from_sizes,
)
from framecast.stream.noise import GaussianNoise, NoiseSource
from framecast.stream.stream_batch import StaggeredLane
from framecast.stream.wire import MAX_STAGES, Kind, Packet, StageFailed

log = logging.getLogger(__name__)

FAULT_POLICIES = ("local", "fewer-stages")
_MIGRATION = -1  # in the queue of awaited outputs: a layer move's acknowledgement


@dataclass(frozen=True)
class PipelineConfig:
    """How the stages are laid out and watched."""

    stages: int = 2
    layers_per_stage: tuple[int, ...] | None = None  # None: balanced from measured per-layer times (or even)
    balance: bool = True  # measure per-layer times in this process and balance; False: even split
    standby: bool = True  # keep a model in this process for the one-process rebuild (a fault costs no load time)
    backend: str = "gloo"  # "nccl" on GPUs
    devices: tuple[str, ...] | None = None  # one per stage; default all "cpu"
    threads_per_stage: int = 1
    pin_stages: bool = False  # pin stage i to the i-th CPU this process may use (no migrations between cores)
    addr: str = "127.0.0.1"
    port: int | None = None  # None: a free port
    start_timeout_s: float = 60.0
    stage_timeout_s: float = 10.0  # an awaited output later than this is a hung stage
    on_fault: str = "local"  # "local": go on in this process; "fewer-stages": N-1 fresh stage processes
    spares: int = 0  # warm spare stage processes kept for "fewer-stages" rebuilds (refilled after each use)
    # torch threads of this process after a one-process rebuild (None: threads_per_stage, so the fallback runs like
    # one stage doing every layer). An OpenMP pool wider than the free cores stalls on every op of a loaded machine.
    fallback_threads: int | None = None
    max_rebuilds: int = 3
    rebalance: bool = True  # move layers between neighbouring stages while running when their measured times differ
    rebalance_window: int = 32  # outputs (denoising steps) per measurement window
    rebalance_tolerance: float = 0.15  # move only when the slowest stage gets this much faster (fraction)

    def __post_init__(self) -> None:
        if not isinstance(self.stages, int) or not 1 <= self.stages <= MAX_STAGES:
            raise ConfigError(f"stages={self.stages!r} must be an integer in [1, {MAX_STAGES}]")
        if self.layers_per_stage is not None and len(self.layers_per_stage) != self.stages:
            raise ConfigError(f"layers_per_stage={self.layers_per_stage} must have one entry per stage ({self.stages})")
        if self.devices is not None and len(self.devices) != self.stages:
            raise ConfigError(f"devices={self.devices} must have one entry per stage ({self.stages})")
        if not isinstance(self.spares, int) or self.spares < 0:
            raise ConfigError(f"spares={self.spares!r} must be an integer >= 0")
        if self.on_fault not in FAULT_POLICIES:
            raise ConfigError(f"on_fault={self.on_fault!r} must be one of {FAULT_POLICIES}")
        for name in ("start_timeout_s", "stage_timeout_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name}={getattr(self, name)!r} must be > 0")
        if self.fallback_threads is not None and (not isinstance(self.fallback_threads, int) or self.fallback_threads < 1):
            raise ConfigError(f"fallback_threads={self.fallback_threads!r} must be a positive integer or None")
        if not isinstance(self.rebalance_window, int) or self.rebalance_window < 1:
            raise ConfigError(f"rebalance_window={self.rebalance_window!r} must be a positive integer")
        if not 0 <= self.rebalance_tolerance < 1:
            raise ConfigError(f"rebalance_tolerance={self.rebalance_tolerance!r} must be in [0, 1)")
        if self.backend not in ("gloo", "nccl"):
            raise ConfigError(f"backend={self.backend!r} must be 'gloo' (CPUs) or 'nccl' (GPUs)")
        if not isinstance(self.threads_per_stage, int) or self.threads_per_stage < 1:
            raise ConfigError(f"threads_per_stage={self.threads_per_stage!r} must be a positive integer")


def make_lanes(
    dit_config: DiTConfig, config: EngineConfig, prompts: Sequence[Tensor], dtype: torch.dtype,
    noises: Sequence[NoiseSource] | None = None,
) -> list[Lane | StaggeredLane]:
    """One lane per prompt, each with its own stage memories (a staggered lane with `config.stream_batch` uses one
    per denoising step); lane i draws its noise from seed `config.seed + i` unless `noises` are given."""
    kind = StaggeredLane if config.stream_batch else Lane
    lanes, memory = [], 0
    for index, prompt in enumerate(prompts):
        noise = noises[index] if noises else GaussianNoise(config.seed + index)
        lanes.append(kind(index, dit_config, config, prompt, dtype, noise, memory=memory))
        memory += lanes[-1].memories
    return lanes


@dataclass(frozen=True)
class LaneChunk:
    lane: int
    chunk: LatentChunk


@dataclass
class Rebuild:
    """One fault and what the orchestrator did about it."""

    error: str
    detected_at: float  # time.monotonic()
    resumed_at: float
    executor: str


class PipelineEngine:
    """Streams of latent chunks from a DiT split across stage processes: `for lc in engine.chunks(): lc.lane, lc.chunk`.

    `prompts`: one prompt embedding per lane (lanes are independent streams: own prompt, noise, memory).
    `model`: a picklable recipe every process builds the DiT with (`RandomDiT`, `CheckpointDiT`).
    """

    def __init__(
        self,
        model: Callable[..., CausalWanDiT],
        config: EngineConfig,
        prompts: Sequence[Tensor],
        pipeline: PipelineConfig = PipelineConfig(),
        noises: Sequence[NoiseSource] | None = None,
        *,
        dit_config: DiTConfig | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if not prompts:
            raise ConfigError("a pipeline needs at least one lane (one prompt)")
        if noises is not None and len(noises) != len(prompts):
            raise ConfigError(f"{len(noises)} noise sources for {len(prompts)} lanes")
        self.model, self.config, self.pipeline = model, config, pipeline
        self.dit_config = dit_config or getattr(model, "config", None)
        self.dtype = dtype or getattr(model, "dtype", None)
        if self.dit_config is None or self.dtype is None:
            raise ConfigError("pass dit_config and dtype for a model recipe that does not carry them")
        self.lanes = make_lanes(self.dit_config, config, prompts, self.dtype, noises)
        self.memories = sum(lane.memories for lane in self.lanes)  # stage memories: one per lane, S per staggered lane
        self.standby: CausalWanDiT | None = None
        self.layer_costs: LayerCosts | None = None
        self.split = self._initial_split()
        self.rebuilds: list[Rebuild] = []
        self.migrations: list[tuple[int, int]] = []  # (layer, destination stage) of each move while running
        self._migrating, self._window_outputs, self._window_busy = False, 0, None
        self._requested_moves: deque[tuple[int, int]] = deque()
        self.spare_pool = SparePool(model, pipeline.spares, pipeline.threads_per_stage) if pipeline.spares else None
        try:
            self.executor: Executor = self._pipeline_executor(self.split)
        except BaseException:
            if self.spare_pool is not None:
                self.spare_pool.close()
            raise

    def _initial_split(self) -> tuple[range, ...]:
        p, layers = self.pipeline, self.dit_config.num_layers
        if p.layers_per_stage is not None:
            split = split_from_sizes(p.layers_per_stage, layers)
        elif p.balance:
            threads = torch.get_num_threads()
            torch.set_num_threads(p.threads_per_stage)  # time the layers as the stages will run them
            try:
                self.standby = self.model("cpu")
                self.layer_costs = measure_layer_seconds(self.standby, self.config)
            finally:
                torch.set_num_threads(threads)
            split = balanced_split(self.layer_costs, p.stages)
        else:
            split = even_split(layers, p.stages)
        if p.standby and self.standby is None:
            self.standby = self.model("cpu")
        return split

    def _pipeline_executor(self, split: tuple[range, ...], spares: list | None = None) -> Executor:
        p = self.pipeline
        return PipelineExecutor(
            self.model, self.config, self.memories, split, backend=p.backend, addr=p.addr, port=p.port,
            threads=p.threads_per_stage, devices=p.devices[: len(split)] if p.devices else None, pin=p.pin_stages,
            start_timeout_s=p.start_timeout_s, stage_timeout_s=p.stage_timeout_s, spares=spares,
        )

    def move_layer(self, layer: int, destination: int) -> None:
        """Move `layer` (an end of its stage's range) with its weights and cache to the neighbouring stage
        `destination`, between two packets of the running stream (chunks() sends it after its next output)."""
        move_layer(self.split, layer, destination)  # raises ConfigError now for an impossible move
        self._requested_moves.append((layer, destination))

    @property
    def stage_busy_seconds(self) -> list[float]:
        """Compute seconds of each stage of the current executor so far (as of the newest output): busy / wall is a
        stage's utilisation, and unequal busy times show an unbalanced split."""
        return list(self.executor.stage_busy_s)

    # controls, per lane; applied at that lane's next chunk boundary
    def set_prompt(self, lane: int, prompt: Tensor, policy: SwitchPolicy | None = None) -> None:
        self.lanes[lane].set_prompt(prompt, policy)

    def set_action(self, lane: int, actions: int | Tensor) -> None:
        self.lanes[lane].set_action(actions)

    def reset(self, lane: int) -> None:
        self.lanes[lane].reset()

    def set_steps(self, lane: int, steps: Sequence[int] | None) -> None:
        """Fewer denoising steps for a lane's next chunks (a sub-list keeping the first step), or all again (None)."""
        self.lanes[lane].set_steps(steps)

    # the orchestration loop
    def chunks(self) -> Iterator[LaneChunk]:
        """Chunks of all lanes as they complete, forever. A lane's next chunk starts (and takes its controls) when
        the consumer asks for the next item after that lane's previous chunk."""
        programs: dict[int, Program] = {}
        waiting: deque[int] = deque()  # lanes whose output is due, in submission order
        awaiting: set[int] = set()  # lanes whose program waits for its next output
        ready: dict[int, deque[Tensor]] = {lane: deque() for lane in range(len(self.lanes))}  # outputs not yet taken
        finished: deque[LaneChunk] = deque()

        def advance(lane: int, value: Tensor | None) -> None:
            program = programs[lane]
            try:
                item = program.send(value)
                while True:
                    if item is AWAIT:
                        if not ready[lane]:
                            awaiting.add(lane)
                            return
                        item = program.send(ready[lane].popleft())
                    elif isinstance(item, LatentChunk):  # a continuous program pauses until its chunk is taken
                        finished.append(LaneChunk(lane, item))
                        return
                    else:
                        self.executor.submit(item)
                        if item.output:
                            waiting.append(lane)
                        item = program.send(None)
            except StopIteration as stop:
                del programs[lane]
                if stop.value is not None:
                    finished.append(LaneChunk(lane, stop.value))

        def start(lane: int) -> None:
            if lane not in programs:
                programs[lane] = self.lanes[lane].chunk_program()
            advance(lane, None)

        state = (programs, waiting, awaiting, ready, advance)
        for lane in range(len(self.lanes)):
            start(lane)
        while True:
            while finished:
                done = finished.popleft()
                yield done
                start(done.lane)
            lane = waiting.popleft()
            try:
                packet = self.executor.result()
            except StageFailed as error:
                self._rebuild(error, *state)
                continue
            if lane == _MIGRATION:
                self._migrating = False
                continue
            if lane in awaiting:
                awaiting.discard(lane)
                advance(lane, packet.tensors[0])
            else:
                ready[lane].append(packet.tensors[0])
            self._maybe_rebalance(waiting)

    def _maybe_rebalance(self, waiting: deque[int]) -> None:
        """Every `rebalance_window` outputs, compare the stages' compute over the window; when moving one layer to
        a neighbour lowers the slowest stage enough, send the move down the pipeline (in order with the packets)."""
        p = self.pipeline
        if self._migrating or not isinstance(self.executor, PipelineExecutor) or len(self.split) < 2:
            return
        if self._requested_moves:
            move = self._requested_moves.popleft()
        elif p.rebalance:
            self._window_outputs += 1
            if self._window_outputs < p.rebalance_window:
                return
            busy = self.executor.stage_busy_s
            window = [now - then for now, then in zip(busy, self._window_busy)] if self._window_busy else None
            self._window_busy, self._window_outputs = list(busy), 0
            move = rebalance_move(window, self.split, p.rebalance_tolerance) if window else None
        else:
            move = None
        if move is None:
            return
        layer, destination = move
        self.split = move_layer(self.split, layer, destination)
        self.executor.submit(Packet(lane=destination, frames=layer, kind=Kind.MIGRATE, output=True))
        waiting.append(_MIGRATION)
        self._migrating = True
        self._window_busy = None  # the next window starts after the move
        self.migrations.append((layer, destination))
        log.info("moving layer %d to stage %d; split now %s", layer, destination, self.split)

    def _rebuild(
        self, error: StageFailed, programs: dict[int, Program], waiting: deque[int], awaiting: set[int],
        ready: dict[int, deque[Tensor]], advance,
    ) -> None:
        """Drop the broken pipeline, build the next one, restore every lane from its last committed chunk, and
        restart the chunks that were in flight."""
        detected = time.monotonic()
        if len(self.rebuilds) >= self.pipeline.max_rebuilds:
            raise error
        log.warning("pipeline fault: %s; rebuilding (%s)", error, self.pipeline.on_fault)
        self.executor.close(graceful=False)
        in_flight = sorted(lane for lane in programs if not self.lanes[lane].continuous)
        for program in programs.values():
            program.close()
        programs.clear()
        waiting.clear()
        awaiting.clear()
        for outputs in ready.values():
            outputs.clear()
        self._migrating, self._window_outputs, self._window_busy = False, 0, None
        stages = len(self.split) - 1 if self.pipeline.on_fault == "fewer-stages" else 0
        if stages >= 1:
            self.split = even_split(self.dit_config.num_layers, stages)
            spares = self.spare_pool.take(stages) if self.spare_pool is not None else None
            self.executor = self._pipeline_executor(self.split, spares=spares)
            if self.spare_pool is not None:
                self.spare_pool.add(self.pipeline.spares - len(self.spare_pool))  # refill in the background
        else:
            self.split = (range(self.dit_config.num_layers),)
            dit, self.standby = self.standby or self.model("cpu"), None
            torch.set_num_threads(self.pipeline.fallback_threads or self.pipeline.threads_per_stage)
            self.executor = LocalExecutor(dit, self.config, self.memories)
        for lane in self.lanes:  # a continuous (staggered) lane's restore program goes on streaming after it
            programs[lane.index] = lane.restore_program()
            advance(lane.index, None)
        for lane in in_flight:
            programs[lane] = self.lanes[lane].chunk_program()
            advance(lane, None)
        self.rebuilds.append(Rebuild(str(error), detected, time.monotonic(), self.executor.describe))

    def close(self) -> None:
        self.executor.close()
        if self.spare_pool is not None:
            self.spare_pool.close()

    def __enter__(self) -> PipelineEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class PipelineStream:
    """One stream through the pipeline behind the engine interface that `generate` and a live session drive
    (stream.session.LiveEngine): controls and step lists apply from the next chunk, as with StreamEngine."""

    def __init__(self, pipeline: PipelineEngine) -> None:
        if len(pipeline.lanes) != 1:
            raise ConfigError(f"a PipelineStream is one lane; this pipeline has {len(pipeline.lanes)}")
        self.pipeline, self.lane, self.config = pipeline, pipeline.lanes[0], pipeline.config
        self._chunks: Iterator[LaneChunk] | None = None

    @property
    def num_actions(self) -> int:
        return self.lane.dit_config.num_actions

    @property
    def chunk_index(self) -> int:
        return self.lane.chunk_index

    @property
    def controls_reach(self) -> int:
        """The first chunk a control given now applies to (stream batch: the next to enter, S + 1 chunks ahead)."""
        return self.lane.controls_reach if self.lane.continuous else self.lane.chunk_index

    def next_chunk(self, steps: Sequence[int] | None = None, source: object = None) -> LatentChunk:
        if source is not None:
            raise ConfigError("a pipelined stream takes no video input (video-to-video runs in one process)")
        full = steps is None or tuple(steps) == tuple(self.config.denoising_steps)
        self.pipeline.set_steps(0, None if full else steps)
        if self._chunks is None:
            self._chunks = self.pipeline.chunks()
        return next(self._chunks).chunk

    def set_prompt(self, prompt: Tensor, policy: SwitchPolicy | None = None) -> None:
        self.pipeline.set_prompt(0, prompt, policy)

    def set_action(self, actions: int | Tensor) -> None:
        self.pipeline.set_action(0, actions)

    def reseed(self, seed: int) -> None:
        self.lane.noise = GaussianNoise(seed)  # drawn by the lane in this process, at its next chunk

    def reset(self) -> None:
        self.pipeline.reset(0)

    def close(self) -> None:
        self.pipeline.close()
