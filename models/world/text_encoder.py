"""The world model's text encoder: prompt text -> embeddings shaped like a big model's text-encoder output.

A prompt is parsed into its five slots (`parse_prompt`, so any phrasing and word order of the same scene gives the
same embedding), the slots become one token each in a fixed order, and a small transformer layer mixes them. The
output is [B, tokens, width] with tokens <= the DiT's `text_len`, exactly the interface umT5 has for Wan (the DiT
zero-pads the rest), so the embedded model runs through the same engine, session and pipeline code as Wan does.

It is trained jointly with the teacher DiT (models/world/train_dit.py) and shipped beside it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from framecast.models.errors import CheckpointError, ConfigError
from framecast.models.loading import check_fits
from framecast.models.world.prompt import SLOTS, SceneSettings, parse_prompt

# token id of each vocabulary word; slot i's token sits at position i of the sequence
WORD_IDS: dict[tuple[str, str], int] = {
    (slot, member.value): index
    for index, (slot, member) in enumerate((slot, member) for slot, kind in SLOTS.items() for member in kind)
}
SLOT_NAMES = tuple(SLOTS)
WORDS: dict[int, tuple[str, str]] = {index: word for word, index in WORD_IDS.items()}  # (slot, word) of each id


@dataclass(frozen=True)
class TextEncoderConfig:
    width: int = 64  # = the DiT's text_dim
    layers: int = 1
    heads: int = 2

    def __post_init__(self) -> None:
        for name in ("width", "layers", "heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name}={value!r} must be a positive integer")
        if self.width % self.heads:
            raise ConfigError(f"width={self.width} must be divisible by heads={self.heads}")


def settings_tokens(settings: SceneSettings) -> list[int]:
    """The five token ids of a scene, in slot order."""
    return [WORD_IDS[(slot, getattr(settings, slot).value)] for slot in SLOT_NAMES]


def tokens_settings(token_ids: Sequence[int]) -> SceneSettings:
    """The scene of five token ids in slot order (the inverse of `settings_tokens`)."""
    if len(token_ids) != len(SLOT_NAMES):
        raise ConfigError(f"{len(token_ids)} token ids; a scene has {len(SLOT_NAMES)} (one per slot: {SLOT_NAMES})")
    values = {}
    for slot, index in zip(SLOT_NAMES, (int(i) for i in token_ids)):
        if WORDS.get(index, (None,))[0] != slot:
            raise ConfigError(f"token id {index} is not a word of the {slot} slot")
        values[slot] = SLOTS[slot](WORDS[index][1])
    return SceneSettings(**values)


def as_settings(prompt: str | SceneSettings, defaults: SceneSettings = SceneSettings()) -> SceneSettings:
    """Settings from a prompt or settings; text is parsed (ConfigError lists the vocabulary on unknown words)."""
    if isinstance(prompt, SceneSettings):
        return prompt
    if isinstance(prompt, str):
        return parse_prompt(prompt, defaults)
    raise ConfigError(f"prompt {prompt!r} must be text or SceneSettings")


class WorldTextEncoder(nn.Module):
    """Token embeddings plus slot embeddings, a few pre-norm transformer layers, a final norm."""

    def __init__(self, config: TextEncoderConfig = TextEncoderConfig()) -> None:
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(len(WORD_IDS), config.width)
        self.slot_embedding = nn.Parameter(torch.zeros(len(SLOT_NAMES), config.width))
        layer = nn.TransformerEncoderLayer(
            config.width, config.heads, dim_feedforward=2 * config.width, dropout=0.0, batch_first=True, norm_first=True
        )
        self.layers = nn.TransformerEncoder(layer, config.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(config.width)
        nn.init.normal_(self.token_embedding.weight, std=1.0)
        nn.init.normal_(self.slot_embedding, std=0.1)

    @property
    def tokens(self) -> int:
        return len(SLOT_NAMES)

    def tokenize(self, prompts: Sequence[str | SceneSettings], defaults: SceneSettings = SceneSettings()) -> Tensor:
        """Prompts (text or settings) -> token ids [B, 5]."""
        if isinstance(prompts, (str, SceneSettings)):
            raise ConfigError("tokenize takes a sequence of prompts; wrap a single prompt in a list")
        return torch.tensor([settings_tokens(as_settings(p, defaults)) for p in prompts], dtype=torch.long)

    def forward(self, token_ids: Tensor) -> Tensor:
        """token ids [B, 5] -> embeddings [B, 5, width]."""
        if token_ids.ndim != 2 or token_ids.shape[1] != len(SLOT_NAMES):
            raise ConfigError(f"token ids of shape {tuple(token_ids.shape)}; expected [batch, {len(SLOT_NAMES)}]")
        x = self.token_embedding(token_ids.to(self.slot_embedding.device)) + self.slot_embedding
        return self.norm(self.layers(x))

    @torch.no_grad()
    def encode(self, prompts: Sequence[str | SceneSettings], defaults: SceneSettings = SceneSettings()) -> Tensor:
        """Prompts -> embeddings [B, 5, width] (no gradients): what the engine's `set_prompt` takes."""
        return self(self.tokenize(prompts, defaults))


def save_text_encoder(model: WorldTextEncoder, path: str | os.PathLike) -> None:
    from safetensors.torch import save_file

    state = {key: value.detach().float().contiguous().cpu() for key, value in model.state_dict().items()}
    save_file(state, str(path), metadata={"config": json.dumps(asdict(model.config))})


def load_text_encoder(path: str | os.PathLike) -> WorldTextEncoder:
    """A `save_text_encoder` file; raises CheckpointError naming missing, unexpected or mis-shaped keys."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if "config" not in metadata:
        raise CheckpointError(f"{path}: no 'config' in the safetensors metadata; not a world text encoder file")
    model = WorldTextEncoder(TextEncoderConfig(**json.loads(metadata["config"])))
    state = load_file(str(path))
    check_fits(model, state, str(path), "world text encoder")  # CheckpointError listing every bad key
    model.load_state_dict(state)
    return model.eval()
