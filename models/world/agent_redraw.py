"""Redraw the agent a prompt asks for over a frame, where the frame draws an agent.

A generated frame can put the agent in the right place, moving the right way, and still draw its shape as a blend
(a diamond with a rounded base after a triangle, a square with round corners). The world knows what the agent
looks like exactly, so the agent can be drawn again: the frame's own agent (read by `read_agent`) is wiped to the
ground colour and the prompt's sprite is pasted at the same place, exactly as the renderer draws it (last, unlit).
The student distillation uses this as its target around the agent (`stream.worldmodel.student`): the teacher
decides where the agent goes, the world decides what it looks like.
"""

from __future__ import annotations

import numpy as np

from framecast.models.world.ground_truth import (
    AGENT_CORE_DISTANCE, AGENT_OFF_LINE_DISTANCE, colour_planes, distance_sq, median_rgb, on_colour_line, read_agent,
)
from framecast.models.world.palette import AGENT_RGB
from framecast.models.world.render import paste, pixel
from framecast.models.world.sprites import agent_centroid, agent_mask
from framecast.models.world.state import WorldConfig
from framecast.models.world.vocabulary import AgentColour, AgentShape

SPREAD_MARGIN_PX = 1  # the agent's sure colour may reach this far past its sprite (a blur)
# a frame's agent pixels to wipe: past this share of the way from the ground to the agent's colour (its blurred rim
# included, which the reader's 50% mask leaves out)
WIPE_ALONG_MIN = 0.2


def redraw_agent(
    frame: np.ndarray, shape: AgentShape, colour: AgentColour, config: WorldConfig = WorldConfig(),
    at: tuple[float, float] | None = None,
) -> tuple[np.ndarray, tuple[float, float]] | None:
    """The frame (uint8 [H, W, 3]) with its agent replaced by a `shape` `colour` sprite, and that sprite's centre
    (x, y) px; None where the frame shows no agent (`read_agent`) or its colour in more places than one sprite covers
    (two agents, as a model unsure where the agent is draws), as there is then no one place to draw it.

    The centre is `at` when given (where the world's physics puts the agent: `world.agent_path`), else the frame's
    agent's centre as read (`read_agent`: for the shape it shows; the world keeps the centre when a prompt changes
    the shape); either is kept inside the frame as the world's physics keeps it.

    Raises:
        ShapeError: a frame not of the config's size.
    """
    reading = read_agent(frame, config)
    if reading is None:
        return None
    radius = config.agent_radius_px
    channels = colour_planes(frame, config)
    rows, cols = np.nonzero(distance_sq(channels, AGENT_RGB[reading.colour]) < AGENT_CORE_DISTANCE**2)
    if max(np.ptp(rows), np.ptp(cols)) + 1 > 2 * radius + 1 + 2 * SPREAD_MARGIN_PX:
        return None  # the agent's colour where no one sprite reaches (two agents): no one place to draw it
    centre = reading.xy if at is None else at
    x = float(np.clip(centre[0], radius, config.width - 1 - radius))
    y = float(np.clip(centre[1], radius, config.height - 1 - radius))
    ground = median_rgb(channels)
    # wipe around the frame's own agent, whose centroid sits off its centre by up to r/3 (the triangle)
    reach = radius + 4
    read_dx, read_dy = agent_centroid(reading.shape, radius)
    cx, cy = pixel(reading.xy[0] + read_dx), pixel(reading.xy[1] + read_dy)
    top, left = max(cy - reach, 0), max(cx - reach, 0)
    window = (slice(top, cy + reach + 1), slice(left, cx + reach + 1))
    wipe = on_colour_line(channels[:, window[0], window[1]], ground, AGENT_RGB[reading.colour], WIPE_ALONG_MIN,
                    AGENT_OFF_LINE_DISTANCE)
    redrawn = np.array(frame, dtype=np.uint8, copy=True)
    redrawn[window][wipe] = np.clip(np.rint(ground), 0, 255).astype(np.uint8)
    paste(redrawn, agent_mask(shape, radius), AGENT_RGB[colour], (x, y))
    return redrawn, (x, y)
