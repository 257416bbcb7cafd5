"""Stream batch: the denoising steps of successive chunks in flight at once, so that ONE stream keeps every pipeline
stage busy (StreamDiffusionV2's "stream batch", read from chenfengxu714/StreamDiffusionV2,
causvid/models/wan/causal_stream_inference.py: `inference_stream`).

With S denoising steps there are S step slots. Each tick, one chunk enters slot 0 as fresh noise, every chunk in
flight moves one slot on, and the chunk that leaves the last slot is done:

    tick t:   slot 0: chunk t, step 0   slot 1: chunk t-1, step 1   ...   slot S-1: chunk t-S+1, step S-1

* Chunk c's input at step i is pure noise (i = 0) or its clean estimate from step i-1 re-noised to step i.
* Each slot has its own memory in the stages (KV cache or linear state): the call of chunk c at step i writes its
  keys/values into slot i's memory and commits them, so chunk c+1 at step i attends to its predecessors as they were
  at step i (the reference keeps one cache copy per batch slot for the same reason). There is no clean context
  pass: S DiT calls per chunk instead of S + 1.
* The calls of one tick do not depend on each other, and a call needs only its own chunk's previous step: with
  S >= N, N pipeline stages all have work. The packet order is fixed by this program, never by timing, so one
  process (`StreamBatchEngine`) and any pipeline give the same numbers bit for bit.

What it costs: a chunk is handed out one tick after its last step (so that the next tick's calls are queued behind
it): chunk c comes out when chunk c + S has entered, and a control asked for after chunk k is handed out applies from
chunk k + S + 1 (k + 1 with the chunk sampler). Memory holds S caches, and the numbers are not `StreamEngine`'s: predecessors are seen at the noise level
of the step, never clean (at step 0 they are pure noise, so step 0 carries no content from the past). A model
distilled with clean context (Self-Forcing) loses some consistency; the world model's measured cost is in
benchmarks/results/pipeline-cpu.md. Step lists are fixed (every chunk goes through every slot).

Controls travel with their chunk: a new prompt, actions or a reset reach slot i's memory when that chunk reaches
slot i (a recache re-encodes slot i's kept frames, from their step-i inputs, under the new prompt).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from framecast.models.config import DiTConfig
from framecast.models.dit import CausalWanDiT
from framecast.models.errors import ConfigError
from framecast.stream.engine import EngineConfig, LatentChunk, SwitchPolicy
from framecast.stream.executors import LocalExecutor
from framecast.stream.lane import AWAIT, Lane, Program, run_on
from framecast.stream.noise import GaussianNoise, NoiseSource
from framecast.stream.sampler import renoise, to_clean
from framecast.stream.stage import ledger_memory
from framecast.stream.wire import Begin, Packet


@dataclass
class _Chunk:
    """A chunk in flight: what it was started with, and the input of its current step."""

    index: int
    actions: Tensor | None
    prompt: Tensor
    switch: SwitchPolicy | None  # the first chunk under a new prompt carries the switch policy
    reset: bool  # a reset was asked for before this chunk
    started: float
    x: Tensor | None = None
    first_frame: int = 0


@dataclass
class _Committed:
    """One chunk's step input as a slot committed it (for a recache or a rebuild)."""

    index: int
    first_frame: int
    latents: Tensor
    actions: Tensor | None


class _Slot:
    """Step slot i: its memory in the stages, a ledger of that memory, and the inputs it committed lately."""

    def __init__(self, memory: int, dit_config: DiTConfig, config: EngineConfig, keep: int) -> None:
        self.memory = memory
        self.ledger = ledger_memory(dit_config, config)
        self.committed: deque[_Committed] = deque(maxlen=keep)
        self.prompt: Tensor | None = None
        self.send_text = self.send_reset = False

    def restart(self) -> None:
        self.ledger.reset()
        self.committed.clear()
        self.send_reset = True

    def frames(self, frames: range) -> tuple[Tensor, Tensor | None]:
        """Committed inputs of `frames` (ledger frame numbers), concatenated along time."""
        parts, actions = [], []
        for entry in self.committed:
            width = entry.latents.shape[1]
            lo, hi = max(frames.start, entry.first_frame), min(frames.stop, entry.first_frame + width)
            if lo < hi:
                parts.append(entry.latents[:, lo - entry.first_frame : hi - entry.first_frame])
                if entry.actions is not None:
                    actions.append(entry.actions[:, lo - entry.first_frame : hi - entry.first_frame])
        latents = torch.cat(parts, dim=1)
        if latents.shape[1] != len(frames):
            raise RuntimeError(f"frames {frames} are not all among the slot's committed inputs")
        return latents.contiguous(), torch.cat(actions, dim=1).contiguous() if actions else None


