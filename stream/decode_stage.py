"""The decode stage: a streaming video decoder in its own process, on its own device, fed over torch.distributed.

    submit(latents) -> [decode process on DEV: decoder.decode] -> result() -> uint8 frames     (first in, first out)

The decoder is stateful (it carries frames or features across chunks), so it lives in the decode process and is built
there from a picklable recipe (`PreviewDecoderRecipe`, `WanVAEDecoderRecipe`, `TAEHVDecoderRecipe`,
`WorldDecoderRecipe`), as stage workers build their DiT from a model recipe (stream/model_source.py). Latents go out
and frames come back as packets (stream/wire.py) over gloo, whatever the decode device: every decoder hands its frames
back on the CPU, so a GPU-to-GPU transport would only add copies. `reset` travels in order with the chunks.

`DecodeStage` is the process and its connection; it raises StageFailed when the process dies or does not answer in
time. `StagedDecoder` is what the rest of FrameCast uses: the same asynchronous API plus `decode` (the producer's
`Decoder` protocol), and on a fault it goes on in this process with a fresh decoder from the same recipe (see
`StagedDecoder` for what a fault does to the decoder's state).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import sys
import threading
import time
import traceback
import weakref
from collections import deque
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from framecast.models.errors import ConfigError
from framecast.stream.producer import Decoder
from framecast.stream.wire import (
    Kind, Packet, StageFailed, free_port, open_group, receive_forever, wait_watched, watched,
)

log = logging.getLogger("framecast.decode_stage")

DEVICE_TYPES = ("cpu", "cuda")


def check_device(text: str, what: str = "device") -> torch.device:
    """`text` as a torch.device this machine has ("cpu", "cuda", "cuda:1").

    Raises:
        ConfigError: naming `what` and `text`: not a device string, a kind other than cpu/cuda, no CUDA, or a CUDA
            index past the devices present.
    """
    try:
        device = torch.device(text)
    except (RuntimeError, TypeError) as error:
        raise ConfigError(f"{what} {text!r} is not a device (expected cpu, cuda or cuda:N)") from error
    if device.type not in DEVICE_TYPES:
        raise ConfigError(f"{what} {text!r}: device kind {device.type!r} is not supported (cpu, cuda or cuda:N)")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{what} {text!r}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"{what} {text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


# ---------------------------------------------------------------------------------------------------------------------
# Recipes: picklable, each builds a fresh decoder on the device it is given


@dataclass(frozen=True)
class PreviewDecoderRecipe:
    """The weightless preview decoder (models/preview.py); it decodes on the CPU whatever the device."""

    channels: int
    spatial_scale: int = 8
    temporal_scale: int = 4
    seed: int = 0

    def __call__(self, device: torch.device | str = "cpu") -> Decoder:
        from framecast.models.preview import PreviewDecoder

        return PreviewDecoder(self.channels, self.spatial_scale, self.temporal_scale, self.seed)


@dataclass(frozen=True)
class WanVAEDecoderRecipe:
    """The Wan VAE's streaming decoder from a checkpoint (`Wan2.1_VAE.pth`)."""

    weights: str
    dtype: torch.dtype = torch.float32

    def __call__(self, device: torch.device | str = "cpu") -> Decoder:
        from framecast.models.vae import WanVAEDecoder, load_wan_vae

        return WanVAEDecoder(load_wan_vae(self.weights, device=device, dtype=self.dtype))


@dataclass(frozen=True)
class TAEHVDecoderRecipe:
    """TAEHV's streaming decoder from a checkpoint (`taew2_1.pth`)."""

    weights: str
    dtype: torch.dtype = torch.float32

    def __call__(self, device: torch.device | str = "cpu") -> Decoder:
        from framecast.models.taehv import TAEHVDecoder, load_taehv

        return TAEHVDecoder(load_taehv(self.weights, dtype=self.dtype).to(device))


@dataclass(frozen=True)
class WorldDecoderRecipe:
    """The embedded world model's decoder from its autoencoder file (`world_autoencoder.safetensors`)."""

    autoencoder: str
    dtype: torch.dtype = torch.bfloat16

    def __call__(self, device: torch.device | str = "cpu") -> Decoder:
        from framecast.models.world.autoencoder import WorldDecoder, load_autoencoder

        return WorldDecoder(load_autoencoder(self.autoencoder).to(device), self.dtype)


# ---------------------------------------------------------------------------------------------------------------------
# The decode process


