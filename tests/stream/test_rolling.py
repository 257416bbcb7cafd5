"""The rolling-window sampler (Rolling Forcing) against its cache-free reference; chunk accounting; prompt switches;
a window of one chunk is the standard chunk sampler; bad configs fail with clear errors. float64, tiny DiT, CPU."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

from framecast.models.config import AttentionKind, preset
from framecast.models.dit import CausalWanDiT
from framecast.models.errors import ConfigError
from framecast.stream.engine import CacheKind, EngineConfig, StreamEngine, SwitchPolicy, make_memory
from framecast.stream.families import family
from framecast.stream.noise import GaussianNoise
from framecast.stream.reference import reference_rolling_stream
from framecast.stream.rolling import RollingStreamEngine, RollingWindowMemory
from framecast.stream.sampler import FlowMatchSchedule


def tiny_dit(num_actions: int = 0, seed: int = 0) -> CausalWanDiT:
    torch.manual_seed(seed)
    dit = CausalWanDiT(preset("tiny", num_actions=num_actions)).double()
    if num_actions:
        torch.nn.init.normal_(dit.action_embedding.weight)  # a zero table would not test the action path
    return dit


def prompt(seed: int = 0, batch: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 5, preset("tiny").text_dim, dtype=torch.float64, generator=generator)


def config(**changes: object) -> EngineConfig:
    settings = dict(latent_height=2, latent_width=2, chunk_frames=2, denoising_steps=(1000, 750, 500, 250),
                    window_frames=14, sink_frames=2, sinks_follow_window=True, rolling_chunks=4, switch_policy=SwitchPolicy.KEEP)
    return EngineConfig(**{**settings, **changes})


CASES = {
    # Rolling Forcing's shape, scaled down: one chunk per step, sinks following, a few cached frames beside the window
    "reference-like": config(),
    "sinks-in-place": config(sinks_follow_window=False, context_noise=50),
    "no-sinks-no-past": config(sink_frames=0, window_frames=8, batch=2),
    "two-steps-per-slide": config(rolling_chunks=2, window_frames=9, chunk_frames=3, sink_frames=3, shift=3.0),
    "unwarped-3-steps": config(denoising_steps=(1000, 757, 522), warp_steps=False, rolling_chunks=3, window_frames=10),
    "chunk-of-one": config(chunk_frames=1, sink_frames=1, window_frames=7),
    # the rolling-forcing preset itself at a tiny latent size: 5 chunks of 3, 21-frame window, a 3-frame sink
    "rolling-forcing-preset": family("rolling-forcing").engine_config(2, 2),
}


@pytest.mark.parametrize("name", list(CASES))
def test_rolling_engine_equals_cache_free_reference(name: str) -> None:
    settings = CASES[name]
    num_chunks = max(12, 2 * settings.window_frames) // settings.chunk_frames  # past the window: eviction, sinks move
    dit = tiny_dit()
    engine = StreamEngine(dit, settings, prompt(batch=settings.batch), noise=GaussianNoise(7))
    assert isinstance(engine, RollingStreamEngine)
    chunks = [engine.next_chunk() for _ in range(num_chunks)]
    assert [c.first_frame for c in chunks] == [i * settings.chunk_frames for i in range(num_chunks)]
    expected = reference_rolling_stream(dit, settings, prompt(batch=settings.batch), GaussianNoise(7), num_chunks)
    torch.testing.assert_close(torch.cat([c.latents for c in chunks], dim=1), expected, rtol=0, atol=1e-10)


def test_actions_stay_with_the_chunk_they_entered_with() -> None:
    """Each chunk keeps the actions set when it entered the window; the reference gets them frame by frame."""
    settings, frames, window = config(), 2, 4
    dit = tiny_dit(num_actions=5)
    engine = StreamEngine(dit, settings, prompt(), noise=GaussianNoise(3))
    latents, set_before = [], []
    for call in range(6):
        engine.set_action(torch.tensor([call % 5, (call + 2) % 5]))
        set_before.append(torch.tensor([call % 5, (call + 2) % 5]))
        latents.append(engine.next_chunk().latents)
    # the first call admits chunks 0..3 under the first actions; call k > 0 admits chunk k + 3
    per_chunk = [set_before[0]] * window + set_before[1:]
    actions = torch.cat(per_chunk).unsqueeze(0)[:, : 9 * frames]
    expected = reference_rolling_stream(dit, settings, prompt(), GaussianNoise(3), 6, actions)
    torch.testing.assert_close(torch.cat(latents, dim=1), expected, rtol=0, atol=1e-10)


def test_every_chunk_runs_every_step_once_and_is_emitted_once_in_order() -> None:
    settings = config()
    engine = StreamEngine(tiny_dit(), settings, prompt())
    steps = FlowMatchSchedule(settings.shift).steps(settings.denoising_steps)
    calls: list[tuple[tuple[int, ...], list[float]]] = []

    def record(module, args) -> None:
        timesteps, memory = args[1], args[3]
        calls.append((memory.rope_positions(), timesteps[0].tolist()))

    engine.dit.register_forward_pre_hook(record)
    seen: dict[int, list[float]] = {}  # frame -> timesteps of the joint passes it was in, in order
    context: list[int] = []  # frames written by context passes
    emitted = []
    for expected_index in range(10):
        calls.clear()
        chunk = engine.next_chunk()
        emitted.append((chunk.index, chunk.first_frame))
        joint = calls[:-1]
        assert len(joint) == (4 if expected_index == 0 else 1)  # warm-up: 4 slides; then one joint pass per chunk
        for positions, timesteps in joint:
            for position, timestep in zip(positions, timesteps):
                seen.setdefault(position, []).append(timestep)
        positions, timesteps = calls[-1]  # the context pass: the emitted chunk, clean
        assert positions == tuple(range(chunk.first_frame, chunk.first_frame + 2)) and timesteps == [0.0, 0.0]
        context.extend(positions)
    assert emitted == [(i, 2 * i) for i in range(10)]
    assert context == list(range(20))  # each frame committed exactly once, in order
    for frame in range(20):  # every emitted frame went through the whole step list, in order, once
        assert seen[frame] == [step.timestep for step in steps]
    assert len(engine.window) == 3 and [c.done for c in engine.window] == [3, 2, 1]  # in flight, staggered


@pytest.mark.parametrize("follow", [False, True])
def test_window_of_one_chunk_is_the_standard_chunk_sampler(follow: bool) -> None:
    settings = config(rolling_chunks=1, window_frames=8, sinks_follow_window=follow, context_noise=50,
                      denoising_steps=(1000, 750, 500))
    dit = tiny_dit(num_actions=5)
    standard = StreamEngine(dit, settings, prompt(), noise=GaussianNoise(5))
    rolling = RollingStreamEngine(dit, settings, prompt(), noise=GaussianNoise(5), context_sinks=True)
    assert type(standard) is StreamEngine
    for call in range(10):  # 20 frames through an 8-frame window: eviction, moving sinks, actions
        for engine in (standard, rolling):
            engine.set_action(call % 5)
        a, b = standard.next_chunk(), rolling.next_chunk()
        assert (a.index, a.first_frame, a.steps) == (b.index, b.first_frame, b.steps)
        torch.testing.assert_close(a.latents, b.latents, rtol=0, atol=1e-12)  # to summation-order rounding


def test_without_sinks_both_context_passes_agree_and_one_chunk_is_the_standard_sampler() -> None:
    settings = config(rolling_chunks=1, window_frames=6, sink_frames=0)
    dit = tiny_dit()
    standard = StreamEngine(dit, settings, prompt(), noise=GaussianNoise(2))
    rolling = RollingStreamEngine(dit, settings, prompt(), noise=GaussianNoise(2))  # the reference's context pass
    a = torch.cat([c.latents for c in itertools.islice(standard.chunks(), 8)], dim=1)
    b = torch.cat([c.latents for c in itertools.islice(rolling.chunks(), 8)], dim=1)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_the_rolling_window_changes_the_stream() -> None:
    """Not a relabelled standard sampler: joint denoising, and where the sinks sit, both change the numbers."""
    dit = tiny_dit()
    rolling = [c.latents for c in itertools.islice(StreamEngine(dit, config(), prompt()).chunks(), 8)]
    standard = [c.latents for c in itertools.islice(StreamEngine(dit, config(rolling_chunks=1), prompt()).chunks(), 8)]
    in_place = [c.latents for c in itertools.islice(
        StreamEngine(dit, config(sinks_follow_window=False), prompt()).chunks(), 8)]
    assert not torch.allclose(rolling[0], standard[0])
    torch.testing.assert_close(rolling[:4], in_place[:4], rtol=0, atol=1e-12)  # sinks still at their own places
    assert not torch.allclose(rolling[7], in_place[7])  # frames 14, 15: the window no longer starts at the sinks


def counted(seed: int) -> GaussianNoise:
    noise = GaussianNoise(seed)
    noise.draws = 0
    draw = noise.draw

    def counting(*args):
        noise.draws += 1
        return draw(*args)

    noise.draw = counting
    return noise


@pytest.mark.parametrize("policy", list(SwitchPolicy))
def test_prompt_switch_mid_stream(policy: SwitchPolicy) -> None:
    dit, settings = tiny_dit(), config()
    plain = StreamEngine(dit, settings, prompt(), noise=GaussianNoise(4))
    switched = StreamEngine(dit, settings, prompt(), noise=counted(4))
    before = [switched.next_chunk() for _ in range(5)]
    draws = switched.noise.draws
    switched.set_prompt(prompt(seed=9), policy)
    after = [switched.next_chunk() for _ in range(4)]
    unswitched = [plain.next_chunk() for _ in range(9)]
    for a, b in zip(before, unswitched):  # nothing changes before the switch
        torch.testing.assert_close(a.latents, b.latents, rtol=0, atol=0)
    assert [c.index for c in after] == [5, 6, 7, 8]
    assert not torch.allclose(after[0].latents, unswitched[5].latents)
    if policy is SwitchPolicy.RESET:  # the stream starts over under the new prompt: a fresh stream, later noise
        assert [c.first_frame for c in after] == [0, 2, 4, 6]
        fresh = StreamEngine(dit, settings, prompt(seed=9), noise=GaussianNoise(4))
        for _ in range(draws):
            fresh.noise.draw(fresh.chunk_shape, torch.float64, torch.device("cpu"))
        for a, b in zip(after, [fresh.next_chunk() for _ in range(4)]):
            torch.testing.assert_close(a.latents, b.latents, rtol=0, atol=1e-12)
    else:
        assert [c.first_frame for c in after] == [10, 12, 14, 16]


def test_recache_and_keep_differ_after_a_switch() -> None:
    dit, outputs = tiny_dit(), {}
    for policy in (SwitchPolicy.KEEP, SwitchPolicy.RECACHE):
        engine = StreamEngine(dit, config(), prompt(), noise=GaussianNoise(4))
        for _ in range(5):
            engine.next_chunk()
        engine.set_prompt(prompt(seed=9), policy)
        outputs[policy] = engine.next_chunk().latents
    assert not torch.allclose(outputs[SwitchPolicy.KEEP], outputs[SwitchPolicy.RECACHE])


def test_rebasing_positions_preserves_the_stream() -> None:
    """Past the RoPE table the window's keys are re-based; relative positions (moved sinks included) are kept."""
    dit, settings = tiny_dit(), config()
    plain = StreamEngine(dit, settings, prompt())
    rebased = StreamEngine(dit, settings, prompt())
    rebased.memory = RollingWindowMemory(
        dit.config, batch=1, tokens_per_frame=1, window_frames=14, sink_frames=2, chunk_frames=2, rolling_frames=8,
        sinks_follow_window=True, dtype=torch.float64, rope_limit_frames=2 * 14 + 8,
    )
    nbytes = rebased.memory.nbytes
    a = torch.cat([c.latents for c in itertools.islice(plain.chunks(), 40)], dim=1)
    b = torch.cat([c.latents for c in itertools.islice(rebased.chunks(), 40)], dim=1)
    assert rebased.memory.ring.position_offset > 0 and rebased.memory.nbytes == nbytes
    torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(rolling_chunks=0), r"rolling_chunks=0 must be a positive integer"),
        (dict(rolling_chunks=3), r"rolling_chunks=3 must divide the number of denoising steps \(4\)"),
        (dict(cache=CacheKind.FULL, sink_frames=0, window_frames=24), r"needs the rolling cache"),
        (dict(window_frames=9), r"window_frames=9 must hold the sinks and the rolling window: >= sink_frames \+ "
                                r"rolling_chunks \* chunk_frames = 2 \+ 4 \* 2"),
        (dict(sink_frames=1), r"sink_frames=1 must be a whole number of chunks \(chunk_frames=2\)"),
        (dict(window_frames=510), r"2 \* window_frames \+ rolling_chunks \* chunk_frames = 1028 must be <= 1024"),
    ],
)
def test_bad_rolling_configs_name_value_and_rule(changes: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config(**changes)


def test_what_the_rolling_sampler_refuses() -> None:
    linear = CausalWanDiT(preset("tiny", attention=AttentionKind.LINEAR)).double()
    with pytest.raises(ConfigError, match="the rolling window needs softmax attention; the model uses linear"):
        StreamEngine(linear, config(), prompt())
    with pytest.raises(ConfigError, match="runs in StreamEngine only"):  # e.g. the layer pipeline's memories
        make_memory(tiny_dit(), config())
    engine = StreamEngine(tiny_dit(), config(), prompt())
    with pytest.raises(ConfigError, match=r"steps=\(1000, 500\): the rolling window runs every chunk through all"):
        engine.next_chunk(steps=(1000, 500))
    with pytest.raises(ConfigError, match="video-to-video"):
        engine.next_chunk(source=torch.zeros(engine.chunk_shape, dtype=torch.float64))
    assert engine.next_chunk(steps=(1000, 750, 500, 250)).index == 0  # the full list is fine
    with pytest.raises(ConfigError, match="needs the rolling cache"):
        RollingStreamEngine(tiny_dit(), dataclasses.replace(config(rolling_chunks=1), cache=CacheKind.FULL,
                                                            sink_frames=0), prompt())


def test_a_live_session_streams_the_rolling_sampler_degrading_by_fill_only() -> None:
    import asyncio

    from framecast.models.preview import PreviewDecoder
    from framecast.stream.session import Session, SessionConfig

    dit = tiny_dit().float()
    engine = StreamEngine(dit, family("rolling-forcing").engine_config(2, 2), prompt().float())
    session = Session(engine, PreviewDecoder(dit.config.out_dim), lambda text: prompt(), SessionConfig(
        fps=16, speed=8.0, latency_budget_s=2.0), token="t")
    assert session.scheduler.config.step_lists == (engine.config.denoising_steps,)  # one chunk's steps are fixed

    async def frames(count: int) -> list:
        mailbox = session.frames.subscribe(capacity=count)
        session.start()
        try:
            return [await asyncio.wait_for(mailbox.get(), 30) for _ in range(count)]
        finally:
            await asyncio.to_thread(session.close)

    received = asyncio.run(frames(24))
    assert [f.index for f in received] == list(range(24)) and session.failure is None
