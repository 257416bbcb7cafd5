"""umT5 encoder: replays Wan's reference (`umt5_tiny_float64.pt`) exactly, and the prompt encoder, loader and tokenizer
boundaries fail loudly.

The fixture tests skip without ../shared; everything else runs on random `tiny` weights.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch
from torch import Tensor

from framecast.models.errors import CheckpointError, ConfigError, MissingDependency, ShapeError
from framecast.models.umt5 import (
    UMT5_PRESETS,
    Placement,
    PromptEncoder,
    UMT5Config,
    UMT5Encoder,
    UMT5Tokenizer,
    clean_prompt,
    load_umt5,
    relative_position_buckets,
    umt5_preset,
    zero_padding_rows,
)
from tests.conftest import load_fixture

TINY = umt5_preset("tiny")


@pytest.fixture(scope="module")
def fixture() -> dict:
    return load_fixture("umt5_tiny_float64.pt")


def random_encoder(config: UMT5Config = TINY, seed: int = 0) -> UMT5Encoder:
    torch.manual_seed(seed)
    return UMT5Encoder(config).double().eval().requires_grad_(False)


def random_batch(lengths: list[int], text_len: int = TINY.text_len, seed: int = 1) -> tuple[Tensor, Tensor]:
    """Token ids in [2, vocab) ending in EOS (1), then padding (0); mask 1 on tokens."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), text_len, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, : length - 1] = torch.randint(2, TINY.vocab_size, (length - 1,), generator=generator)
        ids[row, length - 1] = 1
        mask[row, :length] = 1
    return ids, mask


# ---------------------------------------------------------------------------------------------------------------------
# Config


def test_presets_have_wan_sizes() -> None:
    xxl = UMT5_PRESETS["umt5-xxl"]
    assert (xxl.vocab_size, xxl.dim, xxl.dim_attn, xxl.ffn_dim) == (256384, 4096, 4096, 10240)
    assert (xxl.num_heads, xxl.num_layers, xxl.num_buckets, xxl.text_len, xxl.head_dim) == (64, 24, 32, 512, 64)
    with pytest.raises(ConfigError, match="unknown umT5 preset 'xl'.*umt5-xxl, tiny"):
        umt5_preset("xl")


