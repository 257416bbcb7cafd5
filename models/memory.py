"""What the frames in flight attend to: the memory policies of the streaming DiT.

Every policy has one lifecycle, so the engine never branches on which one it holds:

    engine:     begin_chunk(n) | begin_recache()  ->  DiT calls  ->  commit()        reset() to start over
    attention:  rope_positions() once per call, attend(layer, q, k, v) once per layer

* `KVCache`: softmax attention over stored keys/values. `evicts=False` is the bounded full cache (every frame since
  the start, up to `window_frames`; more raises CacheFull). `evicts=True` is the rolling window with attention sinks
  (Self-Forcing / LongLive semantics): the first `sink_frames` frames stay forever, the rest is a ring of the newest
  frames. Buffers are allocated once; cursors are Python ints, so nothing here syncs with the device.
* `LinearState`: ReLU-kernel linear attention with a cumulative state (SANA-Video style block linear attention);
  its size is constant in the number of frames.
* `BlockCausal`: no memory at all; a whole sequence in one call under the block-causal (optionally windowed) mask.
  The cache-free reference the cached paths are tested against, and the training forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from framecast.kernels.attention import attention, linear_attention, masked_linear_attention
from framecast.models.config import ROPE_TABLE_FRAMES, AttentionKind, DiTConfig
from framecast.models.errors import CacheFull, ConfigError
from framecast.models.rope import Rope, rotate


class Memory(Protocol):
    committed_frames: int

    def begin_chunk(self, num_frames: int) -> None: ...  # the next `num_frames` frames are in flight
    def begin_recache(self) -> range: ...  # frames to re-encode under a new prompt; they are in flight
    def rope_positions(self) -> tuple[int, ...]: ...  # RoPE frame position of each frame in flight
    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor: ...  # store this call's k/v, attend
    def commit(self) -> None: ...  # the frames in flight become context
    def reset(self) -> None: ...

    @property
    def nbytes(self) -> int: ...


@dataclass(frozen=True)
class _Plan:
    """The frames in flight: where their keys go (runs of (input_token, slot_token, tokens)) and what is attended."""

    first: int
    stop: int
    writes: tuple[tuple[int, int, int], ...]
    attended_tokens: int
    positions: tuple[int, ...]
    advances: bool  # a chunk moves the stream forward on commit; a recache does not


class _Planned:
    """What every cached policy shares: the plan of the frames in flight."""

    _plan: _Plan | None = None

    def _in_flight(self) -> _Plan:
        if self._plan is None:
            raise RuntimeError("no frames in flight: call begin_chunk() or begin_recache() first")
        return self._plan

    def rope_positions(self) -> tuple[int, ...]:
        return self._in_flight().positions


class KVCache(_Planned):
    """Keys/values of committed frames in fixed buffers [layers, B, window_frames * tokens_per_frame, H, D].

    Slots: frames [0, sink_frames) own slots [0, sink_frames); every later frame f lives in ring slot
    sink + (f - sink) mod (window - sink), so rolling the window is a write over the oldest frame, never a copy.
    Attention is order-free over keys, so ring order gives the reference's numbers (to summation-order rounding).

    Keys are stored rotated. RoPE positions are absolute frame indices, as in the reference, until a chunk would end
    past the 1024-frame table; then the window is re-based: its keys are rotated back so that the oldest window frame
    sits right after the sinks, and positions continue from there. Relative positions inside the window are kept.
    """

    per_layer_buffers = ("keys", "values", "sink_keys")  # [layers, ...] each (None when unused); a pipeline moves them

    def __init__(
        self,
        config: DiTConfig,
        *,
        batch: int,
        tokens_per_frame: int,
        window_frames: int,
        sink_frames: int = 0,
        evicts: bool = True,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        rope_limit_frames: int = ROPE_TABLE_FRAMES,
        sinks_follow_window: bool = False,
    ) -> None:
        if config.attention is not AttentionKind.SOFTMAX:
            raise ConfigError(f"a KV cache needs softmax attention; the model uses {config.attention.value}")
        if not 1 <= window_frames <= ROPE_TABLE_FRAMES // 2:
            raise ConfigError(f"window_frames={window_frames} must be in [1, {ROPE_TABLE_FRAMES // 2}]")
        if not 0 <= sink_frames < window_frames:
            raise ConfigError(f"sink_frames={sink_frames} must be in [0, window_frames={window_frames})")
        if not 2 * window_frames <= rope_limit_frames <= ROPE_TABLE_FRAMES:
            raise ConfigError(f"rope_limit_frames={rope_limit_frames} must be in [2 * window_frames, {ROPE_TABLE_FRAMES}]")
        self.rope_limit_frames = rope_limit_frames
        self.window_frames, self.sink_frames, self.evicts = window_frames, sink_frames, evicts
        self.ring_frames = window_frames - sink_frames
        self.tokens_per_frame = tokens_per_frame
        self.rope = Rope(config)
        self.frame_pairs = config.rope_split[0]
        shape = (config.num_layers, batch, window_frames * tokens_per_frame, config.num_heads, config.head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        # Rolling Forcing keeps the sinks' positions just before the window; their keys as rotated at their own
        # positions are kept aside, and each chunk re-rotates them from there (one rotation: no drift over time)
        self.sinks_follow_window = sinks_follow_window and sink_frames > 0 and evicts
        sink_shape = (*shape[:2], sink_frames * tokens_per_frame, *shape[3:])
        self.sink_keys = torch.zeros(sink_shape, dtype=dtype, device=device) if self.sinks_follow_window else None
        self.reset()

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes + (self.sink_keys.nbytes if self.sink_keys is not None else 0)

    def reset(self) -> None:
        self.committed_frames = 0
        self.position_offset = 0  # frames subtracted from absolute indices of window frames (see re-basing)
        self._plan: _Plan | None = None

    def _slot(self, frame: int) -> int:
        if frame < self.sink_frames:
            return frame
        return self.sink_frames + (frame - self.sink_frames) % self.ring_frames

    def _position(self, frame: int) -> int:
        return frame if frame < self.sink_frames else frame - self.position_offset

    def _writes(self, first: int, stop: int) -> tuple[tuple[int, int, int], ...]:
        """Contiguous runs of frames [first, stop) in slot space, in tokens."""
        runs: list[list[int]] = []
        for frame in range(first, stop):
            slot = self._slot(frame)
            if runs and runs[-1][1] + runs[-1][2] == slot:
                runs[-1][2] += 1
            else:
                runs.append([frame - first, slot, 1])
        tpf = self.tokens_per_frame
        return tuple((src * tpf, dst * tpf, count * tpf) for src, dst, count in runs)

    def _plan_frames(self, first: int, stop: int, advances: bool) -> None:
        self._plan = _Plan(
            first=first,
            stop=stop,
            writes=self._writes(first, stop),
            attended_tokens=min(max(stop, self.committed_frames), self.window_frames) * self.tokens_per_frame,
            positions=tuple(self._position(f) for f in range(first, stop)),
            advances=advances,
        )

    def begin_chunk(self, num_frames: int) -> None:
        limit = self.ring_frames if self.evicts else self.window_frames
        if not 1 <= num_frames <= limit:
            raise ConfigError(f"chunk of {num_frames} frames must be in [1, {limit}] for this cache")
        first, stop = self.committed_frames, self.committed_frames + num_frames
        if not self.evicts and stop > self.window_frames:
            raise CacheFull(
                f"full cache holds {self.window_frames} frames; frame {stop - 1} does not fit "
                "(use the rolling cache for endless streams)"
            )
        if stop - self.position_offset > self.rope_limit_frames:
            self._rebase(stop)
        if self.sinks_follow_window and stop > self.window_frames:
            self._move_sinks(oldest_window_frame=stop - self.ring_frames)
        self._plan_frames(first, stop, advances=True)

    def begin_recache(self) -> range:
        """Frames to re-encode: all if none was evicted (sinks included, as LongLive), else the window without sinks."""
        committed = self.committed_frames
        first = 0 if committed <= self.window_frames else committed - self.ring_frames
        self._plan_frames(first, committed, advances=False)
        return range(first, committed)

    def _move_sinks(self, oldest_window_frame: int) -> None:
        """Rotate the sinks' keys so that they sit right before the oldest window frame's position."""
        shift = self._position(oldest_window_frame) - self.sink_frames
        cos, sin = self.rope.frame_shift(shift, self.keys.dtype, self.keys.device)
        pairs = 2 * self.frame_pairs
        sink_slots = self.keys[:, :, : self.sink_frames * self.tokens_per_frame, :, :pairs]
        sink_slots.copy_(rotate(self.sink_keys[..., :pairs], cos, sin))

    def _rebase(self, stop: int) -> None:
        new_offset = stop - self.ring_frames - self.sink_frames
        cos, sin = self.rope.frame_shift(self.position_offset - new_offset, self.keys.dtype, self.keys.device)
        window_keys = self.keys[:, :, self.sink_frames * self.tokens_per_frame :, :, : 2 * self.frame_pairs]
        window_keys.copy_(rotate(window_keys, cos, sin))
        self.position_offset = new_offset

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, rows: int | None = None) -> Tensor:
        """`rows`: the call holds only the first `rows` batch rows (see `FirstRows`); the others stay as they are."""
        plan = self._in_flight()
        keys, values = self.keys[layer, :rows], self.values[layer, :rows]
        for src, dst, count in plan.writes:
            keys[:, dst : dst + count].copy_(k[:, src : src + count])
            values[:, dst : dst + count].copy_(v[:, src : src + count])
        return attention(q, keys[:, : plan.attended_tokens], values[:, : plan.attended_tokens])

    def commit(self) -> None:
        plan = self._in_flight()
        if self.sinks_follow_window and plan.first < self.sink_frames:  # sink keys (re)written at their own positions
            self.sink_keys.copy_(self.keys[:, :, : self.sink_frames * self.tokens_per_frame])
        if plan.advances:
            self.committed_frames = plan.stop
        self._plan = None


class LinearState(_Planned):
    """Cumulative linear-attention state per layer: sum of phi(k)^T v [B, H, D, D] and of phi(k) [B, H, D].

    Frame positions for RoPE are the frame's index inside its chunk, so they stay bounded forever; order across
    chunks is carried by the causal state itself. A recache rebuilds the state from the last `recache_frames`
    frames under the new prompt (older history cannot be re-encoded from a sum).
    """

    per_layer_buffers = ("state", "normalizer", "pending_state", "pending_normalizer")  # [layers, ...] each

    def __init__(
        self,
        config: DiTConfig,
        *,
        batch: int,
        chunk_frames: int,
        recache_frames: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if config.attention is not AttentionKind.LINEAR:
            raise ConfigError(f"a linear-attention state needs linear attention; the model uses {config.attention.value}")
        if chunk_frames < 1 or recache_frames < 1:
            raise ConfigError(f"chunk_frames={chunk_frames} and recache_frames={recache_frames} must be >= 1")
        self.chunk_frames, self.recache_frames = chunk_frames, recache_frames
        compute = torch.float64 if dtype == torch.float64 else torch.float32
        heads, width = config.num_heads, config.head_dim
        state_shape, normalizer_shape = (config.num_layers, batch, heads, width, width), (config.num_layers, batch, heads, width)
        self.state = torch.zeros(state_shape, dtype=compute, device=device)
        self.normalizer = torch.zeros(normalizer_shape, dtype=compute, device=device)
        self.pending_state = torch.zeros_like(self.state)
        self.pending_normalizer = torch.zeros_like(self.normalizer)
        self._empty_state = torch.zeros_like(self.state[0])
        self._empty_normalizer = torch.zeros_like(self.normalizer[0])
        self.reset()

    @property
    def nbytes(self) -> int:
        buffers = (self.state, self.normalizer, self.pending_state, self.pending_normalizer)
        return sum(b.nbytes for b in buffers) + self._empty_state.nbytes + self._empty_normalizer.nbytes

    def reset(self) -> None:
        self.committed_frames = 0
        self.state.zero_()
        self.normalizer.zero_()
        self._plan: _Plan | None = None

    def _plan_frames(self, first: int, stop: int, advances: bool) -> None:
        positions = tuple(f % self.chunk_frames for f in range(first, stop))
        self._plan = _Plan(first, stop, writes=(), attended_tokens=0, positions=positions, advances=advances)

    def begin_chunk(self, num_frames: int) -> None:
        if num_frames < 1:
            raise ConfigError(f"chunk of {num_frames} frames must be >= 1")
        self._plan_frames(self.committed_frames, self.committed_frames + num_frames, advances=True)

    def begin_recache(self) -> range:
        first = max(0, self.committed_frames - self.recache_frames)
        self._plan_frames(first, self.committed_frames, advances=False)
        return range(first, self.committed_frames)

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, rows: int | None = None) -> Tensor:
        """`rows`: the call holds only the first `rows` batch rows (see `FirstRows`); the others stay as they are."""
        plan = self._in_flight()
        state = self.state[layer, :rows] if plan.advances else self._empty_state[:rows]
        normalizer = self.normalizer[layer, :rows] if plan.advances else self._empty_normalizer[:rows]
        out, block_state, block_normalizer = linear_attention(q, k, v, state, normalizer)
        self.pending_state[layer, :rows].copy_(block_state)
        self.pending_normalizer[layer, :rows].copy_(block_normalizer)
        return out

    def commit(self) -> None:
        plan = self._in_flight()
        if plan.advances:
            self.state.add_(self.pending_state)
            self.normalizer.add_(self.pending_normalizer)
            self.committed_frames = plan.stop
        else:  # a recache replaces the history with the re-encoded window
            self.state.copy_(self.pending_state)
            self.normalizer.copy_(self.pending_normalizer)
        self._plan = None


class FirstRows:
    """The first `rows` batch rows of a `KVCache` or `LinearState`, as a memory of their own for one DiT call.

    A guided stream keeps the prompt's rows then the null prompt's in one memory; a step that runs unguided calls the
    DiT on the prompt's rows alone, at half the batch. It writes the prompt rows' keys (or state terms) of the frames
    in flight and leaves the null rows' as they were: the next guided call, or the context pass, writes those before
    anything reads them.
    """

    def __init__(self, memory: KVCache | LinearState, rows: int) -> None:
        if not isinstance(memory, (KVCache, LinearState)):
            raise ConfigError(f"{type(memory).__name__} has no rows to split (a KVCache or LinearState has)")
        self.memory, self.rows = memory, rows

    @property
    def committed_frames(self) -> int:
        return self.memory.committed_frames

    def rope_positions(self) -> tuple[int, ...]:
        return self.memory.rope_positions()

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return self.memory.attend(layer, q, k, v, rows=self.rows)


class BlockCausal:
    """A whole sequence in one call: frame j is visible to chunk c's queries when j ends no later than chunk c and,
    with a window, j is a sink or one of the newest `window_frames - sink_frames` frames up to chunk c's end.
    Equals what the cached policies compute chunk by chunk (the cache-free reference)."""

    committed_frames = 0

    def __init__(
        self,
        config: DiTConfig,
        *,
        num_frames: int,
        chunk_frames: int,
        tokens_per_frame: int,
        window_frames: int | None = None,
        sink_frames: int = 0,
        device: torch.device | str = "cpu",
    ) -> None:
        self.kind = config.attention
        frame = torch.arange(num_frames)
        chunk_end = (frame // chunk_frames + 1) * chunk_frames  # end (exclusive) of each frame's chunk
        visible = frame[None, :] < chunk_end[:, None]  # [query frame, key frame]
        if window_frames is not None and self.kind is AttentionKind.SOFTMAX:
            in_window = frame[None, :] >= chunk_end[:, None] - (window_frames - sink_frames)
            visible &= in_window | (frame[None, :] < sink_frames)
        self.mask = visible.repeat_interleave(tokens_per_frame, 0).repeat_interleave(tokens_per_frame, 1).to(device)
        if self.kind is AttentionKind.SOFTMAX:
            self.positions = tuple(range(num_frames))
        else:
            self.positions = tuple(f % chunk_frames for f in range(num_frames))

    nbytes = 0

    def begin_chunk(self, num_frames: int) -> None:
        raise RuntimeError("BlockCausal runs whole sequences; it has no chunks")

    def begin_recache(self) -> range:
        raise RuntimeError("BlockCausal runs whole sequences; it has nothing to recache")

    def rope_positions(self) -> tuple[int, ...]:
        return self.positions

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if self.kind is AttentionKind.SOFTMAX:
            return attention(q, k, v, mask=self.mask)
        return masked_linear_attention(q, k, v, self.mask)

    def commit(self) -> None:
        pass

    def reset(self) -> None:
        pass
