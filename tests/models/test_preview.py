import torch

from framecast.models.preview import PreviewDecoder


def test_streaming_decode_equals_one_shot_and_follows_the_wan_frame_rule() -> None:
    latents = torch.randn(1, 7, 16, 4, 6)
    whole = PreviewDecoder(16).decode(latents)
    assert whole.shape == (1, 1 + 4 * 6, 32, 48, 3) and whole.dtype == torch.uint8
    streaming = PreviewDecoder(16)
    chunked = torch.cat([streaming.decode(latents[:, i : i + 3]) for i in range(0, 7, 3)], dim=1)
    assert torch.equal(chunked, whole)
