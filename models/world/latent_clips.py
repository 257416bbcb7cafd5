"""Training data of the world DiT: episodes of the world encoded once by the world autoencoder.

A clip is `frames` latent frames with the action held into each frame and the prompt (as five token ids) shown in
each frame. Half of the clips switch the prompt once, at a chunk boundary: the DiT sees one prompt per clip (its
text context has no time axis), the clip's last one, so frames shown under an earlier prompt are clean context
without loss, and the model learns what the engine's recache on a prompt switch asks of it: new look from the new
prompt, positions and motion from the context.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from framecast.models.errors import ConfigError
from framecast.models.world.autoencoder import WorldAutoencoder, frames_to_tensor
from framecast.models.world.episodes import make_episode
from framecast.models.world.text_encoder import settings_tokens

SWITCH_SHARE = 0.5  # share of clips with a prompt switch


@dataclass
class LatentClips:
    latents: Tensor  # bfloat16 [N, T, C, h, w], normalised (what the DiT sees)
    actions: Tensor  # int64 [N, T]
    tokens: Tensor  # int64 [N, T, 5]: the prompt shown in each frame
    seeds: Tensor  # int64 [N]: the episode seed of each clip
    agent_xy: Tensor | None = None  # float32 [N, T, 2]: the agent's (x, y) px in each frame (loss weighting)

    def __len__(self) -> int:
        return self.latents.shape[0]

    @property
    def frames(self) -> int:
        return self.latents.shape[1]

    def save(self, path: str | Path) -> None:
        torch.save({"latents": self.latents, "actions": self.actions, "tokens": self.tokens, "seeds": self.seeds,
                    "agent_xy": self.agent_xy}, path)

    @classmethod
    def load(cls, path: str | Path) -> LatentClips:
        data = torch.load(path, weights_only=True)
        return cls(data["latents"], data["actions"], data["tokens"], data["seeds"], data.get("agent_xy"))


def switch_frame(seed: int, frames: int, chunk_frames: int) -> int | None:
    """Where clip `seed` switches its prompt (a chunk boundary in the clip's second half), or None."""
    rng = np.random.default_rng([seed, 7])
    if rng.random() >= SWITCH_SHARE:
        return None
    chunks = frames // chunk_frames
    return int(rng.integers((chunks + 1) // 2, chunks)) * chunk_frames


@torch.no_grad()
def make_latent_clips(
    autoencoder: WorldAutoencoder, count: int, frames: int, chunk_frames: int, seed_base: int = 0,
    batch: int = 16, progress: bool = True,
) -> LatentClips:
    """`count` clips from episodes with seeds seed_base..seed_base+count-1 (deterministic)."""
    if frames % chunk_frames or frames < 2 * chunk_frames:
        raise ConfigError(f"frames={frames} must be a multiple of chunk_frames={chunk_frames}, at least two chunks")
    latents, actions, tokens, agent_xy = [], [], [], []
    seeds = list(range(seed_base, seed_base + count))
    for start in tqdm(range(0, count, batch), desc="encoding clips", unit="batch", disable=not progress):
        episodes = []
        for seed in seeds[start : start + batch]:
            switch = switch_frame(seed, frames, chunk_frames)
            # a switch at s with switch_every=s happens once in a clip shorter than 2s (s is in the second half)
            episodes.append(make_episode(seed, frames, switch_every=switch))
        video = frames_to_tensor(np.stack([e.frames for e in episodes])).to(next(autoencoder.parameters()).dtype)
        latents.append(autoencoder.encode(video).to(torch.bfloat16))
        actions.append(torch.from_numpy(np.stack([e.actions for e in episodes])))
        tokens.append(torch.tensor([[settings_tokens(s) for s in e.settings] for e in episodes], dtype=torch.long))
        agent_xy.append(torch.from_numpy(np.stack([e.agent_xy for e in episodes])).float())
    return LatentClips(torch.cat(latents), torch.cat(actions), torch.cat(tokens), torch.tensor(seeds),
                       torch.cat(agent_xy))


def agent_positions(seeds: Tensor, frames: int, chunk_frames: int) -> Tensor:
    """The agent's (x, y) px in every frame of the clips with these seeds, by replaying their episodes (rendering
    only, no encoding: ~0.1 ms a frame), float32 [N, T, 2]."""
    return torch.stack([
        torch.from_numpy(make_episode(int(seed), frames, switch_every=switch_frame(int(seed), frames, chunk_frames)).agent_xy)
        for seed in seeds
    ]).float()
