"""Streams of the world model under a known script of prompts and actions, and the world's own answer to it.

An `StreamScript` says what a stream is asked: the scene shown from each frame on (switches at chunk boundaries,
where a live prompt lands too) and the key held into every frame. `model_rollout` streams a model through the
engine and decoder exactly as `framecast generate` does; `world_rollout` renders the procedural world under the
same script (the ground truth row of the evaluation).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from framecast.models.errors import ConfigError
from framecast.models.world.episodes import HeldKeys
from framecast.models.world.evaluation import Rollout
from framecast.models.world.prompt import SceneSettings, parse_prompt, random_settings
from framecast.models.world.state import WorldConfig
from framecast.models.world.vocabulary import Action
from framecast.models.world.world import World
from framecast.stream.worldmodel.recipe import CHUNK_FRAMES


@dataclass(frozen=True)
class StreamScript:
    settings: tuple[SceneSettings, ...]  # [T] the scene asked for in frame t
    actions: np.ndarray  # int64 [T] the key held into frame t

    def __post_init__(self) -> None:
        if len(self.settings) != len(self.actions) or not len(self.actions):
            raise ConfigError(f"{len(self.settings)} settings for {len(self.actions)} actions; need one each per frame")

    @property
    def frames(self) -> int:
        return len(self.actions)


def random_script(seed: int, frames: int, switch_every: int | None) -> StreamScript:
    """Random held keys and a new random scene every `switch_every` frames (a multiple of the chunk)."""
    if switch_every is not None and switch_every % CHUNK_FRAMES:
        raise ConfigError(f"switch_every={switch_every} must be a multiple of the chunk ({CHUNK_FRAMES} frames)")
    rng = np.random.default_rng([seed, 11])
    actions = HeldKeys().actions(rng, frames)
    settings, current = [], random_settings(rng)
    for t in range(frames):
        if switch_every and t and t % switch_every == 0:
            current = random_settings(rng, unlike=current)
        settings.append(current)
    return StreamScript(tuple(settings), actions)


def replay_opening(script: StreamScript, frames: int, at: int) -> StreamScript:
    """The script with its first `frames` frames (scenes and keys) played again from frame `at` (a chunk boundary):
    a drift measurement then grades the same asks early and late in one stream, so that what differs is how long
    the model has streamed, not which scenes each window happened to draw."""
    if at % CHUNK_FRAMES or not frames <= at <= script.frames - frames:
        raise ConfigError(f"replay at frame {at} of a {script.frames}-frame script: it must be a chunk boundary "
                          f"({CHUNK_FRAMES} frames) in [{frames}, {script.frames - frames}]")
    settings = script.settings[:at] + script.settings[:frames] + script.settings[at + frames:]
    actions = script.actions.copy()
    actions[at : at + frames] = script.actions[:frames]
    return StreamScript(settings, actions)


def world_rollout(script: StreamScript, seed: int = 0, config: WorldConfig = WorldConfig()) -> Rollout:
    """The procedural world itself under the script: the ground truth a model's stream is measured against."""
    world = World(config, seed, script.settings[0])
    frames = np.empty((script.frames, config.height, config.width, 3), dtype=np.uint8)
    for t in range(script.frames):
        if t and script.settings[t] != script.settings[t - 1]:
            world.set_settings(script.settings[t])
        world.step(int(script.actions[t]))
        frames[t] = world.render()
    return Rollout(frames, script.settings, script.actions)


def stream_frames(
    model, script: StreamScript, steps: tuple[int, ...], seed: int = 0, progress: bool = False,
    stream_batch: bool = False, guidance: float | None = None, guided_steps: int | None = None,
) -> Iterator[np.ndarray]:
    """Stream `model` (a WorldModel) under the script: decoded uint8 frames [3, 128, 128, 3], chunk by chunk.

    `stream_batch`: the stream-batch sampler (stream/stream_batch.py), whose controls reach the chunk that enters
    next, S + 1 chunks after the one handed out; the script is known ahead, so each chunk's controls are given that
    far ahead and both samplers are scored on the same frames (the first S + 1 chunks take the first chunk's)."""
    if script.frames % CHUNK_FRAMES:
        raise ConfigError(f"a script of {script.frames} frames must be a whole number of {CHUNK_FRAMES}-frame chunks")
    lead = len(steps) if stream_batch else 0  # chunk c >= S + 1 enters during call c - S
    engine = model.engine(script.settings[0], steps=steps, seed=seed, stream_batch=stream_batch, guidance=guidance,
                          guided_steps=guided_steps)
    decoder = model.decoder()
    applied = script.settings[0]
    for call, start in enumerate(tqdm(range(0, script.frames, CHUNK_FRAMES), desc=f"{model.which} {len(steps)} steps",
                                      unit="chunk", disable=not progress)):
        target = start + lead * CHUNK_FRAMES if call else 0
        if target < script.frames:
            if script.settings[target] != applied:
                engine.set_prompt(model.encode(script.settings[target]))
                applied = script.settings[target]
            engine.set_action(torch.from_numpy(script.actions[target : target + CHUNK_FRAMES]))
        with torch.inference_mode():
            yield decoder.decode(engine.next_chunk().latents)[0].numpy()


