"""One stream of a pipeline ("lane"): `StreamEngine`'s per-chunk logic, with the DiT calls handed out as packets.

A lane owns what the orchestrator keeps of a stream: the sampler (noise, schedule, x0, re-noising), the history of
clean latents, the prompt and actions, and a ledger memory (one layer, one token per frame) that tracks frames,
positions and recache ranges exactly as the stages' memories do. `chunk_program()` is a generator that yields the
packets of one chunk in `StreamEngine.next_chunk` order and, after each packet that asks for an output, yields AWAIT
to receive that output (the flow), so the numbers equal the single-process engine's: same calls, same order, same
noise draws.

Controls are taken at the chunk boundary (as the engine does) and travel inside the chunk's first packet: a reset
flag, the new prompt, and a recache call (`Begin.RECACHE`) before the chunk.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Generator, Sequence

import torch
from torch import Tensor

from framecast.models.config import DiTConfig
from framecast.models.errors import ConfigError, ShapeError
from framecast.stream.engine import EngineConfig, LatentChunk, LatentHistory, SwitchPolicy, check_actions
from framecast.stream.noise import GaussianNoise, NoiseSource
from framecast.stream.sampler import FlowMatchSchedule, Step, renoise, to_clean
from framecast.stream.stage import ledger_memory
from framecast.stream.wire import Begin, Packet

class _Await:
    """What a program yields to receive the output of its oldest packet whose output it has not taken yet."""

    def __repr__(self) -> str:
        return "AWAIT"


AWAIT = _Await()
# A program yields packets (to submit in order), AWAIT (to take its next output, in submission order) and, for a
# program that runs on over many chunks (stream_batch.StaggeredLane), each finished LatentChunk.
Program = Generator["Packet | _Await | LatentChunk", "Tensor | None", "LatentChunk | None"]


def run_on(program: Program, executor) -> LatentChunk | None:
    """Drive `program` on an executor that computes each packet as it is submitted (`LocalExecutor`) until the
    program finishes a chunk (returns it, or yields it if it runs on)."""
    value = None
    try:
        while True:
            item = program.send(value)
            value = None
            if item is AWAIT:
                value = executor.result().tensors[0]
            elif isinstance(item, LatentChunk):
                return item
            else:
                executor.submit(item)
    except StopIteration as stop:
        return stop.value


class Lane:
    """One stream: its sampler, history, prompt, actions and controls. Compute happens in the stages."""

    memories = 1  # stage memories the lane uses
    continuous = False  # chunk_program() is one chunk (a StaggeredLane's runs on over many)

    def __init__(
        self, index: int, dit_config: DiTConfig, config: EngineConfig, prompt: Tensor, dtype: torch.dtype,
        noise: NoiseSource | None = None,
        memory: int | None = None,
    ) -> None:
        """`memory`: the stages' memory this lane's packets use (default: `index`)."""
        if config.guidance != 1:
            raise ConfigError(f"guidance={config.guidance}: the pipeline's lanes run unguided; guidance runs in "
                              "StreamEngine (one process)")
        self.index, self.dit_config, self.config, self.dtype = index, dit_config, config, dtype
        self.memory = index if memory is None else memory
        self.ledger = ledger_memory(dit_config, config)
        self.schedule = FlowMatchSchedule(config.shift)
        self.steps: tuple[Step, ...] = self.schedule.steps(config.denoising_steps, config.warp_steps)
        self.context_sigma = self.schedule.sigma_at(float(config.context_noise))
        self.noise = noise if noise is not None else GaussianNoise(config.seed)
        self.chunk_shape = (config.batch, config.chunk_frames, dit_config.in_dim, config.latent_height, config.latent_width)
        self.history = LatentHistory(config.window_frames, self.chunk_shape, dtype, torch.device("cpu"))
        self.context_timesteps = torch.full((config.batch, config.chunk_frames), float(config.context_noise), dtype=torch.float32)
        self.actions = torch.zeros(config.batch, config.chunk_frames, dtype=torch.long) if dit_config.num_actions else None
        self.prompt = self._checked_prompt(prompt)
        self._send_prompt, self._send_reset = True, False  # the stages learn the prompt with the first packet
        self._lock = threading.Lock()
        self._pending_prompt: tuple[Tensor, SwitchPolicy] | None = None
        self._pending_actions: Tensor | None = None
        self._pending_reset = False
        self.chunk_index = 0
        self.step_list: tuple[int, ...] | None = None  # a shorter step list for the next chunks (None: all steps)
        self._noise_state: Tensor | None = None

    # controls, as StreamEngine takes them: checked now, applied at the next chunk boundary
    def _checked_prompt(self, prompt: Tensor) -> Tensor:
        prompt = prompt.detach().to("cpu", self.dtype)
        if prompt.ndim == 2:
            prompt = prompt.unsqueeze(0)
        if prompt.ndim == 3 and prompt.shape[0] == 1 and self.config.batch > 1:
            prompt = prompt.expand(self.config.batch, -1, -1)
        cfg = self.dit_config
        if prompt.ndim != 3 or prompt.shape[2] != cfg.text_dim or not 1 <= prompt.shape[1] <= cfg.text_len:
            raise ShapeError(
                f"prompt embedding has shape {tuple(prompt.shape)}; expected [batch, tokens <= {cfg.text_len}, {cfg.text_dim}]"
            )
        if prompt.shape[0] != self.config.batch:
            raise ShapeError(f"prompt batch {prompt.shape[0]} does not match the engine batch {self.config.batch}")
        return prompt.contiguous()

    def set_prompt(self, prompt: Tensor, policy: SwitchPolicy | None = None) -> None:
        checked = self._checked_prompt(prompt)
        with self._lock:
            self._pending_prompt = (checked, policy or self.config.switch_policy)

    def set_action(self, actions: int | Tensor) -> None:
        actions = check_actions(actions, self.dit_config.num_actions, self.config.batch, self.config.chunk_frames)
        with self._lock:
            self._pending_actions = actions.contiguous()

    def reset(self) -> None:
        with self._lock:
            self._pending_reset = True

    def set_steps(self, steps: Sequence[int] | None) -> None:
        """Denoise the next chunks with a sub-list of the configured steps (a deadline scheduler's degradation), or
        with all of them again (None). Raises ConfigError now for a list the engine would refuse."""
        if steps is not None:
            self._steps_for(steps)
        self.step_list = tuple(steps) if steps is not None else None

    def _take_pending(self) -> tuple[tuple[Tensor, SwitchPolicy] | None, Tensor | None, bool]:
        """The controls given since the last chunk started (prompt and policy, actions, reset), now cleared."""
        with self._lock:
            prompt, self._pending_prompt = self._pending_prompt, None
            actions, self._pending_actions = self._pending_actions, None
            reset, self._pending_reset = self._pending_reset, False
        return prompt, actions, reset

    def _restart(self) -> None:
        self.ledger.reset()
        self.history.stop = 0
        self._send_reset = True

    def _packet(self, **fields) -> Packet:
        """A packet of this lane carrying any control not yet sent (reset, prompt)."""
        packet = Packet(
            lane=self.memory, reset=self._send_reset, text=self.prompt if self._send_prompt else None, **fields
        )
        self._send_reset = self._send_prompt = False
        return packet

    def _call(self, latents: Tensor, timesteps: Tensor, actions: Tensor | None, **fields) -> Packet:
        tensors = (latents, timesteps) if actions is None else (latents, timesteps, actions)
        return self._packet(tensors=tensors, actions=actions is not None, **fields)

    # one chunk, as StreamEngine.next_chunk computes it
    def chunk_program(self, steps: Sequence[int] | None = None) -> Program:
        """The packets of the next chunk (see the module docstring); `steps` default: `step_list`, else all steps."""
        start = time.perf_counter()
        steps = steps if steps is not None else self.step_list
        prompt, actions, reset = self._take_pending()
        if actions is not None:
            self.actions = actions
        if reset:
            self._restart()
        if prompt is not None:
            self.prompt, policy = prompt
            self._send_prompt = True
            if policy is SwitchPolicy.RESET:
                self._restart()
            elif policy is SwitchPolicy.RECACHE:
                yield from self._recache()
        schedule = self.steps if steps is None else self._steps_for(steps)
        self._noise_state = self._snapshot_noise()
        first_frame = self.ledger.committed_frames
        self.ledger.begin_chunk(self.config.chunk_frames)
        x = self.noise.draw(self.chunk_shape, self.dtype, torch.device("cpu"))
        x0 = x
        for number, step in enumerate(schedule):
            timesteps = torch.full(self.chunk_shape[:2], step.timestep, dtype=torch.float32)
            begin = dict(begin=Begin.CHUNK, frames=self.config.chunk_frames) if number == 0 else {}
            yield self._call(x, timesteps, self.actions, output=True, **begin)
            flow = yield AWAIT
            x0 = to_clean(x, flow.to(x.device), step.sigma)  # the sampler runs on the CPU; NCCL flows come on a GPU
            if not step.is_last:
                x = renoise(x0, self.noise.draw(tuple(x0.shape), x0.dtype, x0.device), step.next_sigma)
        context = x0
        if self.config.context_noise:
            context = renoise(x0, self.noise.draw(self.chunk_shape, self.dtype, torch.device("cpu")), self.context_sigma)
        yield self._call(context, self.context_timesteps, self.actions, commit=True)
        self.ledger.commit()
        self.history.push(x0, self.actions)
        used = tuple(steps) if steps is not None else self.config.denoising_steps
        chunk = LatentChunk(self.chunk_index, first_frame, x0, time.perf_counter() - start, {}, used)
        self.chunk_index += 1
        self._noise_state = None
        return chunk

    def _recache(self) -> Program:
        frames = self.ledger.begin_recache()
        if len(frames):
            latents, actions = self.history.frames(frames)
            timesteps = self.context_timesteps[:, :1].expand(-1, len(frames)).contiguous()
            use_actions = actions if self.dit_config.num_actions else None
            yield self._call(latents, timesteps, use_actions, begin=Begin.RECACHE, commit=True)
        else:
            yield self._packet(begin=Begin.RECACHE, commit=True)
        self.ledger.commit()

    def _steps_for(self, raw_steps: Sequence[int]) -> tuple[Step, ...]:
        key, full = tuple(raw_steps), self.config.denoising_steps
        if not key or key[0] != full[0] or not set(key) <= set(full):
            raise ConfigError(f"steps={key} must be a sub-list of denoising_steps={full} keeping its first step {full[0]}")
        return self.schedule.steps(key, self.config.warp_steps)

    # faults: back to the last committed chunk
    def _snapshot_noise(self) -> Tensor | None:
        generator = getattr(self.noise, "generator", None)
        return generator.get_state() if generator is not None else None

    def restore_program(self) -> Program:
        """After a fault: the packets that rebuild this lane's memory on fresh stages from the last committed chunk.

        The chunk that was in flight is dropped and generated again from the same noise (the generator is rewound
        to where that chunk started), the memory is reset and the newest whole chunks of clean latents in the history
        are encoded again as context, chunk by chunk, under the current prompt. The cache then holds what a recache
        would give, not bit for bit what the lost stages held, so the stream goes on close to, not equal to, the
        uninterrupted one; chunk numbers go on without a gap or a repeat.
        """
        if self._noise_state is not None:
            self.noise.generator.set_state(self._noise_state)
            self._noise_state = None
        chunk = self.config.chunk_frames
        kept = min(self.history.stop, self.config.window_frames - chunk) // chunk * chunk
        latents, actions = self.history.frames(range(self.history.stop - kept, self.history.stop))
        self.ledger.reset()
        self.history = LatentHistory(self.config.window_frames, self.chunk_shape, self.dtype, torch.device("cpu"))
        self._send_reset = self._send_prompt = True
        if not kept:
            yield self._packet()
        for first in range(0, kept, chunk):
            part, part_actions = latents[:, first : first + chunk], actions[:, first : first + chunk]
            use_actions = part_actions if self.dit_config.num_actions else None
            self.ledger.begin_chunk(chunk)
            yield self._call(part.contiguous(), self.context_timesteps, use_actions, begin=Begin.CHUNK, frames=chunk, commit=True)
            self.ledger.commit()
            self.history.push(part, use_actions)
        return None
