"""What travels between pipeline ranks, and how: packets over torch.distributed point-to-point messages.

A `Packet` is one DiT call of one lane (or a memory-only operation) plus the memory operations around it, so that
controls travel with the chunk they apply to: `reset` and a new prompt (`text`) are applied before the call,
`begin` (chunk or recache) plans the frames in flight, `commit` makes them context after the call.

On the wire a packet is a fixed-size int64 header (kind, lane, flags, frames, then dtype and shape of each tensor)
followed by its tensors' bytes, cut into fixed-size frames that the receiver has posted receives for in advance (see
`Group`). Sends are non-blocking (`isend`): a stage hands its output on and goes back to receiving. Groups are
built from a TCPStore and a process-group object (not the process-wide default group), so an orchestrator can drop a
broken group after a fault and build another; gloo on CPUs, NCCL on GPUs.
"""

from __future__ import annotations

import datetime
import enum
import queue
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from framecast.models.errors import ConfigError, FrameCastError, ShapeError

HEADER_SLOTS = 64
MAX_STAGES = 8  # the header's last slots: each stage's busy microseconds so far
_MAX_DIMS = 6
_TENSOR_SLOTS = 2 + _MAX_DIMS  # dtype code, ndim, dims
_FIXED = 5  # kind, lane, flags, frames, tensor count
MAX_TENSORS = (HEADER_SLOTS - MAX_STAGES - _FIXED) // _TENSOR_SLOTS
T = TypeVar("T")
DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.uint8)


class StageFailed(FrameCastError, RuntimeError):
    """A pipeline stage died, broke its connection or did not answer within its timeout."""


class Kind(enum.IntEnum):
    CALL = 0  # a packet of a lane
    STOP = 1  # shut down after forwarding
    READY = 2  # a worker has built its stage
    MIGRATE = 3  # move layer `frames` to stage `lane` (with its weights and cache; see stream/migration.py)


class Begin(enum.IntEnum):
    NONE = 0
    CHUNK = 1  # memory.begin_chunk(frames)
    RECACHE = 2  # memory.begin_recache()


_RESET, _TEXT, _COMMIT, _OUTPUT, _ACTIONS = 1, 2, 4, 8, 16


