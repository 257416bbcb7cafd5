"""The cached engine against the cache-free reference, on random configs; controls; endless streams."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from framecast.models.config import AttentionKind, preset
from framecast.models.dit import CausalWanDiT
from framecast.models.errors import ConfigError, ShapeError
from framecast.models.memory import KVCache
from framecast.stream.engine import CacheKind, EngineConfig, StreamEngine, SwitchPolicy
from framecast.stream.noise import GaussianNoise
from framecast.stream.reference import reference_stream


def random_case(seed: int) -> tuple[CausalWanDiT, EngineConfig, torch.Tensor]:
    rng = random.Random(seed)
    heads = rng.choice([1, 2, 3])
    head_dim = rng.choice([6, 8, 12, 16])
    attention = rng.choice([AttentionKind.SOFTMAX, AttentionKind.SOFTMAX, AttentionKind.LINEAR])
    dit_config = preset("tiny").replace(
        dim=heads * head_dim, num_heads=heads, ffn_dim=rng.choice([16, 40]), num_layers=rng.choice([1, 2, 3]),
        text_dim=rng.choice([8, 12]), text_len=rng.choice([4, 7]), freq_dim=rng.choice([16, 32]),
        in_dim=rng.choice([4, 16]), out_dim=rng.choice([4, 16]), attention=attention,
        num_actions=rng.choice([0, 5]), qk_norm=rng.choice([True, False]), cross_attn_norm=rng.choice([True, False]),
    )
    dit_config = dit_config.replace(out_dim=dit_config.in_dim)
    torch.manual_seed(seed)
    dit = CausalWanDiT(dit_config).double()
    if dit_config.num_actions:
        torch.nn.init.normal_(dit.action_embedding.weight)  # a zero table would not test the action path
    chunk = rng.choice([1, 2, 3])
    window = rng.choice([chunk + 1, 2 * chunk, 3 * chunk + 1])
    cache = rng.choice(list(CacheKind))
    engine_config = EngineConfig(
        latent_height=rng.choice([2, 4]), latent_width=rng.choice([2, 6]), chunk_frames=chunk,
        denoising_steps=tuple(sorted(rng.sample([1000, 900, 750, 500, 250, 100], rng.choice([1, 2, 3, 4])), reverse=True)),
        shift=rng.choice([1.0, 3.0, 5.0]), context_noise=rng.choice([0, 0, 50]), cache=cache,
        window_frames=window if cache is CacheKind.ROLLING else 24, sink_frames=rng.choice([0, 1]) if window - chunk >= 1 else 0,
        batch=rng.choice([1, 2]), seed=seed,
    )
    prompt = torch.randn(engine_config.batch, dit_config.text_len - 1, dit_config.text_dim, dtype=torch.float64)
    return dit, engine_config, prompt


@pytest.mark.parametrize("seed", range(12))
def test_cached_engine_equals_cache_free_reference(seed: int) -> None:
    dit, config, prompt = random_case(seed)
    num_chunks = 24 // config.chunk_frames if config.cache is CacheKind.FULL else 7
    num_chunks = min(num_chunks, config.window_frames // config.chunk_frames) if config.cache is CacheKind.FULL else num_chunks
    actions = None
    if dit.config.num_actions:
        actions = torch.randint(0, dit.config.num_actions, (config.batch, num_chunks * config.chunk_frames))
    engine = StreamEngine(dit, config, prompt, noise=GaussianNoise(seed))
    cached = []
    for index in range(num_chunks):
        if actions is not None:
            engine.set_action(actions[:, index * config.chunk_frames : (index + 1) * config.chunk_frames])
        cached.append(next(iter_chunks(engine)).latents)
    expected = reference_stream(dit, config, prompt, GaussianNoise(seed), num_chunks, actions)
    torch.testing.assert_close(torch.cat(cached, dim=1), expected, rtol=0, atol=1e-9)


_iterators: dict[int, object] = {}


def iter_chunks(engine: StreamEngine):
    """One chunks() iterator per engine, so successive next() calls continue the same stream."""
    return _iterators.setdefault(id(engine), engine.chunks())


def tiny_engine(prompt: torch.Tensor | None = None, **changes) -> StreamEngine:
    torch.manual_seed(0)
    dit = CausalWanDiT(preset("tiny", num_actions=changes.pop("num_actions", 0))).double()
    negative_prompt = changes.pop("negative_prompt", None)
    config = EngineConfig(latent_height=2, latent_width=2, **changes)
    default_prompt = torch.randn(1, 5, dit.config.text_dim, dtype=torch.float64)
    return StreamEngine(dit, config, default_prompt if prompt is None else prompt, negative_prompt=negative_prompt)


def other_prompt() -> torch.Tensor:
    return torch.randn(1, 6, preset("tiny").text_dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def test_prompt_switch_policies_differ_as_declared() -> None:
    outputs = {}
    for policy in SwitchPolicy:
        engine = tiny_engine(window_frames=9, sink_frames=3)
        other = other_prompt()
        stream = engine.chunks()
        chunks = [next(stream).latents for _ in range(4)]
        engine.set_prompt(other, policy)
        chunks += [next(stream) for _ in range(2)]
        outputs[policy] = chunks
        assert chunks[4].first_frame == (0 if policy is SwitchPolicy.RESET else 12)
    # a reset stream starts over: its first chunk after the switch equals a fresh stream under the new prompt
    fresh = tiny_engine(other_prompt(), window_frames=9, sink_frames=3)
    for _ in range(4 * len(fresh.steps)):  # skip the noise the switched engines drew before the switch
        fresh.noise.draw(fresh.chunk_shape, torch.float64, torch.device("cpu"))
    first = next(fresh.chunks())
    torch.testing.assert_close(first.latents, outputs[SwitchPolicy.RESET][4].latents, rtol=0, atol=1e-12)
    recache, keep = outputs[SwitchPolicy.RECACHE][4].latents, outputs[SwitchPolicy.KEEP][4].latents
    assert not torch.allclose(recache, keep)


def test_controls_reject_bad_input_without_touching_the_stream() -> None:
    engine = tiny_engine(num_actions=5)
    stream = engine.chunks()
    next(stream)
    with pytest.raises(ShapeError, match="prompt embedding has shape"):
        engine.set_prompt(torch.zeros(1, 5, 7, dtype=torch.float64))
    with pytest.raises(ShapeError, match="expected"):
        engine.set_prompt(torch.zeros(1, 99, engine.dit.config.text_dim, dtype=torch.float64))
    with pytest.raises(ConfigError, match=r"must be in \[0, 5\)"):
        engine.set_action(7)
    with pytest.raises(ShapeError, match="actions of shape"):
        engine.set_action(torch.zeros(5, dtype=torch.long))
    assert next(stream).index == 1
    with pytest.raises(ConfigError, match="takes no actions"):
        tiny_engine().set_action(1)


def test_actions_change_the_frames_they_apply_to() -> None:
    engine_a, engine_b = tiny_engine(num_actions=5), tiny_engine(num_actions=5)
    torch.nn.init.normal_(engine_a.dit.action_embedding.weight)
    engine_b.dit.load_state_dict(engine_a.dit.state_dict())
    engine_b.set_action(3)
    a, b = next(engine_a.chunks()).latents, next(engine_b.chunks()).latents
    assert not torch.allclose(a, b)


def test_reset_restarts_the_stream_with_the_same_prompt() -> None:
    engine = tiny_engine()
    stream = engine.chunks()
    first = next(stream)
    next(stream)
    engine.reset()
    again = next(stream)
    assert (again.index, again.first_frame) == (2, 0)
    assert again.latents.shape == first.latents.shape


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(chunk_frames=0), "chunk_frames=0"),
        (dict(window_frames=6, sink_frames=4), r"sink_frames=4 must be in \[0, window_frames - chunk_frames = 3\]"),
        (dict(denoising_steps=(250, 500)), "strictly descend"),
        (dict(denoising_steps=(1001,)), r"\[1, 1000\]"),
        (dict(context_noise=1000), "context_noise=1000"),
        (dict(window_frames=600), r"window_frames=600 must be in \[1, 512\]"),
        (dict(shift=0.0), "shift=0.0"),
        (dict(guidance=0.5), r"guidance=0.5 must be a number in \[1, 10\]"),
        (dict(guidance=True), r"guidance=True must be a number"),
        (dict(guidance=1.5, stream_batch=True), "guidance=1.5 runs in the chunk sampler only"),
        (dict(guidance=1.5, rolling_chunks=2), "guidance=1.5 runs in the chunk sampler only"),
        (dict(guided_steps=0), r"guided_steps=0 must be None \(every step\) or an integer in \[1, 4\]"),
        (dict(guided_steps=5), r"guided_steps=5 must be None .* in \[1, 4\] \(the steps of denoising_steps"),
        (dict(guided_steps=True), r"guided_steps=True must be None"),
    ],
)
def test_engine_config_errors_name_value_and_range(changes: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        EngineConfig(**changes)


def test_rebasing_positions_preserves_the_stream_without_sinks() -> None:
    """Re-based positions keep every relative distance when there are no sinks: same numbers as no re-basing."""
    plain = tiny_engine(window_frames=6, sink_frames=0)
    rebased = tiny_engine(window_frames=6, sink_frames=0)
    rebased.memory = KVCache(
        rebased.dit.config, batch=1, tokens_per_frame=1, window_frames=6, evicts=True, dtype=torch.float64,
        rope_limit_frames=12,
    )
    a = torch.cat([c.latents for c in itertools.islice(plain.chunks(), 30)], dim=1)
    b = torch.cat([c.latents for c in itertools.islice(rebased.chunks(), 30)], dim=1)
    assert rebased.memory.position_offset > 0
    torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


@pytest.mark.slow
@pytest.mark.parametrize("attention", [AttentionKind.SOFTMAX, AttentionKind.LINEAR])
def test_endless_stream_keeps_memory_and_positions_bounded(attention: AttentionKind) -> None:
    """3,000+ latent frames (past Wan's 1,024-entry RoPE table); 2,000 chunks; memory bytes never change."""
    torch.manual_seed(0)
    dit = CausalWanDiT(preset("tiny", attention=attention)).float()
    config = EngineConfig(latent_height=2, latent_width=2, chunk_frames=3, window_frames=12, sink_frames=3,
                          denoising_steps=(1000, 500))
    engine = StreamEngine(dit, config, torch.randn(1, 4, dit.config.text_dim))
    positions: list[int] = []
    original = engine.memory.rope_positions
    engine.memory.rope_positions = lambda: (p := original()) and (positions.extend(p) or p)
    nbytes = {}
    for chunk in itertools.islice(engine.chunks(), 2000):
        assert torch.isfinite(chunk.latents).all()
        if chunk.index in (10, 1999):
            nbytes[chunk.index] = engine.memory.nbytes
    assert chunk.first_frame + config.chunk_frames == 6000
    assert nbytes[10] == nbytes[1999]
    assert 0 <= min(positions) and max(positions) < 1024


def test_fewer_steps_per_chunk_follow_the_sub_schedule() -> None:
    full, fewer = tiny_engine(), tiny_engine()
    a = full.next_chunk()
    b = fewer.next_chunk(steps=(1000, 500))
    assert (a.steps, b.steps) == ((1000, 750, 500, 250), (1000, 500))
    assert not torch.allclose(a.latents, b.latents)
    with pytest.raises(ConfigError, match=r"steps=\(750,\) must be a sub-list"):
        fewer.next_chunk(steps=(750,))
    with pytest.raises(ConfigError, match="sub-list"):
        fewer.next_chunk(steps=(1000, 600))


def test_sinks_following_the_window_change_only_what_comes_after_eviction() -> None:
    plain = tiny_engine(window_frames=9, sink_frames=3)
    following = tiny_engine(window_frames=9, sink_frames=3, sinks_follow_window=True)
    a = [c.latents for c in itertools.islice(plain.chunks(), 12)]
    b = [c.latents for c in itertools.islice(following.chunks(), 12)]
    for index in range(3):  # frames 0..8 fit the window: nothing moves yet
        torch.testing.assert_close(a[index], b[index], rtol=0, atol=0)
    assert not torch.allclose(a[3], b[3])  # frames 9..11: the sinks now sit right before the window
    assert all(torch.isfinite(chunk).all() for chunk in b)


def test_video_to_video_starts_from_noised_source_latents() -> None:
    engine = tiny_engine(denoising_steps=(700, 400))
    calls = []
    engine.dit.register_forward_hook(lambda module, args, out: calls.append(args[0].clone()))
    source = torch.randn(engine.chunk_shape, dtype=torch.float64)
    generator_state = engine.noise.generator.get_state()
    engine.next_chunk(source=source)
    engine.noise.generator.set_state(generator_state)
    noise = engine.noise.draw(engine.chunk_shape, torch.float64, torch.device("cpu"))
    sigma = engine.steps[0].sigma
    assert 0 < sigma < 1
    keep = float(torch.tensor(1.0) - torch.tensor(sigma))
    torch.testing.assert_close(calls[0], keep * source + sigma * noise, rtol=0, atol=1e-12)
    with pytest.raises(ShapeError, match="source latents have shape"):
        engine.next_chunk(source=source[:, :1])


def chunks_of(engine: StreamEngine, count: int) -> list[torch.Tensor]:
    stream = engine.chunks()
    return [next(stream).latents for _ in range(count)]


def test_guidance_toward_the_null_prompt_itself_is_the_unguided_stream() -> None:
    """null + s x (prompt - null) = prompt when the null prompt is the prompt: exact only if the null prompt's own
    memory holds the same context as the prompt's, chunk after chunk (7 chunks roll a 6-frame window)."""
    prompt = torch.randn(1, 5, preset("tiny").text_dim, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    plain = chunks_of(tiny_engine(prompt, window_frames=6, sink_frames=0), 7)
    guided = chunks_of(tiny_engine(prompt, window_frames=6, sink_frames=0, guidance=3.0, negative_prompt=prompt), 7)
    for a, b in zip(plain, guided):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("attention", [AttentionKind.SOFTMAX, AttentionKind.LINEAR])
def test_unguided_later_steps_on_the_prompt_rows_alone_are_the_unguided_stream(attention: AttentionKind) -> None:
    """With the prompt as its own null prompt, guiding only the first step must still give the unguided stream
    exactly: the later steps' half-batch calls read and write the prompt's rows of the memory where the full calls
    do (7 chunks roll a 6-frame window), and the context pass keeps both rows' memories whole."""
    prompt = torch.randn(1, 5, preset("tiny").text_dim, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    settings = dict(window_frames=6, sink_frames=0, attention=attention)

    def engine(**changes) -> StreamEngine:
        torch.manual_seed(0)
        dit = CausalWanDiT(preset("tiny", attention=settings["attention"])).double()
        config = EngineConfig(latent_height=2, latent_width=2, window_frames=6, sink_frames=0, **changes)
        return StreamEngine(dit, config, prompt, negative_prompt=prompt if changes else None)

    plain = chunks_of(engine(), 7)
    for guided_steps in (1, 3):
        guided = chunks_of(engine(guidance=3.0, guided_steps=guided_steps), 7)
        for a, b in zip(plain, guided):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_guiding_fewer_steps_lands_between_the_guided_and_the_unguided_stream() -> None:
    """Guiding every step equals guided_steps = None; guiding the first step only differs from both guiding all and
    guiding none, from the first chunk on (its second step is unguided)."""
    prompt = torch.randn(1, 5, preset("tiny").text_dim, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    every = chunks_of(tiny_engine(prompt, guidance=2.5), 3)
    counted = chunks_of(tiny_engine(prompt, guidance=2.5, guided_steps=4), 3)
    first_only = chunks_of(tiny_engine(prompt, guidance=2.5, guided_steps=1), 3)
    unguided = chunks_of(tiny_engine(prompt), 3)
    for a, b in zip(every, counted):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for other in (every, unguided):  # a random tiny DiT barely follows its prompt: ~5e-4 apart, float64 noise ~1e-15
        assert (first_only[0] - other[0]).abs().max() > 1e-5


def test_guided_first_chunk_extrapolates_from_the_null_prompt_to_the_prompt() -> None:
    """One step from noise: x0 is affine in the flow, so the guided x0 is null_x0 + s x (x0 - null_x0); the default
    null prompt is all-zero rows (the empty prompt)."""
    prompt = torch.randn(1, 5, preset("tiny").text_dim, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    steps = dict(denoising_steps=(1000,))
    conditional = chunks_of(tiny_engine(prompt, **steps), 1)[0]
    null = chunks_of(tiny_engine(torch.zeros_like(prompt), **steps), 1)[0]
    guided = chunks_of(tiny_engine(prompt, guidance=2.5, **steps), 1)[0]
    torch.testing.assert_close(guided, null + 2.5 * (conditional - null), rtol=0, atol=1e-10)
    assert (guided - conditional).abs().max() > 1e-3


def test_reset_forgets_the_null_prompt_memory_too() -> None:
    engine = tiny_engine(guidance=2.0)
    stream = engine.chunks()
    next(stream), next(stream)
    engine.reset()
    after_reset = next(stream).latents
    fresh = tiny_engine(guidance=2.0)
    for _ in range(2 * len(fresh.steps)):  # the noise the first engine drew before its reset
        fresh.noise.draw(fresh.chunk_shape, torch.float64, torch.device("cpu"))
    torch.testing.assert_close(next(fresh.chunks()).latents, after_reset, rtol=0, atol=1e-12)
