import pytest

from framecast.models.config import PRESETS, AttentionKind, DiTConfig, preset
from framecast.models.errors import ConfigError


def test_presets_have_the_reference_sizes() -> None:
    wan = preset("wan2.1-t2v-1.3b")
    assert (wan.dim, wan.num_heads, wan.num_layers, wan.ffn_dim, wan.text_dim, wan.text_len) == (1536, 12, 30, 8960, 4096, 512)
    assert wan.rope_split == (22, 21, 21)
    assert preset("wan2.1-t2v-14b").head_dim == 128
    assert preset("tiny").rope_split == (6, 5, 5)
    assert wan.tokens_per_frame(60, 104) == 1560


def test_unknown_preset_names_the_valid_ones_and_close_matches() -> None:
    with pytest.raises(ConfigError, match=r"unknown preset 'wan2.1-t2v-1.3B' \(did you mean wan2.1-t2v-1.3b") as error:
        preset("wan2.1-t2v-1.3B")
    for name in PRESETS:
        assert name in str(error.value)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(dim=100, num_heads=3), "dim=100 must be divisible by num_heads=3"),
        (dict(dim=12, num_heads=3), r"head_dim=4 \(dim/num_heads\) must be even and >= 6"),
        (dict(num_layers=0), "num_layers=0 must be a positive integer"),
        (dict(patch_size=(2, 2, 2)), "1 frame per token"),
        (dict(freq_dim=255), "freq_dim=255 must be even"),
        (dict(attention="linear"), "attention='linear' must be one of"),
        (dict(num_actions=-1), "num_actions=-1"),
    ],
)
def test_invalid_config_values_name_value_and_range(changes: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        DiTConfig(**changes)


def test_replace_validates_and_rejects_unknown_fields() -> None:
    assert preset("tiny", attention=AttentionKind.LINEAR).attention is AttentionKind.LINEAR
    with pytest.raises(ConfigError, match="unknown DiTConfig field"):
        preset("tiny", width=3)
    with pytest.raises(ConfigError, match="must be a positive multiple of the patch 2x2"):
        preset("tiny").tokens_per_frame(5, 4)
