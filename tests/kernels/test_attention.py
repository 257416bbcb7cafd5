import torch

from framecast.kernels.attention import attention, linear_attention, masked_linear_attention


def test_chunked_linear_attention_equals_the_masked_quadratic_form() -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 12, 3, 8, dtype=torch.float64) for _ in range(3))
    chunk = torch.arange(12) // 4
    expected = masked_linear_attention(q, k, v, chunk[:, None] >= chunk[None, :])
    state, normalizer = torch.zeros(2, 3, 8, 8, dtype=torch.float64), torch.zeros(2, 3, 8, dtype=torch.float64)
    outputs = []
    for first in range(0, 12, 4):
        out, block_state, block_normalizer = linear_attention(q[:, first:first + 4], k[:, first:first + 4], v[:, first:first + 4], state, normalizer)
        outputs.append(out)
        state, normalizer = state + block_state, normalizer + block_normalizer
    torch.testing.assert_close(torch.cat(outputs, dim=1), expected, rtol=1e-12, atol=1e-12)


def test_attention_mask_hides_keys() -> None:
    q, k, v = (torch.randn(1, 4, 2, 8, dtype=torch.float64) for _ in range(3))
    mask = torch.tensor([[1, 0, 0, 0]] * 4, dtype=torch.bool)
    torch.testing.assert_close(attention(q, k, v, mask), v[:, :1].expand(-1, 4, -1, -1))
