from framecast.models.world.vocabulary import Action, AgentColour, AgentShape, Terrain, TimeOfDay, Weather


def test_actions_are_the_ids_an_action_conditioned_model_takes() -> None:
    assert [int(a) for a in Action] == [0, 1, 2, 3, 4]
    assert Action.NONE == 0  # the engine's "no action"
    assert [a.name for a in Action] == ["NONE", "UP", "DOWN", "LEFT", "RIGHT"]


def test_no_word_names_two_slots() -> None:
    words = [m.value for kind in (Terrain, Weather, TimeOfDay, AgentShape, AgentColour) for m in kind]
    assert len(words) == len(set(words))
