"""Replays the reference implementations' golden runs (../shared/parity) through the engine, in float64.

Every model call (input, timestep, flow, clean estimate) and the final latents must match to 1e-10.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from framecast.models.config import preset
from framecast.models.dit import CausalWanDiT
from framecast.models.memory import BlockCausal
from framecast.stream.engine import CacheKind, EngineConfig, StreamEngine, SwitchPolicy
from framecast.stream.noise import ReplayNoise
from framecast.stream.sampler import FlowMatchSchedule, to_clean
from tests.conftest import load_fixture

ATOL = 1e-10


def build_dit(config: dict, state_dict: dict) -> CausalWanDiT:
    dit_config = preset("tiny").replace(
        dim=config["dim"], ffn_dim=config["ffn_dim"], num_heads=config["num_heads"], num_layers=config["num_layers"],
        text_dim=config["text_dim"], text_len=config["text_len"], freq_dim=config["freq_dim"], eps=config["eps"],
    )
    dit = CausalWanDiT(dit_config).double()
    dit.load_state_dict(state_dict)
    return dit


def replay_noise(noise: torch.Tensor, renoise: list, chunk_frames: int, steps: int) -> ReplayNoise:
    """The engine draws the chunk's initial noise, then one re-noise draw per step but the last."""
    draws, renoise = [], list(renoise)
    for first in range(0, noise.shape[1], chunk_frames):
        draws.append(noise[:, first : first + chunk_frames])
        draws.extend(renoise.pop(0) for _ in range(steps - 1))
    return ReplayNoise(draws)


def record_calls(dit: CausalWanDiT) -> list:
    calls: list = []
    dit.register_forward_hook(lambda module, args, flow: calls.append((args[0].clone(), args[1].clone(), flow.clone())))
    return calls


