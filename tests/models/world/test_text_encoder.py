import itertools

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from framecast.models.errors import CheckpointError, ConfigError
from framecast.models.world.prompt import SceneSettings, all_settings, parse_prompt
from framecast.models.world.text_encoder import (
    WORD_IDS, TextEncoderConfig, WorldTextEncoder, load_text_encoder, save_text_encoder, settings_tokens,
)
from framecast.models.world.vocabulary import TimeOfDay


def encoder(seed: int = 0) -> WorldTextEncoder:
    torch.manual_seed(seed)
    return WorldTextEncoder().eval()


def test_any_phrasing_of_a_scene_gives_the_same_tokens_and_embedding() -> None:
    model = encoder()
    prompts = ["a red circle on grass by day in clear weather", "clear, day, grass, red circle",
               "CIRCLE red; grass. clear: day", SceneSettings()]
    tokens = model.tokenize(prompts)
    assert all(torch.equal(tokens[0], row) for row in tokens)
    embeddings = model.encode(prompts)
    assert all(torch.equal(embeddings[0], row) for row in embeddings)


def test_different_scenes_give_different_embeddings() -> None:
    model = encoder()
    scenes = list(itertools.islice(all_settings(), 0, 768, 7))
    embeddings = model.encode(scenes).flatten(1)
    assert len({tuple(settings_tokens(s)) for s in scenes}) == len(scenes)
    assert torch.cdist(embeddings, embeddings).add(torch.eye(len(scenes))).min() > 1e-3
    night = model.encode(["at night"])
    assert not torch.allclose(night, model.encode(["by day"]))


def test_embeddings_have_the_dit_text_shape() -> None:
    model = encoder()
    assert model.tokens == 5 and TextEncoderConfig().width == 64
    embeddings = model.encode(["snow", "a cyan diamond on water at dusk in fog", SceneSettings()])
    assert embeddings.shape == (3, 5, 64) and embeddings.dtype == torch.float32
    assert not embeddings.requires_grad


def test_a_partial_prompt_takes_the_other_slots_from_the_defaults() -> None:
    model = encoder()
    defaults = parse_prompt("a cyan triangle on snow at dusk in fog")
    assert torch.equal(model.tokenize(["at night"], defaults),
                       model.tokenize([defaults.replace(time=TimeOfDay.NIGHT)]))


def test_token_ids_cover_the_vocabulary_once() -> None:
    assert sorted(WORD_IDS.values()) == list(range(len(WORD_IDS))) and len(WORD_IDS) == 4 + 4 + 3 + 4 + 4


def test_an_unknown_word_raises_listing_the_vocabulary() -> None:
    with pytest.raises(ConfigError) as error:
        encoder().encode(["a purple circle on grass"])
    message = str(error.value)
    assert "unknown word 'purple'" in message
    assert "terrain: grass, sand, snow, water" in message and "agent colour: red, yellow, magenta, cyan" in message


def test_a_single_prompt_must_come_in_a_list() -> None:
    with pytest.raises(ConfigError, match="wrap a single prompt in a list"):
        encoder().tokenize("a red circle")


def test_save_and_load_give_the_same_encoder(tmp_path) -> None:
    model, path = WorldTextEncoder(TextEncoderConfig(width=32, layers=2, heads=4)).eval(), tmp_path / "text.safetensors"
    save_text_encoder(model, path)
    loaded = load_text_encoder(path)
    assert loaded.config == model.config and not loaded.training
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    prompts = ["a yellow square on sand at night in rain", "fog"]
    assert torch.equal(model.encode(prompts), loaded.encode(prompts))


def test_loading_a_file_with_missing_keys_names_them(tmp_path) -> None:
    path = tmp_path / "text.safetensors"
    save_text_encoder(encoder(), path)
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    state = load_file(str(path))
    del state["slot_embedding"]
    save_file(state, str(path), metadata=metadata)
    with pytest.raises(CheckpointError, match=r"missing +slot_embedding"):
        load_text_encoder(path)


def test_loading_a_file_without_the_config_says_what_it_is_not(tmp_path) -> None:
    path = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(2)}, str(path))
    with pytest.raises(CheckpointError, match="not a world text encoder file"):
        load_text_encoder(path)


def test_token_ids_turn_back_into_the_scene_they_came_from() -> None:
    from framecast.models.world.prompt import all_settings
    from framecast.models.world.text_encoder import settings_tokens, tokens_settings

    assert all(tokens_settings(settings_tokens(s)) == s for s in all_settings())
    with pytest.raises(ConfigError, match="slot"):
        tokens_settings(list(reversed(settings_tokens(SceneSettings()))))
    with pytest.raises(ConfigError, match="one per slot"):
        tokens_settings([0, 1])