class StaggeredLane(Lane):
    """One stream in stream-batch mode (module docstring). Same controls as `Lane`; `chunk_program()` runs on over
    all chunks, yielding each finished LatentChunk (and pausing there until it is resumed)."""

    continuous = True

    def __init__(
        self, index: int, dit_config: DiTConfig, config: EngineConfig, prompt: Tensor, dtype: torch.dtype,
        noise: NoiseSource | None = None, memory: int | None = None,
    ) -> None:
        super().__init__(index, dit_config, config, prompt, dtype, noise, memory)
        self.memories = len(self.steps)
        # a slot keeps what a recache can ask for, plus the chunks still in flight behind the last delivered one
        keep = -(-config.window_frames // config.chunk_frames) + self.memories + 1
        self.slots = [_Slot(self.memory + i, dit_config, config, keep) for i in range(self.memories)]
        self.in_flight: list[_Chunk | None] = [None] * self.memories
        self.delivered = -1  # index of the newest chunk handed out
        self._next_index = 0  # of the next chunk to enter slot 0

    @property
    def controls_reach(self) -> int:
        """The chunk a control given now first applies to: the next one to enter slot 0."""
        return self._next_index

    def drop_in_flight(self) -> None:
        """Forget the chunks in flight and every slot's memory: the stream starts over with the next chunk (whose
        number follows the last one handed out)."""
        self.in_flight = [None] * self.memories
        for slot in self.slots:
            slot.restart()
        self._next_index = self.chunk_index = self.delivered + 1
        with self._lock:
            self._pending_reset = False

    def set_steps(self, steps: Sequence[int] | None) -> None:
        if steps is not None and tuple(steps) != tuple(self.config.denoising_steps):
            raise ConfigError(
                f"steps={tuple(steps)}: in stream-batch mode every chunk goes through all of "
                f"denoising_steps={self.config.denoising_steps} (one step slot each)"
            )

    # the stream
    def chunk_program(self, steps: Sequence[int] | None = None) -> Program:
        while True:
            yield from self._tick()

    def _take_controls(self) -> _Chunk:
        prompt, actions, reset = self._take_pending()
        if actions is not None:
            self.actions = actions
        switch = None
        if prompt is not None:
            self.prompt, switch = prompt
        self._next_index += 1
        return _Chunk(self._next_index - 1, self.actions, self.prompt, switch, reset, time.perf_counter())

    def _tick(self) -> Program:
        leaving = self.in_flight[-1]
        self.in_flight = [self._take_controls()] + self.in_flight[:-1]
        for slot_index, chunk in enumerate(self.in_flight):
            if chunk is None:
                continue
            if slot_index == 0:
                chunk.x = self.noise.draw(self.chunk_shape, self.dtype, torch.device("cpu"))
            else:
                flow = yield AWAIT
                previous = self.steps[slot_index - 1]
                x0 = to_clean(chunk.x, flow.to(chunk.x.device), previous.sigma)
                chunk.x = renoise(x0, self.noise.draw(tuple(x0.shape), x0.dtype, x0.device), previous.next_sigma)
            yield from self._run(slot_index, chunk)
        if leaving is not None:
            flow = yield AWAIT
            latents = to_clean(leaving.x, flow.to(leaving.x.device), self.steps[-1].sigma)
            self.delivered = leaving.index
            self.chunk_index = leaving.index + 1
            yield LatentChunk(
                leaving.index, leaving.first_frame, latents, time.perf_counter() - leaving.started, {},
                tuple(self.config.denoising_steps),
            )

    def _slot_packet(self, slot: _Slot, **fields) -> Packet:
        packet = Packet(lane=slot.memory, reset=slot.send_reset, text=slot.prompt if slot.send_text else None, **fields)
        slot.send_reset = slot.send_text = False
        return packet

    def _run(self, slot_index: int, chunk: _Chunk) -> Program:
        """Chunk `chunk`'s step `slot_index` in its slot: the chunk's controls reach the slot, then one call that
        attends to the slot's memory and commits the chunk's keys/values there."""
        slot, step = self.slots[slot_index], self.steps[slot_index]
        if chunk.reset:
            slot.restart()
        if chunk.prompt is not slot.prompt:
            slot.prompt, slot.send_text = chunk.prompt, True
            if chunk.switch is SwitchPolicy.RESET:
                slot.restart()
            elif chunk.switch is SwitchPolicy.RECACHE:
                yield self._recache(slot, step.timestep)
        if slot_index == 0:
            chunk.first_frame = slot.ledger.committed_frames
        frames = self.config.chunk_frames
        timesteps = torch.full(self.chunk_shape[:2], step.timestep, dtype=torch.float32)
        slot.ledger.begin_chunk(frames)
        yield self._slot_call(slot, chunk.x, timesteps, chunk.actions, begin=Begin.CHUNK, frames=frames, commit=True, output=True)
        slot.committed.append(_Committed(chunk.index, slot.ledger.committed_frames, chunk.x, chunk.actions))
        slot.ledger.commit()

    def _slot_call(self, slot: _Slot, latents: Tensor, timesteps: Tensor, actions: Tensor | None, **fields) -> Packet:
        use_actions = actions if self.dit_config.num_actions else None
        tensors = (latents, timesteps) if use_actions is None else (latents, timesteps, use_actions)
        return self._slot_packet(slot, tensors=tensors, actions=use_actions is not None, **fields)

    def _recache(self, slot: _Slot, timestep: float) -> Packet:
        frames = slot.ledger.begin_recache()
        if len(frames):
            latents, actions = slot.frames(frames)
            timesteps = torch.full((self.config.batch, len(frames)), timestep, dtype=torch.float32)
            packet = self._slot_call(slot, latents, timesteps, actions, begin=Begin.RECACHE, commit=True)
        else:
            packet = self._slot_packet(slot, begin=Begin.RECACHE, commit=True)
        slot.ledger.commit()
        return packet

    # faults
    def restore_program(self) -> Program:
        """After a fault: every slot's memory is rebuilt on the fresh stages from the inputs it committed for chunks
        up to the last one delivered (the newest whole chunks that fit beside a chunk in flight, under the current
        prompt); the chunks in flight are dropped and started again (new noise), so chunk numbers go on without a
        gap or a repeat; then the stream goes on."""
        chunk = self.config.chunk_frames
        room = (self.config.window_frames - chunk) // chunk
        if any(c is not None and (c.reset or c.switch is SwitchPolicy.RESET) for c in self.in_flight):
            with self._lock:  # a reset that had not reached every slot yet: the next chunk carries it again
                self._pending_reset = True
        self.in_flight = [None] * self.memories
        for slot_index, slot in enumerate(self.slots):
            kept = [entry for entry in slot.committed if entry.index <= self.delivered][-room:] if room else []
            slot.restart()
            slot.prompt, slot.send_text = self.prompt, True
            timesteps = torch.full(self.chunk_shape[:2], self.steps[slot_index].timestep, dtype=torch.float32)
            if not kept:
                yield self._slot_packet(slot)
            for entry in kept:
                slot.ledger.begin_chunk(chunk)
                yield self._slot_call(slot, entry.latents, timesteps, entry.actions, begin=Begin.CHUNK, frames=chunk, commit=True)
                slot.committed.append(_Committed(entry.index, slot.ledger.committed_frames, entry.latents, entry.actions))
                slot.ledger.commit()
        self._next_index = self.chunk_index = self.delivered + 1
        yield from self.chunk_program()


class StreamBatchEngine:
    """The stream-batch sampler in this process: `StreamEngine(dit, config, ...)` with `config.stream_batch` builds
    one. Same interface as StreamEngine (next_chunk, chunks, controls); the first call runs S + 1 ticks."""

    def __init__(self, dit: CausalWanDiT, config: EngineConfig, prompt: Tensor, noise: NoiseSource | None = None) -> None:
        if not config.stream_batch:
            raise ConfigError("StreamBatchEngine needs config.stream_batch=True")
        self.dit, self.config = dit, config
        self.lane = StaggeredLane(0, dit.config, config, prompt, dit.dtype, noise or GaussianNoise(config.seed))
        self.executor = LocalExecutor(dit, config, self.lane.memories)
        self._program = self.lane.chunk_program()
        self._lock = threading.Lock()

    @property
    def num_actions(self) -> int:
        return self.dit.config.num_actions

    @property
    def chunk_index(self) -> int:
        return self.lane.delivered + 1

    @property
    def noise(self) -> NoiseSource:
        return self.lane.noise

    def next_chunk(self, steps: Sequence[int] | None = None, source: object = None) -> LatentChunk:
        if source is not None:
            raise ConfigError("stream-batch mode takes no video input (video-to-video runs with the chunk sampler)")
        self.lane.set_steps(steps)
        with self._lock:
            return run_on(self._program, self.executor)

    def chunks(self):
        while True:
            yield self.next_chunk()

    def set_prompt(self, prompt: Tensor, policy: SwitchPolicy | None = None) -> None:
        self.lane.set_prompt(prompt, policy)

    def set_action(self, actions: int | Tensor) -> None:
        self.lane.set_action(actions)

    @property
    def controls_reach(self) -> int:
        return self.lane.controls_reach

    def reset(self) -> None:
        """Start over now: the chunks in flight are dropped (their outputs with them) and every slot forgets."""
        with self._lock:
            self.executor.close()  # computed outputs of the dropped chunks
            self.lane.drop_in_flight()
            self._program.close()
            self._program = self.lane.chunk_program()

    def reseed(self, seed: int) -> None:
        self.lane.noise = GaussianNoise(seed)