def test_real_preset_has_wan_key_layout() -> None:
    with torch.device("meta"):
        shapes = {key: list(t.shape) for key, t in UMT5Encoder(UMT5_PRESETS["umt5-xxl"]).state_dict().items()}
    assert len(shapes) == 2 + 24 * 10
    assert shapes["token_embedding.weight"] == [256384, 4096]
    assert shapes["blocks.23.pos_embedding.embedding.weight"] == [32, 64]
    assert shapes["blocks.0.ffn.gate.0.weight"] == [10240, 4096]
    assert shapes["blocks.0.ffn.fc2.weight"] == [4096, 10240]
    assert sum(torch.Size(s).numel() for s in shapes.values()) == 5_680_910_336


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"dim": 0}, "dim=0 must be a positive integer"),
        ({"num_heads": 3}, "dim_attn=32 must be divisible by num_heads=3"),
        ({"num_buckets": 31}, "num_buckets=31 must be an even integer >= 4"),
        ({"max_distance": 8}, r"max_distance=8 must be an integer > num_buckets/4=8"),
        ({"eps": 0.0}, r"eps=0.0 must be in \(0, 1\)"),
        ({"pad_id": 64}, r"pad_id=64 must be in \[0, vocab_size=64\)"),
        ({"heads": 2}, r"unknown UMT5Config field\(s\) \['heads'\]"),
    ],
)
def test_bad_config_names_value_and_range(changes: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TINY.replace(**changes)


# ---------------------------------------------------------------------------------------------------------------------
# Parity with the reference


def test_buckets_match_reference(fixture: dict) -> None:
    assert torch.equal(relative_position_buckets(160, 160, 32, 128), fixture["rel_buckets"])


def test_buckets_structure() -> None:
    buckets = relative_position_buckets(300, 300)
    assert buckets[:8, 0].tolist() == list(range(8))  # key before the query: distances below 8 are exact
    assert buckets[0, 1:8].tolist() == list(range(17, 24))  # key after the query: the upper half
    assert buckets[8, :9].tolist() == [8, 7, 6, 5, 4, 3, 2, 1, 0]  # distance 8 opens the log-spaced buckets
    assert buckets.max() == 31 and buckets[0, 299] == 31 and buckets[299, 0] == 15  # distances >= 128 share the last


# The reference's float32 softmax is replicated and all else is float64. That softmax's exp is vectorised differently per
# CPU: within 1e-10 on the machine with AVX512 that the suite ran on before, 1.0e-6 on an AVX2-only AMD EPYC. The float32
# replay is 10x looser.
FLOAT64_REPLAY_TOLERANCE = 4e-6


def test_float64_replay_matches_reference(fixture: dict) -> None:
    encoder = load_umt5(fixture["state_dict"], TINY, dtype=torch.float64)
    with torch.no_grad():
        raw = encoder(fixture["ids"], fixture["mask"])
    embeds = zero_padding_rows(raw, fixture["mask"])
    assert (raw - fixture["out_raw"]).abs().max() <= FLOAT64_REPLAY_TOLERANCE
    assert (embeds - fixture["prompt_embeds"]).abs().max() <= FLOAT64_REPLAY_TOLERANCE


def test_float32_replay_is_close(fixture: dict) -> None:
    encoder = load_umt5(fixture["state_dict"], TINY, dtype=torch.float32)
    with torch.no_grad():
        raw = encoder(fixture["ids"], fixture["mask"])
    assert raw.dtype == torch.float32
    torch.testing.assert_close(raw.double(), fixture["out_raw"], rtol=0, atol=1e-5)


def test_prompt_encoder_zeroes_padding_rows(fixture: dict) -> None:
    prompts = PromptEncoder(load_umt5(fixture["state_dict"], TINY, dtype=torch.float64))
    embeds = prompts.encode_ids(fixture["ids"], fixture["mask"])
    assert embeds.shape == (2, 160, 32) and embeds.dtype == torch.float64
    assert (embeds - fixture["prompt_embeds"]).abs().max() <= FLOAT64_REPLAY_TOLERANCE
    for row, length in enumerate(fixture["seq_lens"].tolist()):
        assert torch.all(embeds[row, length:] == 0)
        assert torch.all(embeds[row, :length].abs().sum(-1) > 0)
        assert fixture["out_raw"][row, length:].abs().max() > 0  # the raw output's padded rows are not zero


# ---------------------------------------------------------------------------------------------------------------------
# Batching and padding


def test_batch_of_different_lengths_matches_each_alone() -> None:
    encoder = random_encoder()
    ids, mask = random_batch([5, 160, 40])
    with torch.no_grad():
        batch = zero_padding_rows(encoder(ids, mask), mask)
        for row, length in enumerate([5, 160, 40]):
            alone = zero_padding_rows(encoder(ids[row : row + 1], mask[row : row + 1]), mask[row : row + 1])
            torch.testing.assert_close(batch[row : row + 1], alone, rtol=0, atol=1e-12)
            unpadded = encoder(ids[row : row + 1, :length], mask[row : row + 1, :length])
            # padded keys get exactly zero weight; only the float32 softmax's summation order may differ
            torch.testing.assert_close(batch[row : row + 1, :length], unpadded, rtol=0, atol=1e-6)
            assert torch.all(batch[row, length:] == 0)


def test_padding_tokens_do_not_leak_into_valid_rows() -> None:
    encoder = random_encoder()
    ids, mask = random_batch([12])
    other = ids.clone()
    other[0, 12:] = torch.randint(2, TINY.vocab_size, (TINY.text_len - 12,))  # garbage under the mask
    with torch.no_grad():
        first, second = encoder(ids, mask), encoder(other, mask)
    assert torch.equal(first[0, :12], second[0, :12])


# ---------------------------------------------------------------------------------------------------------------------
# Prompt encoder


class FakeTokenizer:
    """Word -> id by a fixed table; counts calls and prompts so the cache can be checked."""

    def __init__(self, text_len: int = TINY.text_len) -> None:
        self.text_len, self.calls, self.seen = text_len, 0, []

    def __call__(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        self.calls += 1
        self.seen.extend(prompts)
        ids = torch.zeros(len(prompts), self.text_len, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            tokens = [2 + sum(map(ord, word)) % (TINY.vocab_size - 2) for word in prompt.split()] + [1]
            ids[row, : len(tokens)] = torch.tensor(tokens)
        return ids, (ids != 0).long()


def test_encode_caches_each_prompt() -> None:
    tokenizer = FakeTokenizer()
    prompts = PromptEncoder(random_encoder(), tokenizer, cache_size=2)
    first = prompts.encode(["a red fox", "a blue whale", "a red fox"])
    assert first.shape == (3, TINY.text_len, TINY.dim)
    assert torch.equal(first[0], first[2])
    assert tokenizer.seen == ["a red fox", "a blue whale"]  # a repeat in one batch is encoded once
    again = prompts.encode(["a blue whale"])
    assert tokenizer.calls == 1 and torch.equal(again[0], first[1])
    prompts.encode(["a green owl"])  # evicts the least recently used ("a red fox")
    prompts.encode(["a blue whale"])
    assert tokenizer.calls == 2
    fox = prompts.encode(["a red fox"])
    assert tokenizer.calls == 3 and tokenizer.seen[-1] == "a red fox" and torch.equal(fox[0], first[0])


def test_encode_matches_encode_ids_and_zeroes_padding() -> None:
    tokenizer = FakeTokenizer()
    prompts = PromptEncoder(random_encoder(), tokenizer, cache_size=0)
    embeds = prompts.encode(["one two three", "four"])
    ids, mask = FakeTokenizer()(["one two three", "four"])
    assert torch.equal(embeds, prompts.encode_ids(ids, mask))
    assert torch.all(embeds[0, 4:] == 0) and torch.all(embeds[1, 2:] == 0)
    prompts.encode(["four"])
    assert tokenizer.calls == 2  # cache_size=0: nothing kept


def test_offload_moves_encoder_only_while_encoding(monkeypatch: pytest.MonkeyPatch) -> None:
    encoder = random_encoder()
    resident = PromptEncoder(random_encoder(), FakeTokenizer()).encode(["a cat"])
    prompts = PromptEncoder(encoder, FakeTokenizer(), placement=Placement.OFFLOAD, dtype=torch.float64)
    moves: list[str] = []
    original_to = encoder.to
    monkeypatch.setattr(encoder, "to", lambda *a, **k: moves.append(str(a[0] if a else k)) or original_to(*a, **k))
    embeds = prompts.encode(["a cat"])
    assert moves == ["cpu", "cpu"]  # to the device (here cpu) and back
    assert torch.equal(embeds, resident)
    prompts.encode(["a cat"])
    assert len(moves) == 2  # a cached prompt does not touch the weights


def test_dtype_option_converts_the_encoder() -> None:
    prompts = PromptEncoder(random_encoder(), FakeTokenizer(), dtype=torch.float32)
    assert prompts.encode(["x"]).dtype == torch.float32


@pytest.mark.parametrize(
    ("ids", "mask", "message"),
    [
        (torch.zeros(4, dtype=torch.long), torch.zeros(4), r"ids must be an integer tensor \[B, L\]"),
        (torch.zeros(1, 4), torch.ones(1, 4), "ids must be an integer tensor"),
        (torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 5), r"mask has shape \(1, 5\); expected the ids' \(1, 4\)"),
        (torch.full((1, 4), 64), torch.ones(1, 4), r"token ids span \[64, 64\]; must be in \[0, vocab_size=64\)"),
    ],
)
def test_encode_ids_rejects_bad_input(ids: Tensor, mask: Tensor, message: str) -> None:
    with pytest.raises(ShapeError, match=message):
        PromptEncoder(random_encoder()).encode_ids(ids, mask)


def test_encode_rejects_bad_prompts_and_missing_tokenizer() -> None:
    with pytest.raises(ShapeError, match="non-empty list of strings"):
        PromptEncoder(random_encoder(), FakeTokenizer()).encode("a bare string")
    with pytest.raises(ShapeError, match="non-empty list of strings"):
        PromptEncoder(random_encoder(), FakeTokenizer()).encode([])
    with pytest.raises(ConfigError, match="no tokenizer; pass one, or call encode_ids"):
        PromptEncoder(random_encoder()).encode(["a cat"])
    with pytest.raises(ConfigError, match="cache_size=-1 must be an integer >= 0"):
        PromptEncoder(random_encoder(), cache_size=-1)
    with pytest.raises(ConfigError, match="placement='offload' must be one of"):
        PromptEncoder(random_encoder(), placement="offload")


# ---------------------------------------------------------------------------------------------------------------------
# Loader


def test_load_from_file_matches_state_dict(tmp_path: Path) -> None:
    state = random_encoder().state_dict()
    path = tmp_path / "models_t5_umt5-xxl-enc-bf16.pth"
    torch.save(state, path)
    encoder = load_umt5(path, TINY, dtype=torch.float64)
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())
    assert all(torch.equal(encoder.state_dict()[key], value) for key, value in state.items())
    assert load_umt5(path, TINY).token_embedding.weight.dtype == torch.bfloat16  # Wan's released dtype by default


def test_loader_lists_every_bad_key() -> None:
    state = random_encoder().state_dict()
    del state["blocks.1.attn.q.weight"], state["norm.weight"]
    state["blocks.0.attn.q.bias"] = torch.zeros(32)
    state["blocks.0.ffn.fc1.weight"] = torch.zeros(64, 32)
    with pytest.raises(CheckpointError) as error:
        load_umt5(state, TINY)
    message = str(error.value)
    assert "does not fit the umT5 encoder (2 missing, 1 unexpected, 1 mis-shaped)" in message
    assert "missing     blocks.1.attn.q.weight [32, 32]" in message
    assert "missing     norm.weight [32]" in message
    assert "unexpected  blocks.0.attn.q.bias [32]" in message
    assert "mis-shaped  blocks.0.ffn.fc1.weight: checkpoint [64, 32], model [80, 32]" in message


def test_loader_rejects_wrong_preset_and_missing_file(tmp_path: Path) -> None:
    mismatch = r"mis-shaped  token_embedding.weight: checkpoint \[64, 32\], model \[64, 48\]"
    with pytest.raises(CheckpointError, match=mismatch):
        load_umt5(random_encoder().state_dict(), TINY.replace(dim=48))
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        load_umt5(tmp_path / "absent.pth", TINY)


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizer


def test_tokenizer_without_transformers_says_what_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail, installed or not
    with pytest.raises(MissingDependency, match=r"needs the 'transformers' package.*pip install transformers sentencepiece"):
        UMT5Tokenizer(tmp_path, 512)


def test_tokenizer_loads_local_folder_only(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    loaded: dict = {}

    class FakeHFTokenizer:
        def __call__(self, texts: list[str], **kwargs: object) -> dict:
            loaded["texts"], loaded["call"] = texts, kwargs
            ids = torch.ones(len(texts), 8, dtype=torch.long)
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def from_pretrained(path: Path, **kwargs: object) -> FakeHFTokenizer:
        loaded["path"], loaded["load"] = path, kwargs
        return FakeHFTokenizer()

    fake = types.ModuleType("transformers")
    fake.AutoTokenizer = types.SimpleNamespace(from_pretrained=from_pretrained)
    monkeypatch.setitem(sys.modules, "transformers", fake)
    with pytest.raises(CheckpointError, match="no tokenizer folder.*never downloaded"):
        UMT5Tokenizer(tmp_path / "google" / "umt5-xxl", 8)
    ids, mask = UMT5Tokenizer(tmp_path, 8)(["  a &amp;amp; b\n\tc  "])
    assert ids.shape == mask.shape == (1, 8)
    assert loaded["path"] == tmp_path and loaded["load"] == {"local_files_only": True}
    assert loaded["texts"] == ["a & b c"]
    assert loaded["call"] == {
        "padding": "max_length",
        "truncation": True,
        "max_length": 8,
        "add_special_tokens": True,
        "return_tensors": "pt",
    }


def test_from_files_wires_checkpoint_and_tokenizer(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    class FakeHFTokenizer:
        def __call__(self, texts: list[str], **kwargs: object) -> dict:
            ids, mask = FakeTokenizer()(texts)
            return {"input_ids": ids, "attention_mask": mask}

    fake = types.ModuleType("transformers")
    fake.AutoTokenizer = types.SimpleNamespace(from_pretrained=lambda path, **kwargs: FakeHFTokenizer())
    monkeypatch.setitem(sys.modules, "transformers", fake)
    torch.save(random_encoder().state_dict(), tmp_path / "enc.pth")
    prompts = PromptEncoder.from_files(tmp_path / "enc.pth", tmp_path, TINY, dtype=torch.float64, cache_size=4)
    expected = PromptEncoder(random_encoder(), FakeTokenizer()).encode(["a red fox"])
    assert torch.equal(prompts.encode(["a red fox"]), expected)
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(MissingDependency, match="transformers"):
        PromptEncoder.from_files(tmp_path / "enc.pth", tmp_path, TINY)


def test_clean_prompt_is_wan_whitespace_clean() -> None:
    assert clean_prompt("  A cat&nbsp;on\n a  mat &lt;3 ") == "A cat on a mat <3"  # &nbsp; is whitespace too
