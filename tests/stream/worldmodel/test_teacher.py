import math

import pytest
import torch

from framecast.models.config import DiTConfig
from framecast.models.dit import CausalWanDiT
from framecast.models.errors import ConfigError
from framecast.models.world.text_encoder import TextEncoderConfig, WorldTextEncoder
from framecast.stream.sampler import FlowMatchSchedule
from framecast.stream.worldmodel.recipe import SHIFT
from framecast.stream.worldmodel.teacher import FlowMatchingLoss, TeacherSettings, learning_rate, shifted_sigmas

TINY = DiTConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=2, text_dim=64, text_len=8, num_actions=5)


def test_shifted_sigmas_are_the_samplers_schedule():
    schedule = FlowMatchSchedule(SHIFT)
    s = torch.linspace(1.0, 0.0, 1001)[:-1]
    torch.testing.assert_close(shifted_sigmas(s), schedule.sigmas, rtol=0, atol=1e-6)


def test_noise_levels_are_constant_per_chunk_and_leave_some_chunks_clean():
    loss = FlowMatchingLoss(24, 16, clean_chunk_share=0.25, device=torch.device("cpu"))
    sigma = loss.noise_levels(400, torch.Generator().manual_seed(0))
    assert sigma.shape == (400, 24)
    chunks = sigma.view(400, 8, 3)
    assert (chunks == chunks[..., :1]).all()
    clean = (chunks[..., 0] == 0).float().mean().item()
    assert 0.2 < clean < 0.3 and sigma.max() <= 1


def test_learning_rate_warms_up_then_decays_to_its_final_share():
    settings = TeacherSettings(warmup_steps=10, learning_rate=1e-3, final_lr_share=0.05)
    assert learning_rate(settings, 0, 100) == pytest.approx(1e-4)
    assert learning_rate(settings, 10, 100) == pytest.approx(1e-3)
    assert learning_rate(settings, 100, 100) == pytest.approx(5e-5)
    assert learning_rate(settings, 55, 100) < learning_rate(settings, 30, 100)


def test_a_few_training_steps_on_a_tiny_config_lower_the_flow_matching_loss():
    torch.manual_seed(0)
    dit = CausalWanDiT(TINY)
    text_encoder = WorldTextEncoder(TextEncoderConfig(width=64))
    loss_fn = FlowMatchingLoss(12, 16, clean_chunk_share=0.2, device=torch.device("cpu"))
    latents = torch.randn(2, 12, 16, 8, 8) * 0.5 + torch.linspace(-1, 1, 16)[None, None, :, None, None]
    actions = torch.randint(0, 5, (2, 12))
    tokens = torch.randint(0, 4, (2, 12, 5))
    tokens[:, :] = tokens[:, -1:]  # one prompt per clip
    parameters = [*dit.parameters(), *text_encoder.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=3e-3)
    losses = []
    for _ in range(40):
        loss = loss_fn(dit, text_encoder, latents, actions, tokens, torch.Generator().manual_seed(1))  # same noise
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.5 * losses[0]


def test_frames_under_an_earlier_prompt_are_clean_context_without_loss():
    torch.manual_seed(0)
    dit = CausalWanDiT(TINY).double()
    text_encoder = WorldTextEncoder(TextEncoderConfig(width=64)).double()
    loss_fn = FlowMatchingLoss(12, 16, clean_chunk_share=0.0, device=torch.device("cpu"))
    latents = torch.randn(1, 12, 16, 8, 8, dtype=torch.float64)
    actions = torch.zeros(1, 12, dtype=torch.long)
    tokens = torch.zeros(1, 12, 5, dtype=torch.long)
    tokens[:, 9:, 0] = 1  # the prompt switches at frame 9: frames 0..8 are context only
    loss = loss_fn(dit, text_encoder, latents, actions, tokens, torch.Generator().manual_seed(3))
    # the same draws by hand: frames 0..8 clean, the loss over frames 9..11 only
    generator = torch.Generator().manual_seed(3)
    sigma = loss_fn.noise_levels(1, generator).double()
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).double()
    sigma[:, :9] = 0
    s = sigma[:, :, None, None, None]
    text = dit.encode_text(text_encoder(tokens[:, -1]))
    flow = dit((1 - s) * latents + s * noise, sigma * 1000, text, loss_fn.memory, actions)
    per_frame = ((flow - (noise - latents)) ** 2).mean(dim=(2, 3, 4))
    torch.testing.assert_close(loss.double(), per_frame[:, 9:].mean(), rtol=1e-4, atol=1e-6)  # it computes in float32


def test_teacher_settings_refuse_bad_values():
    with pytest.raises(ConfigError, match="clip_frames"):
        TeacherSettings(clip_frames=25)
    with pytest.raises(ConfigError, match="batch"):
        TeacherSettings(batch=0)


def test_agent_weights_mark_the_latent_pixels_under_the_agent():
    from framecast.stream.worldmodel.teacher import agent_weights

    weights = agent_weights(torch.tensor([[[20.0, 30.0], [100.0, 5.0]]]), 16, 10.0)
    assert weights.shape == (1, 2, 16, 16)
    rows, cols = torch.nonzero(weights[0, 0] > 1, as_tuple=True)
    assert set(rows.tolist()) == {2, 3, 4} and set(cols.tolist()) == {1, 2, 3}  # centres 11.5..27.5 px reach 20, 30
    assert weights[0, 0].max() == 11 and weights[0, 0].min() == 1
    assert (weights[0, 1] > 1).sum() == 6  # at the top edge: 2 rows x 3 columns
    far = agent_weights(torch.full((1, 1, 2), -1e6), 16, 10.0)  # no agent: weight 1 everywhere
    assert (far == 1).all()


def test_prompt_dropout_trains_those_samples_on_the_null_prompt():
    from framecast.stream.worldmodel.teacher import null_text

    torch.manual_seed(0)
    dit = CausalWanDiT(TINY).double()
    text_encoder = WorldTextEncoder(TextEncoderConfig(width=64)).double()
    latents = torch.randn(2, 6, 16, 8, 8, dtype=torch.float64)
    actions = torch.zeros(2, 6, dtype=torch.long)
    prompts = [torch.full((2, 6, 5), k, dtype=torch.long) for k in (0, 1)]

    def loss(dropout: float, tokens: torch.Tensor) -> float:
        loss_fn = FlowMatchingLoss(6, 16, clean_chunk_share=0.0, device=torch.device("cpu"), prompt_dropout=dropout)
        return loss_fn(dit, text_encoder, latents, actions, tokens, torch.Generator().manual_seed(4)).item()

    # every sample dropped (a share just under 1): the prompt cannot matter; none dropped: it does
    assert loss(0.999999, prompts[0]) == pytest.approx(loss(0.999999, prompts[1]), rel=1e-9)
    assert loss(0.0, prompts[0]) != pytest.approx(loss(0.0, prompts[1]), rel=1e-6)
    assert torch.equal(null_text(torch.ones(1, 5, 64)), torch.zeros(1, 5, 64))
    with pytest.raises(ConfigError, match="prompt_dropout"):
        TeacherSettings(prompt_dropout=1.0)


def test_the_checkpoint_clock_saves_when_due_and_at_the_end():
    from framecast.stream.worldmodel.teacher import CheckpointClock

    saves = []
    patient = CheckpointClock(lambda: saves.append("patient"), every_s=1e9)
    eager = CheckpointClock(lambda: saves.append("eager"), every_s=0.0)
    for _ in range(3):
        patient.tick(), eager.tick()
    assert saves == ["eager"] * 3
    patient.final()
    assert saves[-1] == "patient" and saves.count("patient") == 1