@dataclass(frozen=True)
class DecodeStageConfig:
    """Where the decode process runs and how it is watched; validated at construction."""

    device: str = "cpu"  # the decode process's device
    fallback_device: str = "cpu"  # where this process decodes after a fault
    threads: int = 1  # torch threads of the decode process
    addr: str = "127.0.0.1"
    port: int | None = None  # None: a free port
    start_timeout_s: float = 60.0  # process start, torch import, decoder build
    decode_timeout_s: float = 10.0  # an awaited chunk's frames later than this: a hung decode process
    first_decode_timeout_s: float = 120.0  # the first chunk: kernel autotuning (cuDNN) and lazy inits take longer
    idle_timeout_s: float = 24 * 3600.0  # a stream may pause this long between chunks

    def __post_init__(self) -> None:
        check_device(self.device, "decode device")
        check_device(self.fallback_device, "fallback device")
        if not isinstance(self.threads, int) or self.threads < 1:
            raise ConfigError(f"threads={self.threads!r} must be a positive integer")
        for name in ("start_timeout_s", "decode_timeout_s", "first_decode_timeout_s", "idle_timeout_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name}={getattr(self, name)!r} must be > 0")


@dataclass(frozen=True)
class DecodeWorkerSpec:
    """Everything the decode process needs, picklable for `spawn`."""

    recipe: Callable[..., Decoder]
    config: DecodeStageConfig
    port: int


def _exit_when_orphaned(parent: int) -> None:
    while True:
        if os.getppid() != parent:
            os._exit(0)
        time.sleep(0.5)


def decode_worker_main(spec: DecodeWorkerSpec, parent: int) -> None:
    """Entry point of the decode process (rank 1): build the decoder, say READY with its frame rule, then
    receive -> decode -> send back until STOP. It exits by itself when its parent is gone."""
    threading.Thread(target=_exit_when_orphaned, args=(parent,), daemon=True).start()
    config = spec.config
    torch.set_num_threads(config.threads)
    try:
        group = open_group("gloo", config.addr, spec.port, 1, 2, start_timeout_s=config.start_timeout_s,
                           idle_timeout_s=config.idle_timeout_s)
        decoder = spec.recipe(config.device)
        rule = [getattr(decoder, "frames_per_latent", 4), getattr(decoder, "first_latent_frames", 1)]
        group.isend(Packet(lane=0, kind=Kind.READY, tensors=(torch.tensor(rule),)), 0)
        while True:
            packet = group.recv(0)
            if packet.kind is Kind.STOP:
                break
            if packet.reset:
                decoder.reset()
            if packet.tensors:
                with torch.inference_mode():
                    frames = decoder.decode(packet.tensors[0].to(config.device))
                group.isend(Packet(lane=packet.lane, tensors=(frames.cpu(),)), 0)
        group.flush()
        os._exit(0)  # skip interpreter teardown: nothing in it matters, and a thread inside gloo would abort it
    except StageFailed:
        os._exit(3)  # the orchestrator is gone
    except BaseException:
        traceback.print_exc(file=sys.stderr)
        sys.stderr.flush()
        os._exit(2)


def _kill_and_join(process, receiver: threading.Thread | None) -> None:
    """Kill the decode process if it still runs, then wait for the receiver thread (its wait fails once the process is
    gone; a thread still inside gloo when the interpreter exits would abort it)."""
    if process.is_alive():
        process.kill()
        process.join(1.0)
    if receiver is not None:
        receiver.join(2.0)


