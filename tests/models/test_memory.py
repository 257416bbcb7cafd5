"""Memory policies: slot layout, bounds, allocation-free rolling, recache ranges."""

import pytest
import torch

from framecast.models.config import AttentionKind, preset
from framecast.models.errors import CacheFull, ConfigError
from framecast.models.memory import BlockCausal, FirstRows, KVCache, LinearState

TINY = preset("tiny")


def cache(**changes) -> KVCache:
    settings = dict(batch=1, tokens_per_frame=2, window_frames=9, sink_frames=3, evicts=True, dtype=torch.float64)
    settings.update(changes)
    return KVCache(TINY, **settings)


def run_chunk(memory, frames: int, value: float) -> None:
    """One chunk whose keys are all `value`, through every layer."""
    memory.begin_chunk(frames)
    tokens = frames * memory.tokens_per_frame
    k = torch.full((1, tokens, TINY.num_heads, TINY.head_dim), value, dtype=torch.float64)
    for layer in range(TINY.num_layers):
        memory.attend(layer, k, k, k)
    memory.commit()


def frame_values(memory: KVCache) -> list[float]:
    """The value stored in each frame slot of layer 0."""
    per_frame = memory.values[0, 0, :, 0, 0].view(memory.window_frames, memory.tokens_per_frame)[:, 0]
    return per_frame.tolist()


def test_rolling_cache_keeps_sinks_and_overwrites_the_oldest_frames_in_place() -> None:
    memory = cache()
    pointers = (memory.keys.data_ptr(), memory.values.data_ptr())
    for chunk in range(5):  # frames 0..14, chunk c holds value c
        run_chunk(memory, 3, float(chunk))
    # sinks: chunk 0; ring of 6 frames holds the newest frames 9..14 (chunks 3, 4)
    assert frame_values(memory) == [0, 0, 0, 3, 3, 3, 4, 4, 4]
    assert (memory.keys.data_ptr(), memory.values.data_ptr()) == pointers
    assert memory.committed_frames == 15
    assert memory.begin_recache() == range(9, 15)
    assert memory.rope_positions() == tuple(range(9, 15))


def test_recache_before_any_eviction_covers_every_frame_sinks_included() -> None:
    memory = cache()
    run_chunk(memory, 3, 1.0)
    run_chunk(memory, 3, 2.0)
    assert memory.begin_recache() == range(0, 6)


def test_full_cache_raises_when_full() -> None:
    memory = cache(evicts=False, sink_frames=0, window_frames=6)
    run_chunk(memory, 3, 1.0)
    run_chunk(memory, 3, 2.0)
    with pytest.raises(CacheFull, match="full cache holds 6 frames; frame 8 does not fit"):
        memory.begin_chunk(3)


def test_cache_validates_its_sizes() -> None:
    with pytest.raises(ConfigError, match=r"sink_frames=9 must be in \[0, window_frames=9\)"):
        cache(sink_frames=9)
    with pytest.raises(ConfigError, match="chunk of 7 frames must be in"):
        cache().begin_chunk(7)
    with pytest.raises(ConfigError, match="needs softmax attention"):
        KVCache(preset("tiny", attention=AttentionKind.LINEAR), batch=1, tokens_per_frame=1, window_frames=4)
    with pytest.raises(RuntimeError, match="no frames in flight"):
        cache().rope_positions()


def test_rebase_moves_positions_back_and_stays_within_the_table() -> None:
    memory = cache(rope_limit_frames=18)
    for chunk in range(8):
        run_chunk(memory, 3, float(chunk))
        assert max(memory.rope_positions() if memory._plan else (0,)) <= 18
    memory.begin_chunk(3)  # frames 24..26
    assert memory.position_offset > 0
    positions = memory.rope_positions()
    assert positions == tuple(range(24 - memory.position_offset, 27 - memory.position_offset))
    assert positions[-1] < 18


def test_linear_state_size_is_constant_and_recache_replaces_the_history() -> None:
    config = preset("tiny", attention=AttentionKind.LINEAR)
    state = LinearState(config, batch=1, chunk_frames=3, recache_frames=6, dtype=torch.float64)
    size = state.nbytes
    q = torch.rand(1, 6, config.num_heads, config.head_dim, dtype=torch.float64)
    for _ in range(4):
        state.begin_chunk(3)
        assert state.rope_positions() == (0, 1, 2)
        for layer in range(config.num_layers):
            state.attend(layer, q, q, q)
        state.commit()
    assert state.nbytes == size
    before = state.state.clone()
    frames = state.begin_recache()
    assert frames == range(6, 12)
    for layer in range(config.num_layers):
        state.attend(layer, q.repeat(1, 2, 1, 1), q.repeat(1, 2, 1, 1), q.repeat(1, 2, 1, 1))
    state.commit()
    torch.testing.assert_close(state.state * 2, before, rtol=1e-12, atol=0)  # 2 chunks' worth instead of 4