def model_rollout(
    model, script: StreamScript, steps: tuple[int, ...], seed: int = 0, progress: bool = False, stream_batch: bool = False,
    guidance: float | None = None, guided_steps: int | None = None,
) -> Rollout:
    """The whole stream of `model` under the script, for the evaluation (`guidance`, `guided_steps`: see
    `WorldModel.engine`)."""
    frames = np.concatenate(list(stream_frames(model, script, steps, seed, progress, stream_batch, guidance,
                                               guided_steps)))
    return Rollout(frames, script.settings, script.actions)


def guided_rollout(
    model, script: StreamScript, steps: int, scale: float, seed: int = 0, progress: bool = False,
) -> Rollout:
    """The stream of `model` at `steps` steps (`teacher_step_list`) under classifier-free guidance
    (`student.GuidedTeacher`), which the engine does not run: the same chunks, rolling window (the training window,
    proven equal to the engine's cache in tests/stream/worldmodel/test_student.py), sampler (`student.teacher_sample`:
    clean estimate, fresh noise at the next sigma), recache at a switch and decoder as `stream_frames`; its own noise."""
    from framecast.stream.worldmodel.recipe import LATENT_SIZE
    from framecast.stream.worldmodel.student import GuidedTeacher, teacher_sample

    if script.frames % CHUNK_FRAMES:
        raise ConfigError(f"a script of {script.frames} frames must be a whole number of {CHUNK_FRAMES}-frame chunks")
    guided, decoder = GuidedTeacher(model.dit, scale), model.decoder()
    generator = torch.Generator().manual_seed(seed)
    shape = (1, CHUNK_FRAMES, model.autoencoder.config.latent_channels, LATENT_SIZE, LATENT_SIZE)
    chunks = []
    for start in tqdm(range(0, script.frames, CHUNK_FRAMES), desc=f"{model.which} {steps} steps x{scale:g}",
                      unit="chunk", disable=not progress):
        if not start or script.settings[start] != script.settings[start - 1]:
            guided.set_prompt(model.encode(script.settings[start]).to(model.dit.dtype), recache=start > 0)
        actions = torch.from_numpy(script.actions[start : start + CHUNK_FRAMES])[None]
        with torch.inference_mode():
            x0 = teacher_sample(guided, torch.randn(shape, generator=generator), 1.0, guided.text, guided.memory,
                                actions, steps, generator)
            guided.commit(x0.to(model.dit.dtype), actions)
            chunks.append(decoder.decode(x0)[0].numpy())
    return Rollout(np.concatenate(chunks), script.settings, script.actions)


ACTION_WORDS = {action.name.lower(): action for action in Action}


def parse_actions(spec: str, frames: int, seed: int = 0) -> np.ndarray:
    """The key held into each of `frames` frames, from the command line's `--actions`:

    - `random`: keys held for a few frames each, as a person plays (the training data's policy), seeded;
    - `right:12,up:6,none:3,left`: each key for that many frames (1 without a count); the list repeats to the end.

    Raises ConfigError naming the bad part and the keys.
    """
    if spec.strip().lower() == "random":
        return HeldKeys().actions(np.random.default_rng([seed, 13]), frames)
    keys: list[int] = []
    for part in spec.split(","):
        name, _, count = part.strip().lower().partition(":")
        if name not in ACTION_WORDS or (count and (not count.isdigit() or int(count) < 1)):
            raise ConfigError(
                f"--actions part {part.strip()!r} must be KEY or KEY:FRAMES with FRAMES >= 1; keys: "
                f"{', '.join(ACTION_WORDS)} (or the whole spec 'random')"
            )
        keys += [int(ACTION_WORDS[name])] * (int(count) if count else 1)
    return np.resize(np.array(keys, dtype=np.int64), frames)


def parse_switch(text: str) -> tuple[int, str]:
    """`FRAME:PROMPT` -> (frame, prompt), e.g. `48:at night in rain`."""
    frame, sep, prompt = text.partition(":")
    if not sep or not frame.strip().isdigit() or not prompt.strip():
        raise ConfigError(f"--switch {text!r} must be FRAME:PROMPT, e.g. '48:at night in rain'")
    return int(frame), prompt.strip()


def command_line_script(
    prompt: str, switches: list[tuple[int, str]], actions: str, frames: int, seed: int = 0,
) -> StreamScript:
    """The script of `framecast generate`: a first prompt, prompt switches at frames (moved to the chunk boundary
    at or before them, where a switch takes effect), keys per `parse_actions`. A switch names only the slots it
    changes ("at night"); the rest stay."""
    current = parse_prompt(prompt)
    at: dict[int, str] = {}
    for frame, text in switches:
        if not 0 <= frame < frames:
            raise ConfigError(f"--switch at frame {frame} is outside the video's {frames} frames (0..{frames - 1})")
        at[frame - frame % CHUNK_FRAMES] = text
    frames = -(-frames // CHUNK_FRAMES) * CHUNK_FRAMES  # whole chunks; the video keeps the frames asked for
    settings = []
    for t in range(frames):
        if t in at:
            current = parse_prompt(at[t], current)
        settings.append(current)
    return StreamScript(tuple(settings), parse_actions(actions, frames, seed))