class DecodeStage:
    """A spawned decode process joined with this process (rank 0) in a gloo group of two.

    `submit` and `reset` do not wait; `result` returns the frames of the oldest chunk not yet returned and raises
    StageFailed when the process has died, a connection broke, or the frames have not come within
    `decode_timeout_s` of the call.
    """

    def __init__(self, recipe: Callable[..., Decoder], config: DecodeStageConfig = DecodeStageConfig()) -> None:
        """Starts the process and waits until its decoder is built (StageFailed when it does not come up)."""
        self.config = config
        port = config.port or free_port(config.addr)
        context = multiprocessing.get_context("spawn")
        spec = DecodeWorkerSpec(recipe, config, port)
        self.process = context.Process(target=decode_worker_main, args=(spec, os.getpid()), daemon=True,
                                       name=f"decode stage ({config.device})")
        self.process.start()
        self._closed = False
        self._answered = False  # no frames received yet: the first chunk gets first_decode_timeout_s
        self._results: queue.Queue = queue.Queue()
        self._receiver: threading.Thread | None = None
        try:
            deadline = time.monotonic() + config.start_timeout_s
            self.group = watched(
                lambda: open_group("gloo", config.addr, port, 0, 2, start_timeout_s=config.start_timeout_s,
                                   idle_timeout_s=config.idle_timeout_s),
                deadline, self.process.is_alive, "starting the decode stage",
            )
            ready = watched(lambda: self.group.recv(1), deadline, self.process.is_alive, "waiting for the decoder")
            if ready.kind is not Kind.READY:
                raise StageFailed(f"the decode process sent {ready.kind.name} before READY")
        except StageFailed as error:
            self.close(graceful=False)
            raise StageFailed(f"decode stage on {config.device} did not start: {self._detail(error)}") from error
        except BaseException:
            self.close(graceful=False)
            raise
        self.frames_per_latent, self.first_latent_frames = ready.tensors[0].tolist()
        self._receiver = threading.Thread(
            target=receive_forever, args=(self.group, 1, self._results), daemon=True, name="decode stage results")
        self._receiver.start()
        # a stage left open at interpreter exit: stop its process so that no thread is inside gloo at teardown
        self._at_exit = weakref.finalize(self, _kill_and_join, self.process, self._receiver)


    def _detail(self, error: BaseException) -> str:
        if not self.process.is_alive() and self.process.exitcode is not None:
            return f"the decode process died (exit code {self.process.exitcode})"
        return str(error)

    def submit(self, latents: Tensor) -> None:
        """Send one chunk's latents [B, F, C, H, W] (any device: they are copied into a CPU buffer)."""
        self._send(Packet(lane=0, tensors=(latents.detach(),)))

    def reset(self) -> None:
        """The decoder starts a new stream, after the chunks submitted so far and before the next."""
        self._send(Packet(lane=0, reset=True))

    def _send(self, packet: Packet) -> None:
        try:
            self.group.isend(packet, 1)
        except StageFailed as error:
            raise StageFailed(f"decode stage on {self.config.device}: {self._detail(error)}") from error

    def result(self) -> Tensor:
        """The oldest submitted chunk's frames, uint8 [B, F', H', W', 3] on the CPU."""
        limit = self.config.decode_timeout_s if self._answered else self.config.first_decode_timeout_s
        try:
            packet = wait_watched(self._results, time.monotonic() + limit, self.process.is_alive, "waiting for decoded frames")
        except StageFailed as error:
            raise StageFailed(f"decode stage on {self.config.device}: {self._detail(error)}") from error
        self._answered = True
        return packet.tensors[0]

    def close(self, graceful: bool = True) -> None:
        """Stop the process: a STOP packet when it is alive (and `graceful`), then kill it if it still runs."""
        if self._closed:
            return
        self._closed = True
        if graceful and hasattr(self, "group") and self.process.is_alive():
            try:
                self.group.isend(Packet(lane=0, kind=Kind.STOP), 1)  # no wait: a hung process must not hang us
            except (RuntimeError, StageFailed):
                pass
            self.process.join(2.0)
        if hasattr(self, "_at_exit"):
            self._at_exit()
        else:
            _kill_and_join(self.process, self._receiver)


# ---------------------------------------------------------------------------------------------------------------------
# What the producer and `generate` use


