import numpy as np
import pytest
import torch

from framecast.models.errors import ConfigError
from framecast.models.world.autoencoder import WorldAutoencoder, frames_to_tensor, preset
from framecast.models.world.episodes import make_episode
from framecast.models.world.latent_clips import LatentClips, make_latent_clips, switch_frame
from framecast.models.world.text_encoder import settings_tokens


@pytest.fixture(scope="module")
def clips_and_autoencoder() -> tuple[LatentClips, WorldAutoencoder]:
    torch.manual_seed(0)
    autoencoder = WorldAutoencoder(preset("tiny")).eval()
    return make_latent_clips(autoencoder, count=4, frames=12, chunk_frames=3, progress=False), autoencoder


@pytest.mark.parametrize("frames, chunk_frames", [(12, 3), (24, 3), (24, 4), (6, 3)])
def test_a_switch_is_none_or_a_chunk_boundary_in_the_second_half(frames: int, chunk_frames: int) -> None:
    for seed in range(200):
        frame = switch_frame(seed, frames, chunk_frames)
        assert frame is None or (frame % chunk_frames == 0 and frames / 2 <= frame < frames), (seed, frame)
        assert switch_frame(seed, frames, chunk_frames) == frame


def test_about_half_the_clips_switch() -> None:
    switching = sum(switch_frame(seed, 24, 3) is not None for seed in range(200))
    assert 70 <= switching <= 130


def test_clips_have_the_dit_shapes(clips_and_autoencoder) -> None:
    clips, _ = clips_and_autoencoder
    assert len(clips) == 4 and clips.frames == 12
    assert clips.latents.shape == (4, 12, 16, 16, 16) and clips.latents.dtype == torch.bfloat16
    assert clips.actions.shape == (4, 12) and clips.actions.dtype == torch.int64
    assert clips.tokens.shape == (4, 12, 5) and clips.tokens.dtype == torch.int64
    assert clips.seeds.tolist() == [0, 1, 2, 3]
    assert 0 <= int(clips.actions.min()) and int(clips.actions.max()) <= 4


def test_a_clips_prompt_tokens_change_exactly_at_its_switch_frame(clips_and_autoencoder) -> None:
    clips, _ = clips_and_autoencoder
    switches = [switch_frame(seed, 12, 3) for seed in clips.seeds.tolist()]
    assert any(s is None for s in switches) and any(s is not None for s in switches)
    for tokens, switch in zip(clips.tokens, switches):
        changes = [t for t in range(1, 12) if not torch.equal(tokens[t], tokens[t - 1])]
        assert changes == ([] if switch is None else [switch])


def test_clips_are_the_encoded_episodes(clips_and_autoencoder) -> None:
    clips, autoencoder = clips_and_autoencoder
    episodes = [make_episode(seed, 12, switch_every=switch_frame(seed, 12, 3)) for seed in range(4)]
    with torch.no_grad():
        latents = autoencoder.encode(frames_to_tensor(np.stack([e.frames for e in episodes]))).to(torch.bfloat16)
    assert torch.equal(clips.latents, latents)
    assert clips.actions.tolist() == [e.actions.tolist() for e in episodes]
    assert clips.tokens.tolist() == [[settings_tokens(s) for s in e.settings] for e in episodes]


def test_clips_are_deterministic_across_batches(clips_and_autoencoder) -> None:
    clips, autoencoder = clips_and_autoencoder
    again = make_latent_clips(autoencoder, count=3, frames=12, chunk_frames=3, seed_base=1, batch=2, progress=False)
    assert again.seeds.tolist() == [1, 2, 3]
    assert torch.equal(again.actions, clips.actions[1:]) and torch.equal(again.tokens, clips.tokens[1:])
    torch.testing.assert_close(again.latents.float(), clips.latents[1:].float(), atol=1e-3, rtol=1e-2)


def test_save_and_load_give_the_same_clips(clips_and_autoencoder, tmp_path) -> None:
    clips, _ = clips_and_autoencoder
    clips.save(tmp_path / "clips.pt")
    loaded = LatentClips.load(tmp_path / "clips.pt")
    for name in ("latents", "actions", "tokens", "seeds"):
        assert torch.equal(getattr(loaded, name), getattr(clips, name)), name
    assert loaded.latents.dtype == torch.bfloat16


@pytest.mark.parametrize("frames", [10, 13, 3, 0])
def test_frames_must_be_whole_chunks_and_at_least_two(frames: int) -> None:
    with pytest.raises(ConfigError, match=f"frames={frames} must be a multiple of chunk_frames=3, at least two chunks"):
        make_latent_clips(WorldAutoencoder(preset("tiny")), count=2, frames=frames, chunk_frames=3, progress=False)