@dataclass(frozen=True)
class Packet:
    """One lane's DiT call (or memory-only step) with the memory operations and controls that go with it.

    tensors: into the first stage (latents, timesteps[, actions]); between stages (x, time, time6); out of the last
    stage (flow,). text: the raw prompt embedding into the first stage, the projected text between stages.
    """

    lane: int  # MIGRATE: the destination stage
    tensors: tuple[Tensor, ...] = ()
    text: Tensor | None = None
    reset: bool = False
    begin: Begin = Begin.NONE
    frames: int = 0  # frames of begin_chunk; MIGRATE: the layer that moves
    commit: bool = False
    output: bool = False  # the last stage returns the flow to the orchestrator
    actions: bool = False  # tensors carry actions (first stage only)
    kind: Kind = Kind.CALL
    busy_us: tuple[int, ...] = ()  # microseconds each stage has computed so far (stages fill in their own)

    def header(self, device: torch.device | str = "cpu") -> Tensor:
        payload = ([self.text] if self.text is not None else []) + list(self.tensors)
        if len(payload) > MAX_TENSORS:
            raise ShapeError(f"a packet carries at most {MAX_TENSORS} tensors, not {len(payload)}")
        flags = (_RESET * self.reset) | (_TEXT * (self.text is not None)) | (_COMMIT * self.commit)
        flags |= (_OUTPUT * self.output) | (_ACTIONS * self.actions)
        slots = [int(self.kind), self.lane, flags | (int(self.begin) << 8), self.frames, len(payload)]
        for tensor in payload:
            if tensor.ndim > _MAX_DIMS:
                raise ShapeError(f"tensor of {tensor.ndim} dims; packets carry at most {_MAX_DIMS}")
            if tensor.dtype not in DTYPES:
                raise ShapeError(f"tensor of dtype {tensor.dtype}; packets carry {[str(d) for d in DTYPES]}")
            dims = list(tensor.shape) + [0] * (_MAX_DIMS - tensor.ndim)
            slots += [DTYPES.index(tensor.dtype), tensor.ndim, *dims]
        if len(self.busy_us) > MAX_STAGES:
            raise ShapeError(f"a pipeline has at most {MAX_STAGES} stages, not {len(self.busy_us)}")
        slots += [0] * (HEADER_SLOTS - MAX_STAGES - len(slots))
        slots += list(self.busy_us) + [0] * (MAX_STAGES - len(self.busy_us))
        return torch.tensor(slots, dtype=torch.int64, device=device)

    @staticmethod
    def layout(header: Tensor) -> tuple[dict, list[tuple[torch.dtype, tuple[int, ...]]]]:
        """Header -> (packet fields without tensors, [(dtype, shape)] of the tensors that follow)."""
        slots = header.tolist()
        kind, lane, flags, frames, count = slots[:_FIXED]
        shapes = []
        for index in range(count):
            base = _FIXED + index * _TENSOR_SLOTS
            dtype, ndim = DTYPES[slots[base]], slots[base + 1]
            shapes.append((dtype, tuple(slots[base + 2 : base + 2 + ndim])))
        fields = dict(
            kind=Kind(kind), lane=lane, reset=bool(flags & _RESET), commit=bool(flags & _COMMIT),
            output=bool(flags & _OUTPUT), actions=bool(flags & _ACTIONS), begin=Begin(flags >> 8), frames=frames,
            busy_us=tuple(slots[HEADER_SLOTS - MAX_STAGES :]),
        )
        return fields | {"has_text": bool(flags & _TEXT)}, shapes


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@dataclass
class Group:
    """A process group of the pipeline's ranks (rank 0 the orchestrator, rank i + 1 stage i), carrying packets in
    fixed-size frames.

    Why frames: a gloo receive posted after its send costs a round trip (recv-ready notice, then data), and a packet
    as header + one message per tensor costs one round trip each; on a loaded machine each is a scheduling delay.
    Here every message is a frame of `frame_bytes`, and each rank keeps `prepost` receives posted per peer ahead of
    time, so a packet that fits a frame crosses in one one-way message. A packet is its header and its tensors' bytes
    (each padded to 8 bytes), cut into as many frames as it needs; the header says how many.

    NCCL (untested here: no GPU on the machine this was written on) runs each peer pair's sends and receives on one
    stream, so a receive posted ahead from a peer this rank also sends to would hold those sends back: only the
    migration back-channel does that, so re-balancing across GPUs should move layers forward only until checked.

    Sends are non-blocking; at most `max_pending` packets stay in flight (older sends are waited for), which bounds the
    buffers kept alive and gives backpressure. Receives block: gloo's point-to-point work cannot be polled (it completes
    inside wait()) and a wait with a timeout poisons the whole group, so a rank that must watch for faults receives
    on a thread and watches the thread (`watched`).
    """

    group: object
    rank: int
    size: int
    device: torch.device
    frame_bytes: int = 256 * 1024
    prepost: int = 4
    max_pending: int = 4
    _sends: deque = field(default_factory=deque)
    _posted: dict = field(default_factory=dict)

    def isend(self, packet: Packet, dst: int) -> None:
        payload = ([packet.text] if packet.text is not None else []) + list(packet.tensors)
        header = packet.header("cpu")
        sizes = [_padded(t.numel() * t.element_size()) for t in payload]
        total = HEADER_SLOTS * 8 + sum(sizes)
        frames = -(-total // self.frame_bytes)
        buffer = torch.zeros(frames * self.frame_bytes, dtype=torch.uint8, device=self.device)
        buffer[: HEADER_SLOTS * 8].copy_(header.view(torch.uint8))
        offset = HEADER_SLOTS * 8
        for tensor, size in zip(payload, sizes):
            flat = tensor.detach().contiguous().view(-1).view(torch.uint8)
            buffer[offset : offset + flat.numel()].copy_(flat)
            offset += size
        try:
            works = [self.group.send([buffer[i * self.frame_bytes : (i + 1) * self.frame_bytes]], dst, 0) for i in range(frames)]
        except RuntimeError as error:  # gloo: the connection is gone
            raise StageFailed(f"send to rank {dst}: {error}") from error
        self._sends.append((works, buffer, dst))
        while len(self._sends) > self.max_pending:
            self._wait_sends(*self._sends.popleft())

    def flush(self) -> None:
        while self._sends:
            self._wait_sends(*self._sends.popleft())

    def _wait_sends(self, works: list, buffer: Tensor, dst: int) -> None:
        try:
            for work in works:
                work.wait()
        except RuntimeError as error:
            raise StageFailed(f"send to rank {dst}: {error}") from error

    def _next_frame(self, src: int) -> Tensor:
        posted = self._posted.setdefault(src, deque())
        while len(posted) < self.prepost:
            frame = torch.empty(self.frame_bytes, dtype=torch.uint8, device=self.device)
            posted.append((self.group.recv([frame], src, 0), frame))
        work, frame = posted.popleft()
        work.wait()
        frame_next = torch.empty(self.frame_bytes, dtype=torch.uint8, device=self.device)
        posted.append((self.group.recv([frame_next], src, 0), frame_next))
        return frame

    def recv(self, src: int) -> Packet:
        """The next packet from `src` (blocking); transport errors (a peer gone) become StageFailed."""
        try:
            first = self._next_frame(src)
            fields, shapes = Packet.layout(first[: HEADER_SLOTS * 8].view(torch.int64).cpu())
            sizes = [_padded(torch.Size(shape).numel() * dtype.itemsize) for dtype, shape in shapes]
            frames = -(-(HEADER_SLOTS * 8 + sum(sizes)) // self.frame_bytes)
            data = torch.cat([first] + [self._next_frame(src) for _ in range(frames - 1)]) if frames > 1 else first
        except RuntimeError as error:  # gloo: connection closed by peer, timeouts
            raise StageFailed(f"receive from rank {src}: {error}") from error
        tensors, offset = [], HEADER_SLOTS * 8
        for (dtype, shape), size in zip(shapes, sizes):
            count = torch.Size(shape).numel()
            tensors.append(data[offset : offset + count * dtype.itemsize].view(dtype).view(shape))
            offset += size
        text = tensors.pop(0) if fields.pop("has_text") else None
        return Packet(tensors=tuple(tensors), text=text, **fields)


def _padded(nbytes: int) -> int:
    return -(-nbytes // 8) * 8


def watched(fn: Callable[[], T], deadline: float, alive: Callable[[], bool], what: str) -> T:
    """Run a blocking `fn` on a daemon thread; raise StageFailed when `alive()` turns False or `deadline`
    (time.monotonic()) passes first. Errors of `fn` are raised here."""
    box: queue.Queue = queue.Queue(maxsize=1)

    def run() -> None:
        try:
            box.put((True, fn()))
        except BaseException as error:  # noqa: BLE001 - handed to the caller
            box.put((False, error))

    threading.Thread(target=run, daemon=True, name=f"watched {what}").start()
    return wait_watched(box, deadline, alive, what)


def wait_watched(box: queue.Queue, deadline: float, alive: Callable[[], bool], what: str):
    """The next (ok, value) from `box`, polled every 5 ms against `alive()` and `deadline`."""
    while True:
        try:
            ok, value = box.get(timeout=min(0.005, max(0.0, deadline - time.monotonic())))
        except queue.Empty:
            if not alive():
                raise StageFailed(f"{what}: a stage process died") from None
            if time.monotonic() >= deadline:
                raise StageFailed(f"{what}: no answer in time") from None
            continue
        if not ok:
            raise value if isinstance(value, StageFailed) else StageFailed(f"{what}: {value}") from value
        return value


def open_group(
    backend: str, addr: str, port: int, rank: int, size: int, *, start_timeout_s: float, idle_timeout_s: float,
    device: torch.device | str = "cpu", frame_bytes: int = 256 * 1024,
) -> Group:
    """Join the group of `size` ranks rendezvousing at addr:port (rank 0 hosts the store) within `start_timeout_s`.
    A blocking receive gives up after `idle_timeout_s` (a stream may idle; faults are caught by polling receives).
    gloo binds to `addr` (loopback in tests, no hostname lookup); nccl needs one CUDA device per rank."""
    store = dist.TCPStore(addr, port, size, rank == 0, timeout=datetime.timedelta(seconds=start_timeout_s))
    idle = datetime.timedelta(seconds=idle_timeout_s)
    if backend == "gloo":
        options = dist.ProcessGroupGloo._Options()
        options._devices = [dist.ProcessGroupGloo.create_device(hostname=addr)]
        options._timeout = idle
        group = dist.ProcessGroupGloo(store, rank, size, options)
    elif backend == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = idle
        group = dist.ProcessGroupNCCL(store, rank, size, options)
    else:
        raise ConfigError(f"backend={backend!r} must be 'gloo' or 'nccl'")
    return Group(group, rank, size, torch.device(device), frame_bytes=frame_bytes)


def receive_forever(group: "Group", source: int, results: queue.Queue) -> None:
    """A receiver thread's body: packets from rank `source` into `results` as (True, packet), until the group
    breaks, which ends it with (False, error) for whoever waits on the queue."""
    while True:
        try:
            packet = group.recv(source)
        except BaseException as error:  # noqa: BLE001 - handed to the waiter
            results.put((False, error))
            return
        results.put((True, packet))