class StagedDecoder:
    """A decoder whose work runs in a decode stage process, falling back to this process on a fault.

    Asynchronous: `submit(latents)` then `result()` (first in, first out; `in_flight` chunks are submitted and not yet
    returned), so that decoding chunk c overlaps generating chunk c + 1. Synchronous: `decode(latents)`, the
    producer's `Decoder` protocol. `reset()` travels in order with the chunks. The frames are those of the recipe's
    decoder in this process (it is the same decoder, fed the same latents in the same order).

    Faults: when the decode process dies or does not answer within `decode_timeout_s`, a warning is logged and
    decoding goes on in this process (on `fallback_device`) with a fresh decoder from the same recipe, for the rest
    of the stream. The latents of every chunk not yet returned are kept, so those chunks are decoded again here and
    no chunk's frames are lost or duplicated. The decoder's carried state cannot be recovered from a dead process:
    the fresh decoder is first fed the newest chunk whose frames were returned (since the last reset; its frames are
    discarded), which restores the frame count rule (after a stream's first chunk the Wan-rule decoders give 4
    frames per latent) and, for decoders whose state is a function of the last latent frame alone (the preview
    decoder; the world decoder's one MemBlock input), the state itself: their frames equal an unbroken stream's. For
    state that reaches further back (the Wan VAE's feature caches, TAEHV's chained MemBlocks) the frames after a
    fault are close to, not equal to, those of an unbroken stream.
    """

    def __init__(self, recipe: Callable[..., Decoder], config: DecodeStageConfig = DecodeStageConfig()) -> None:
        """Raises StageFailed when the decode process does not start (a bad recipe or device shows here)."""
        self.recipe, self.config = recipe, config
        self.stage: DecodeStage | None = DecodeStage(recipe, config)
        self.frames_per_latent = self.stage.frames_per_latent  # the deadline scheduler's frame accounting
        self.first_latent_frames = self.stage.first_latent_frames
        self.local: Decoder | None = None  # the in-process decoder after a fault
        self.failure: StageFailed | None = None
        self._fallback_error: Exception | None = None
        self._owed: deque[Tensor | None] = deque()  # what the stage still owes, in order: latents, or None for a reset
        self._decoded: deque[Tensor] = deque()  # frames decoded in this process, not yet returned
        self._newest_returned: Tensor | None = None  # latents of the newest returned chunk since the last reset

    @property
    def in_flight(self) -> int:
        """Chunks submitted whose frames have not been returned yet."""
        return len(self._decoded) + sum(1 for item in self._owed if item is not None)

    @property
    def is_remote(self) -> bool:
        return self.stage is not None

    def submit(self, latents: Tensor) -> None:
        """Queue one chunk's latents [B, F, C, H, W] for decoding; its frames come from `result()` in order."""
        if self.stage is not None:
            self._owed.append(latents.detach().clone())  # kept until its frames come back: a fault decodes it again
            try:
                self.stage.submit(latents)
                return
            except StageFailed as error:
                self._fall_back(error)
                return  # the chunk was decoded with the others owed
        self._decoded.append(self._local().decode(latents))

    def result(self) -> Tensor:
        """The frames of the oldest chunk not yet returned, uint8 [B, F', H', W', 3] on the CPU.

        Raises:
            RuntimeError: no chunk is in flight.
        """
        if not self.in_flight:
            raise RuntimeError("result() with no chunk in flight: submit() first")
        if self.stage is not None:
            try:
                frames = self.stage.result()
            except StageFailed as error:
                self._fall_back(error)
            else:
                self._returned()
                return frames
        self._local()
        return self._decoded.popleft()

    def decode(self, latents: Tensor) -> Tensor:
        """Synchronous: decode one chunk (after any in flight, whose frames stay queued for `result()`)."""
        if self.in_flight:
            raise RuntimeError(f"decode() with {self.in_flight} chunk(s) in flight: take their result() first")
        self.submit(latents)
        return self.result()

    def reset(self) -> None:
        """Start a new stream: the chunks submitted so far decode in the old one, the next in the new one."""
        if self.stage is not None:
            if self._owed:
                self._owed.append(None)  # replayed in order after a fault
            else:
                self._newest_returned = None  # nothing to prime a fallback decoder with: the new stream starts fresh
            try:
                self.stage.reset()
                return
            except StageFailed as error:
                self._fall_back(error)
                return  # the reset was replayed with the chunks owed
        self._local().reset()

    def _local(self) -> Decoder:
        if self.local is None:
            if self._fallback_error is not None:  # the fallback decoder could not be built: say why, every time
                raise RuntimeError(f"no decoder: the in-process fallback failed ({self._fallback_error})")
            raise RuntimeError("the decoder is closed")
        return self.local

    def _returned(self) -> None:
        """The stage returned the oldest owed chunk: drop it (and the resets before it) from what is owed."""
        while (item := self._owed.popleft()) is None:
            self._newest_returned = None
        self._newest_returned = item

    def _fall_back(self, error: StageFailed) -> None:
        """Go on in this process: a fresh decoder, primed with the newest returned chunk, decodes what is owed."""
        owed = sum(1 for item in self._owed if item is not None)
        log.warning("%s; decoding in this process (%s) from now on with a fresh decoder, %d chunk(s) in flight "
                    "decoded again", error, self.config.fallback_device, owed)
        self.failure = error
        self.stage.close(graceful=False)
        self.stage = None
        try:
            self.local = self.recipe(self.config.fallback_device)
        except Exception as build_error:
            self._fallback_error = build_error
            raise
        with torch.inference_mode():
            if self._newest_returned is not None:
                self.local.decode(self._newest_returned)  # its frames were returned already: only the state counts
            for item in self._owed:
                if item is None:
                    self.local.reset()
                else:
                    self._decoded.append(self.local.decode(item))
        self._owed.clear()
        self._newest_returned = None

    def close(self) -> None:
        """Stop the decode process (if one still runs); frames not yet taken are dropped."""
        if self.stage is not None:
            self.stage.close()
            self.stage = None
        self.local = None
        self._owed.clear()
        self._decoded.clear()

    @property
    def describe(self) -> str:
        where = f"a decode process on {self.config.device}" if self.failure is None else \
            f"this process on {self.config.fallback_device} (after a fault)"
        return f"{type(self.recipe).__name__} in {where}"
