"""Redraw the rain a prompt asks for over frames that draw too little of it.

Rain in the world is one fixed pattern of streaks (`Renderer`'s particle seed) falling along its slant by a fixed
step per frame, so it repeats every `rain_period_frames` frames and the frame index alone says where every streak
is. A generated stream draws rain at some phase of that pattern but may thin it (a regression onto uncertain
streaks fades them), and a thinned rain reads as clear weather. The world can draw it again: find the phase whose
streaks best cover the particles the frames do draw (consecutive frames at consecutive phases), wipe the drawn
particles to the ground colour and paint the pattern at that phase in the prompt's lit rain colour, as the renderer
does (over the ground and objects, under the agent). The student distillation uses this in its target
(`stream.worldmodel.student`, target "scene-redraw"): the teacher decides where the rain is, the world how much.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from framecast.models.errors import ShapeError
from framecast.models.world.ground_truth import (
    AGENT_OFF_LINE_DISTANCE, PARTICLE_ALONG_MIN, PARTICLE_OFF_LINE_DISTANCE, colour_planes, median_rgb, on_colour_line,
)
from framecast.models.world.palette import AGENT_RGB, RAIN_RGB, SNOWFLAKE_RGB, sprite_rgb
from framecast.models.world.prompt import SceneSettings
from framecast.models.world.render import Renderer
from framecast.models.world.sprites import RAIN_STEP_PX
from framecast.models.world.state import WorldConfig
from framecast.models.world.vocabulary import Weather

# particle pixels to wipe: past this share of the way from the ground to a particle colour (blurred rims included,
# which the reader's 35% leaves out)
WIPE_ALONG_MIN = 0.2
AGENT_KEEP_ALONG_MIN = 0.2  # pixels this far toward the agent's colour are the agent's: rain goes under it


def rain_period_frames(config: WorldConfig = WorldConfig()) -> int:
    """Frames after which the rain pattern repeats (its step wraps around the frame both ways)."""
    down, right = RAIN_STEP_PX
    rows = config.height // math.gcd(config.height, abs(down))
    cols = config.width // math.gcd(config.width, abs(right))
    return math.lcm(rows, cols)


@functools.lru_cache(maxsize=4)
def rain_layers(config: WorldConfig = WorldConfig()) -> np.ndarray:
    """bool [P, H, W]: the rain's pixels at each phase of its period."""
    renderer = Renderer(config)
    return np.stack([renderer.rain_mask(phase) for phase in range(rain_period_frames(config))])


def rain_phase(particles: np.ndarray, config: WorldConfig = WorldConfig()) -> int:
    """The phase p (0 <= p < period) of the first frame such that frame f's particle mask (bool [F, H, W]) is best
    covered by the rain at phase p + f."""
    layers = rain_layers(config)
    period = len(layers)
    flat = layers.reshape(period, -1).astype(np.float32)
    score = np.zeros(period, dtype=np.float32)
    for f, mask in enumerate(particles):
        score += np.roll(flat @ mask.reshape(-1).astype(np.float32), -f)  # score[p] += overlap with phase p + f
    return int(score.argmax())


def read_rain_phase(frames: np.ndarray, settings: SceneSettings, config: WorldConfig = WorldConfig()) -> int:
    """The phase of the first of these consecutive frames (uint8 [F, H, W, 3]) whose rain pattern best covers the
    particles they draw in `settings`' lit rain colour."""
    rain = sprite_rgb(RAIN_RGB, settings.time, Weather.RAIN)
    particles = []
    for frame in frames:
        planes = colour_planes(frame, config)
        particles.append(on_colour_line(planes, median_rgb(planes), rain, PARTICLE_ALONG_MIN, PARTICLE_OFF_LINE_DISTANCE))
    return rain_phase(np.stack(particles), config)


def redraw_rain(
    frames: np.ndarray, settings: SceneSettings, config: WorldConfig = WorldConfig(), phase: int | None = None,
) -> tuple[np.ndarray, int]:
    """Consecutive frames (uint8 [F, H, W, 3]) of a rain scene with their rain drawn again in full at the phase
    their own particles sit at (or at `phase`, the first frame's, when given: a stream whose rain phase is already
    known); returns the new frames and the first frame's phase.

    Raises:
        ShapeError: frames not [F, H, W, 3] of the config's size.
    """
    frames = np.asarray(frames)
    if frames.ndim != 4:
        raise ShapeError(f"frames of shape {frames.shape}; expected [F, {config.height}, {config.width}, 3]")
    rain = sprite_rgb(RAIN_RGB, settings.time, Weather.RAIN)
    flake = sprite_rgb(SNOWFLAKE_RGB, settings.time, Weather.SNOWFALL)
    channels = [colour_planes(frame, config) for frame in frames]
    grounds = [median_rgb(c) for c in channels]
    layers = rain_layers(config)
    phase = (read_rain_phase(frames, settings, config) if phase is None else phase) % len(layers)
    agent = AGENT_RGB[settings.agent_colour]
    redrawn = np.array(frames, dtype=np.uint8, copy=True)
    for f, (c, ground) in enumerate(zip(channels, grounds)):
        wipe = np.zeros(c.shape[1:], dtype=bool)
        for colour in (rain, flake):  # a wrong weather's flakes go too
            wipe |= on_colour_line(c, ground, colour, WIPE_ALONG_MIN, PARTICLE_OFF_LINE_DISTANCE)
        under_agent = on_colour_line(c, ground, agent, AGENT_KEEP_ALONG_MIN, AGENT_OFF_LINE_DISTANCE)
        redrawn[f][wipe & ~under_agent] = np.clip(np.rint(ground), 0, 255).astype(np.uint8)
        redrawn[f][layers[(phase + f) % len(layers)] & ~under_agent] = rain
    return redrawn, phase
