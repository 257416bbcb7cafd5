import pytest
import torch

from framecast.models.config import preset
from framecast.models.dit import CausalWanDiT
from framecast.models.errors import ShapeError
from framecast.models.memory import BlockCausal

CONFIG = preset("tiny")


@pytest.fixture(scope="module")
def dit() -> CausalWanDiT:
    torch.manual_seed(0)
    return CausalWanDiT(CONFIG).double()


def forward(dit: CausalWanDiT, latents: torch.Tensor, timesteps: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
    frames, height, width = latents.shape[1], latents.shape[3], latents.shape[4]
    memory = BlockCausal(CONFIG, num_frames=frames, chunk_frames=1, tokens_per_frame=CONFIG.tokens_per_frame(height, width))
    return dit(latents, timesteps, dit.encode_text(prompt), memory)


def test_short_prompts_are_zero_padded_as_the_reference_pads(dit: CausalWanDiT) -> None:
    prompt = torch.randn(1, 5, CONFIG.text_dim, dtype=torch.float64)
    padded = torch.cat([prompt, torch.zeros(1, CONFIG.text_len - 5, CONFIG.text_dim, dtype=torch.float64)], dim=1)
    latents, t = torch.randn(1, 2, 16, 4, 6, dtype=torch.float64), torch.tensor([[500.0, 0.0]])
    torch.testing.assert_close(forward(dit, latents, t, prompt), forward(dit, latents, t, padded), rtol=0, atol=0)


def test_float32_is_close_to_float64(dit: CausalWanDiT) -> None:
    latents, t = torch.randn(1, 2, 16, 4, 6, dtype=torch.float64), torch.tensor([[900.0, 100.0]])
    prompt = torch.randn(1, 5, CONFIG.text_dim, dtype=torch.float64)
    exact = forward(dit, latents, t, prompt)
    single = CausalWanDiT(CONFIG)
    single.load_state_dict(dit.state_dict())
    torch.testing.assert_close(forward(single, latents.float(), t, prompt.float()).double(), exact, rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    "latents, timesteps, prompt, message",
    [
        ((1, 2, 8, 4, 6), (1, 2), (1, 5, 32), r"latents have shape \(1, 2, 8, 4, 6\); expected \[B, F, 16, H, W\]"),
        ((1, 2, 16, 4, 6), (1, 3), (1, 5, 32), r"timesteps have shape \(1, 3\)"),
        ((1, 2, 16, 4, 6), (1, 2), (1, 5, 31), r"prompt embedding has shape \(1, 5, 31\); expected \[batch, tokens <= 16, 32\]"),
        ((1, 2, 16, 4, 6), (1, 2), (1, 17, 32), r"prompt embedding has shape \(1, 17, 32\)"),
        ((2, 2, 16, 4, 6), (2, 2), (1, 5, 32), "prompt batch 1 does not match latent batch 2"),
    ],
)
def test_wrong_shapes_raise_shape_errors_naming_them(dit, latents, timesteps, prompt, message) -> None:
    with pytest.raises(ShapeError, match=message):
        forward(dit, torch.randn(latents, dtype=torch.float64), torch.zeros(timesteps), torch.randn(prompt, dtype=torch.float64))