def run_engine(fixture_config: dict, run: dict, state_dict: dict, engine_config: EngineConfig, frames: int):
    dit = build_dit(fixture_config, state_dict)
    steps = len(fixture_config["denoising_step_list_raw"])
    noise = replay_noise(run["noise"], run["renoise"], engine_config.chunk_frames, steps)
    engine = StreamEngine(dit, engine_config, run["ctx"], noise=noise)
    calls = record_calls(dit)
    chunks = [chunk.latents for chunk in itertools.islice(engine.chunks(), frames // engine_config.chunk_frames)]
    return engine, calls, torch.cat(chunks, dim=1)


def assert_calls_match(calls: list, reference: list, schedule: FlowMatchSchedule) -> None:
    assert len(calls) == len(reference)
    for index, ((x_in, t, flow), ref) in enumerate(zip(calls, reference)):
        torch.testing.assert_close(t, ref["t"], rtol=0, atol=0, msg=f"call {index}: timesteps")
        torch.testing.assert_close(x_in, ref["x_in"], rtol=0, atol=ATOL, msg=f"call {index}: input")
        torch.testing.assert_close(flow, ref["flow"], rtol=0, atol=ATOL, msg=f"call {index}: flow")
        x0 = to_clean(x_in, flow, schedule.sigma_at(float(t[0, 0])))
        torch.testing.assert_close(x0, ref["x0"], rtol=0, atol=ATOL, msg=f"call {index}: x0")


def engine_config(config: dict, **changes) -> EngineConfig:
    return EngineConfig(
        latent_height=config["lat_h"], latent_width=config["lat_w"], chunk_frames=config["num_frame_per_block"],
        denoising_steps=tuple(config["denoising_step_list_raw"]), shift=config["timestep_shift"],
        context_noise=config["context_noise"], **changes,
    )


@pytest.fixture(scope="module")
def self_forcing() -> dict:
    return load_fixture("self_forcing_tiny_float64.pt")


def test_warped_steps_match_reference(self_forcing: dict) -> None:
    schedule = FlowMatchSchedule(self_forcing["config"]["timestep_shift"])
    warped = torch.tensor(schedule.warp(self_forcing["config"]["denoising_step_list_raw"]), dtype=torch.float32)
    torch.testing.assert_close(warped, self_forcing["warped_steps"].float(), rtol=0, atol=0)


def test_self_forcing_global_cache(self_forcing: dict) -> None:
    config, run = self_forcing["config"], self_forcing["global"]
    frames = run["noise"].shape[1]
    settings = engine_config(config, cache=CacheKind.FULL, window_frames=frames)
    _, calls, latents = run_engine(config, run, self_forcing["state_dict"], settings, frames)
    assert_calls_match(calls, run["calls"], FlowMatchSchedule(config["timestep_shift"]))
    torch.testing.assert_close(latents, run["latents"], rtol=0, atol=ATOL)


def test_self_forcing_rolling_cache_with_sinks(self_forcing: dict) -> None:
    config, run = self_forcing["config"], self_forcing["rolling"]
    frames = run["noise"].shape[1]
    settings = engine_config(
        config, cache=CacheKind.ROLLING, window_frames=run["local_attn_size"], sink_frames=run["sink_size"]
    )
    _, calls, latents = run_engine(config, run, run["state_dict"], settings, frames)
    assert_calls_match(calls, run["calls"], FlowMatchSchedule(config["timestep_shift"]))
    torch.testing.assert_close(latents, run["latents"], rtol=0, atol=ATOL)


def test_block_causal_training_forward_matches_reference_mask(self_forcing: dict) -> None:
    config, case = self_forcing["config"], self_forcing["mask_vs_kv"]
    dit = build_dit(config, self_forcing["state_dict"])
    x = case["x"]
    frames = x.shape[1]
    memory = BlockCausal(
        dit.config, num_frames=frames, chunk_frames=config["num_frame_per_block"],
        tokens_per_frame=config["frame_seqlen"],
    )
    with torch.inference_mode():
        flow = dit(x, case["t"].float(), dit.encode_text(self_forcing["global"]["ctx"]), memory)
    torch.testing.assert_close(flow, case["flow_train"], rtol=0, atol=ATOL)


def test_longlive_prompt_switch_with_recache() -> None:
    fixture = load_fixture("longlive_switch_tiny_float64.pt")
    config = fixture["config"]
    dit = build_dit(config, fixture["state_dict"])
    steps = len(config["denoising_step_list_raw"])
    chunk = config["num_frame_per_block"]
    settings = engine_config(
        config, cache=CacheKind.ROLLING, window_frames=config["local_attn_size"], sink_frames=config["sink_size"],
        switch_policy=SwitchPolicy.RECACHE,
    )
    noise = replay_noise(fixture["noise"], fixture["renoise"], chunk, steps)
    engine = StreamEngine(dit, settings, fixture["ctx"][0], noise=noise)
    calls = record_calls(dit)
    switch_frame = config["switch_frame_indices"][0]
    reference = fixture["calls"]
    recache_index = next(i for i, c in enumerate(reference) if c["kind"] == "recache")
    cache = engine.memory
    tokens = config["frame_seqlen"]

    def cached_frames(layer: int, frames: range) -> tuple[torch.Tensor, torch.Tensor]:
        slots = [cache._slot(f) * tokens + i for f in frames for i in range(tokens)]
        return cache.keys[layer][:, slots], cache.values[layer][:, slots]

    def assert_cache_matches(snapshot: dict) -> None:
        # the reference's buffer holds frames [0, sink) then the newest frames in order
        sink = config["sink_size"]
        frames = list(range(sink)) + list(range(switch_frame - (config["local_attn_size"] - sink), switch_frame))
        for layer in range(dit.config.num_layers):
            keys, values = cached_frames(layer, frames)
            torch.testing.assert_close(keys, snapshot["k"][layer], rtol=0, atol=ATOL, msg=f"{snapshot['when']} K {layer}")
            torch.testing.assert_close(values, snapshot["v"][layer], rtol=0, atol=ATOL, msg=f"{snapshot['when']} V {layer}")

    latents = []
    for chunk_out in itertools.islice(engine.chunks(), fixture["noise"].shape[1] // chunk):
        latents.append(chunk_out.latents)
        if chunk_out.first_frame + chunk == switch_frame:
            assert_cache_matches(fixture["kv_recache"][0])
            engine.set_prompt(fixture["ctx"][1])
            before = len(calls)
            engine._apply_controls()  # apply now (the engine would at the next boundary) to inspect the cache
            assert len(calls) == before + 1
            assert_cache_matches(fixture["kv_recache"][1])
    schedule = FlowMatchSchedule(config["timestep_shift"])
    assert_calls_match(calls[:recache_index], reference[:recache_index], schedule)
    # the recache re-encodes the frames still in the window; the reference also feeds evicted frames whose
    # keys never reach the cache (queries only), so compare the frames both compute
    x_in, t, flow = calls[recache_index]
    ref = reference[recache_index]
    skipped = ref["x_in"].shape[1] - x_in.shape[1]
    torch.testing.assert_close(x_in, ref["x_in"][:, skipped:], rtol=0, atol=ATOL)
    torch.testing.assert_close(flow, ref["flow"][:, skipped:], rtol=0, atol=ATOL)
    assert_calls_match(calls[recache_index + 1 :], reference[recache_index + 1 :], schedule)
    torch.testing.assert_close(torch.cat(latents, dim=1), fixture["latents"], rtol=0, atol=ATOL)
