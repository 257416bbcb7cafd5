"""Pixel masks of everything the world draws, built once per size and cached.

A sprite is a boolean mask of (2r+1) x (2r+1) pixels whose centre pixel is the thing's position. Particles are
pixel offsets from their head. The readers in `ground_truth.py` use the same masks, so what they measure is what
was drawn.
"""

from __future__ import annotations

import functools

import numpy as np

from framecast.models.world.state import ObjectKind
from framecast.models.world.vocabulary import AgentShape

RAIN_STREAK_ROWS = 12  # a streak is 2 px wide and slants one column left every two rows, like wind-blown rain
RAIN_STEP_PX = (4, -2)  # (down, right) per frame: along the streak's own slant


def _grid(radius: int) -> tuple[np.ndarray, np.ndarray]:
    span = np.arange(-radius, radius + 1)
    return span[:, None], span[None, :]  # dy (rows), dx (columns)


@functools.lru_cache(maxsize=None)
def agent_mask(shape: AgentShape, radius: int) -> np.ndarray:
    """bool [2r+1, 2r+1]: four shapes of similar size (181-253 px at r = 9), told apart by their moments."""
    dy, dx = _grid(radius)
    if shape is AgentShape.CIRCLE:
        mask = dx**2 + dy**2 <= radius**2
    elif shape is AgentShape.SQUARE:
        half = round(0.8 * radius)
        mask = (np.abs(dx) <= half) & (np.abs(dy) <= half)
    elif shape is AgentShape.DIAMOND:
        mask = np.abs(dx) + np.abs(dy) <= radius
    else:  # TRIANGLE: apex up, base on the bottom row
        mask = 2 * np.abs(dx) <= dy + radius
    mask.setflags(write=False)
    return mask


@functools.lru_cache(maxsize=None)
def object_mask(kind: ObjectKind, radius: int) -> np.ndarray:
    """bool [2r+1, 2r+1]: a disc for a ball, a ring for an orbiter."""
    dy, dx = _grid(radius)
    distance_sq = dx**2 + dy**2
    mask = distance_sq <= radius**2 + radius
    if kind is ObjectKind.ORBITER:
        mask &= distance_sq > (radius - 2.5) ** 2
    mask.setflags(write=False)
    return mask


@functools.lru_cache(maxsize=None)
def agent_centroid(shape: AgentShape, radius: int) -> tuple[float, float]:
    """(x, y) of an agent sprite's centroid relative to its centre pixel; nonzero only for the triangle."""
    rows, cols = np.nonzero(agent_mask(shape, radius))
    return float(cols.mean() - radius), float(rows.mean() - radius)


@functools.lru_cache(maxsize=None)
def rain_streak_offsets() -> tuple[np.ndarray, np.ndarray]:
    """(dy, dx) int arrays of one streak's pixels relative to its head."""
    rows = np.arange(RAIN_STREAK_ROWS)
    dy = np.repeat(rows, 2)
    dx = np.stack([-(rows // 2), -(rows // 2) + 1], axis=1).reshape(-1)
    return dy, dx


@functools.lru_cache(maxsize=None)
def snowflake_offsets() -> tuple[np.ndarray, np.ndarray]:
    """(dy, dx) of a flake: a 4x4 square without its corners (12 px), big enough to survive a blur."""
    dy, dx = np.mgrid[0:4, 0:4]
    keep = ~(((dy == 0) | (dy == 3)) & ((dx == 0) | (dx == 3)))
    return dy[keep], dx[keep]