def test_block_causal_mask_follows_chunks_window_and_sinks() -> None:
    memory = BlockCausal(TINY, num_frames=9, chunk_frames=3, tokens_per_frame=1, window_frames=6, sink_frames=1)
    visible = memory.mask.int()
    assert visible[0].tolist() == [1, 1, 1, 0, 0, 0, 0, 0, 0]
    assert visible[4].tolist() == [1, 1, 1, 1, 1, 1, 0, 0, 0]
    assert visible[8].tolist() == [1, 0, 0, 0, 1, 1, 1, 1, 1]  # sink + newest 5 frames up to the chunk's end


def test_sinks_follow_the_window_from_their_original_rotation() -> None:
    from framecast.models.rope import Rope, rotate

    memory = cache(sinks_follow_window=True)
    generator = torch.Generator().manual_seed(0)
    sink_keys = None
    for chunk in range(6):  # frames 0..17; the window evicts from chunk 3 on
        memory.begin_chunk(3)
        k = torch.randn(1, 6, TINY.num_heads, TINY.head_dim, dtype=torch.float64, generator=generator)
        for layer in range(TINY.num_layers):
            memory.attend(layer, k, k, k)
        memory.commit()
        if chunk == 0:
            sink_keys = k.clone()
    memory.begin_chunk(3)  # frames 18..20: the ring keeps frames 15..20, so the sinks sit at positions 12..14
    shift = memory.rope_positions()[0] - 3 - 3
    cos, sin = Rope(TINY).frame_shift(shift, torch.float64, torch.device("cpu"))
    pairs = 2 * TINY.rope_split[0]
    expected = sink_keys.clone()
    expected[..., :pairs] = rotate(sink_keys[..., :pairs], cos, sin)
    torch.testing.assert_close(memory.keys[0][:, :6], expected, rtol=0, atol=1e-12)
    assert shift == 12


@pytest.mark.parametrize("kind", ["kv", "linear"])
def test_first_rows_write_and_read_only_their_rows(kind: str) -> None:
    """A call on the first row of a batch-2 memory answers as a batch-1 memory holding that row, and leaves the
    second row's keys (or state terms) as they were."""
    config = TINY if kind == "kv" else TINY.replace(attention=AttentionKind.LINEAR)

    def make(batch: int):
        if kind == "kv":
            return KVCache(config, batch=batch, tokens_per_frame=2, window_frames=6, dtype=torch.float64)
        return LinearState(config, batch=batch, chunk_frames=3, recache_frames=6, dtype=torch.float64)

    generator = torch.Generator().manual_seed(5)
    shape = (2, 6, config.num_heads, config.head_dim)
    context = [torch.randn(shape, dtype=torch.float64, generator=generator) for _ in range(3)]
    pair, single = make(2), make(1)
    for memory, rows in ((pair, slice(None)), (single, slice(0, 1))):  # a committed chunk, one row apart
        memory.begin_chunk(3)
        for layer in range(config.num_layers):
            memory.attend(layer, *(t[rows] for t in context))
        memory.commit()
    q, k, v = (torch.randn((1, *shape[1:]), dtype=torch.float64, generator=generator) for _ in range(3))
    buffers = ("keys", "values") if kind == "kv" else ("pending_state", "pending_normalizer")
    pair.begin_chunk(3), single.begin_chunk(3)
    before = {name: getattr(pair, name)[:, 1].clone() for name in buffers}
    rows = FirstRows(pair, 1)
    assert rows.rope_positions() == single.rope_positions() and rows.committed_frames == 3
    for layer in range(config.num_layers):
        torch.testing.assert_close(rows.attend(layer, q, k, v), single.attend(layer, q, k, v), rtol=0, atol=1e-12)
    for name in buffers:
        torch.testing.assert_close(getattr(pair, name)[:, 1], before[name], rtol=0, atol=0)
        torch.testing.assert_close(getattr(pair, name)[:, :1], getattr(single, name), rtol=0, atol=1e-12)


def test_first_rows_refuse_a_memory_without_rows() -> None:
    mask_only = BlockCausal(TINY, num_frames=3, chunk_frames=3, tokens_per_frame=2)
    with pytest.raises(ConfigError, match="BlockCausal has no rows to split"):
        FirstRows(mask_only, 1)
