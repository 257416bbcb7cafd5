"""What the embedded world model is: its DiT size, how it streams, and where its files live.

Sized for the speed target (>= 30 frames/s at 128x128 on a 2-core CPU, decoder included): 6 layers of width 192
over 8x8 tokens per frame stream a 3-frame chunk in 4 steps in ~66 ms (45 frames/s before decoding, bf16), and
4M parameters fit teacher and student in bfloat16 beside the autoencoder under the 20 MB budget.
"""

from __future__ import annotations

from pathlib import Path

from framecast.models.config import preset
from framecast.models.world.vocabulary import Action
from framecast.stream.engine import CacheKind, EngineConfig, SwitchPolicy

WEIGHTS_DIR = Path(__file__).resolve().parents[2] / "models" / "world" / "weights"
AUTOENCODER_FILE = "world_autoencoder.safetensors"
TEXT_ENCODER_FILE = "world_text_encoder.safetensors"
TEACHER_FILE = "world_teacher.safetensors"
STUDENT_FILE = "world_student.safetensors"

WORLD_DIT = preset("world")
assert WORLD_DIT.num_actions == len(Action)
LATENT_SIZE = 16  # 128 px / 8
CHUNK_FRAMES = 3
# the chunk in flight and the one before it; no sinks: RoPE offsets between attended frames stay < 6, as in training,
# however long the stream runs (the world's state is in its last frames: positions, velocities, particle phases)
WINDOW_FRAMES = 6
SHIFT = 3.0  # a 16x16x16 latent needs less shift toward high noise than Wan's 60x104 (shift 5)
STUDENT_STEPS = {1: (1000,), 2: (1000, 500), 4: (1000, 750, 500, 250)}  # the schedules the student trains on
TEACHER_STEPS = 32
# classifier-free guidance of the teacher in the student's distillation target (and the eval's guided teacher row):
# the teacher trains with the null prompt on `TeacherSettings.prompt_dropout` of its samples
GUIDANCE = 1.5
# classifier-free guidance the distilled student streams best under (the guide of the guidance distillation,
# guidance_distill.py): on two 1,800-frame scripts it took the run-9 student's adherence from 87.8 / 88.8% to
# 94.1 / 95.7% and the new prompt's arrival from 10-15 frames at most to 3, for ~1.5x the DiT's time (prompt and null
# rows in one batch); 2 was worse than 1.5 (91.7%, one scene never drawn), as it was for the teacher
GUIDED_STUDENT_GUIDANCE = 1.5
# the guidance every command streams the shipped student with (EngineConfig.guidance): none, since the shipped student
# is guidance-distilled (run 11): it streams unguided what the run-9 student streamed guided at 1.5, in one pass
STREAM_GUIDANCE = 1.0
# the steps every command streams with: 3 of the student's 4 steps keep its quality (run 10, guided: adherence
# 94.6 / 95.7 / 90.1 / 90.8% on the four 1,800-frame scripts against 94.5 / 93.1 / 90.8 / 89.1% at 4). Each step
# sees inputs it was trained on: 500 after 1000 as in the 2-step schedule, 250 after 500 as in the 4-step one
STREAM_STEPS = (1000, 500, 250)


def teacher_step_list(steps: int = TEACHER_STEPS) -> tuple[int, ...]:
    """An evenly spaced raw step list of `steps` steps from 1000 down (warped onto the shifted schedule)."""
    return tuple(round(1000 - i * 1000 / steps) for i in range(steps))


def world_engine_config(steps: tuple[int, ...] = STREAM_STEPS, seed: int = 0, **changes: object) -> EngineConfig:
    """How the world model streams: chunks of 3 latent (= video) frames, a 12-frame rolling window, no sinks."""
    settings = dict(
        latent_height=LATENT_SIZE, latent_width=LATENT_SIZE, chunk_frames=CHUNK_FRAMES, denoising_steps=steps,
        shift=SHIFT, cache=CacheKind.ROLLING, window_frames=WINDOW_FRAMES, sink_frames=0,
        switch_policy=SwitchPolicy.RECACHE, seed=seed,
    )
    settings.update(changes)
    return EngineConfig(**settings)
