"""The embedded default model, loaded: prompt text -> text encoder -> DiT (student or teacher) -> world decoder.

    model = WorldModel.load()                      # the shipped files in models/world/weights
    engine = model.engine(steps=(1000, 500))      # a StreamEngine (the same engine that runs Wan checkpoints), guided
    decoder = model.decoder()                      # streaming: latents [B, F, 16, 16, 16] -> uint8 [B, F, 128, 128, 3]

Prompts use the world's closed vocabulary (models/world/vocabulary.py); `PromptText` keeps the scene a stream is
in, so a live prompt may name only the slots it changes ("at night") as the world itself allows.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from framecast.models.dit import CausalWanDiT
from framecast.models.errors import CheckpointError, ConfigError
from framecast.models.loading import load_dit
from framecast.models.world.autoencoder import WorldAutoencoder, WorldDecoder, load_autoencoder
from framecast.models.world.prompt import SceneSettings, describe, parse_prompt
from framecast.models.world.text_encoder import WorldTextEncoder, load_text_encoder
from framecast.kernels.compute_dtype import default_dtype
from framecast.stream.engine import StreamEngine
from framecast.stream.worldmodel.recipe import (
    AUTOENCODER_FILE, STREAM_GUIDANCE, STREAM_STEPS, STUDENT_FILE, TEACHER_FILE, TEXT_ENCODER_FILE, WEIGHTS_DIR,
    world_engine_config,
)

DEFAULT_WORLD_PROMPT = "a red circle on grass by day in clear weather"
DIT_FILES = {"student": STUDENT_FILE, "teacher": TEACHER_FILE}


def shipped_weights_present(folder: Path = WEIGHTS_DIR) -> bool:
    return all((folder / name).exists() for name in (AUTOENCODER_FILE, TEXT_ENCODER_FILE, STUDENT_FILE))


class PromptText:
    """Prompt text -> embedding [1, 5, 64], remembering the scene so that a prompt may change only some slots.

    Thread-safe: a live session encodes prompts on its control thread. Raises ConfigError (listing the vocabulary
    and close matches) on a word the world does not know, before anything reaches the stream.
    """

    def __init__(self, text_encoder: WorldTextEncoder, first: str = DEFAULT_WORLD_PROMPT) -> None:
        self.text_encoder = text_encoder
        self.settings = parse_prompt(first)
        self._lock = threading.Lock()

    def __call__(self, text: str) -> Tensor:
        with self._lock:
            self.settings = parse_prompt(text, self.settings)
            return self.text_encoder.encode([self.settings])

    def describe(self) -> str:
        return describe(self.settings)


@dataclass
class WorldModel:
    dit: CausalWanDiT
    text_encoder: WorldTextEncoder
    autoencoder: WorldAutoencoder
    which: str = "student"

    @classmethod
    def load(
        cls, folder: Path = WEIGHTS_DIR, which: str = "student", dtype: torch.dtype | None = None,
        device: torch.device | str = "cpu", dit_file: Path | None = None,
    ) -> WorldModel:
        """The shipped model (or a training run's folder); `which`: student (the default) or teacher. `dtype`: the
        DiT's compute dtype (default: `default_dtype(device)`; the files hold bfloat16)."""
        if which not in DIT_FILES:
            raise ConfigError(f"which={which!r} must be one of {list(DIT_FILES)}")
        folder = Path(folder)
        paths = [dit_file or folder / DIT_FILES[which], folder / TEXT_ENCODER_FILE, folder / AUTOENCODER_FILE]
        missing = [str(p) for p in paths if not p.exists()]
        if missing:
            raise CheckpointError(
                f"world model files missing: {', '.join(missing)} (train them with `framecast train world`, "
                "or restore models/world/weights from git)"
            )
        dit = load_dit(paths[0], dtype=dtype or default_dtype(device), device=device).eval().requires_grad_(False)
        return cls(dit, load_text_encoder(paths[1]), load_autoencoder(paths[2]), which)

    def prompt_text(self, first: str = DEFAULT_WORLD_PROMPT) -> PromptText:
        return PromptText(self.text_encoder, first)

    def encode(self, prompt: str | SceneSettings) -> Tensor:
        """One prompt (text, all slots from the default scene otherwise, or settings) -> [1, 5, 64]."""
        return self.text_encoder.encode([prompt])

    def engine(
        self, prompt: str | SceneSettings = DEFAULT_WORLD_PROMPT, steps: tuple[int, ...] = STREAM_STEPS,
        seed: int = 0, guidance: float | None = None, guided_steps: int | None = None, **changes: object,
    ) -> StreamEngine:
        """`guidance`: the classifier-free guidance scale; by default the student streams at `STREAM_GUIDANCE` with
        the chunk sampler, and unguided with the stream-batch or rolling samplers (which run no guidance) or as the
        teacher (whose guided rows the evaluation asks for by name). `guided_steps`: guided, only the first this many
        steps are (`EngineConfig.guided_steps`; default: all)."""
        if guidance is None:
            plain = self.which != "student" or changes.get("stream_batch") or changes.get("rolling_chunks", 1) > 1
            guidance = 1.0 if plain else STREAM_GUIDANCE
        config = world_engine_config(steps, seed, guidance=guidance, guided_steps=guided_steps, **changes)
        return StreamEngine(self.dit, config, self.encode(prompt))

    def decoder(self, dtype: torch.dtype | None = None) -> WorldDecoder:
        """A fresh streaming decoder (one per stream: it carries state between chunks), on the CPU, in `dtype`
        (default: `default_dtype("cpu")`)."""
        return WorldDecoder(self.autoencoder, dtype or default_dtype("cpu"))
