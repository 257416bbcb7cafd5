"""The control protocol's pure parser and encoders: every bad input names its problem exactly."""

from __future__ import annotations

import json

import pytest

from framecast.models.errors import BadMessage
from framecast.stream.control import (
    ActionControl, PauseControl, PromptControl, ResumeControl, SeedControl, StepsControl, encode_ack, encode_error,
    parse_control,
)


def parse(raw: str | bytes, **limits):
    return parse_control(raw, **{"max_bytes": 256, "num_actions": 4, "max_prompt_chars": 20, **limits})


@pytest.mark.parametrize(
    "raw, control",
    [
        ('{"v": 1, "type": "prompt", "text": "a red fox"}', PromptControl("a red fox")),
        ('{"v": 1, "type": "prompt", "text": "a red fox", "id": "p1"}', PromptControl("a red fox", "p1")),
        ('{"v": 1, "type": "action", "action": 3, "id": 7}', ActionControl(3, 7)),
        ('{"v": 1, "type": "pause"}', PauseControl()),
        (b'{"v": 1, "type": "resume"}', ResumeControl()),
        ('{"v": 1, "type": "seed", "seed": 42}', SeedControl(42)),
        ('{"v": 1, "type": "steps", "steps": 2}', StepsControl(2)),
    ],
)
def test_valid_messages_parse_to_their_controls(raw, control) -> None:
    assert parse(raw) == control


@pytest.mark.parametrize(
    "raw, error",
    [
        ("x" * 257, "message is 257 bytes; the limit is 256"),
        (b"\xff\xfe", "message is not UTF-8 text"),
        ("{not json", "message is not JSON: Expecting property name enclosed in double quotes at character 1"),
        ("[1, 2]", "message must be a JSON object, got array"),
        ('{"type": "pause"}', "missing field 'v' (the protocol version; this server speaks v=1)"),
        ('{"v": "1", "type": "pause"}', "field 'v' must be an integer, got string"),
        ('{"v": 2, "type": "pause"}', "unsupported version v=2; this server speaks v=1"),
        ('{"v": 1}', "missing field 'type' (one of action, pause, prompt, resume, seed, steps)"),
        ('{"v": 1, "type": 5}', "field 'type' must be a string, got integer"),
        ('{"v": 1, "type": "jump"}', "unknown type 'jump'; expected one of action, pause, prompt, resume, seed, steps"),
        ('{"v": 1, "type": "prompt"}', "prompt: missing field 'text'"),
        ('{"v": 1, "type": "prompt", "txt": "a fox"}', "prompt: unknown field 'txt'"),
        ('{"v": 1, "type": "prompt", "text": 3}', "prompt: field 'text' must be a string, got integer"),
        ('{"v": 1, "type": "prompt", "text": "  "}', "prompt: field 'text' is empty"),
        ('{"v": 1, "type": "prompt", "text": "' + "a" * 21 + '"}',
         "prompt: field 'text' has 21 characters; the limit is 20"),
        ('{"v": 1, "type": "prompt", "text": "fox", "id": 1.5}',
         "field 'id' must be a string or an integer, got number"),
        ('{"v": 1, "type": "prompt", "text": "fox", "id": "' + "i" * 65 + '"}',
         "field 'id' has 65 characters; the limit is 64"),
        ('{"v": 1, "type": "action", "action": 4}', "action: field 'action' is 4; this model's actions are 0..3"),
        ('{"v": 1, "type": "action", "action": -1}', "action: field 'action' is -1; this model's actions are 0..3"),
        ('{"v": 1, "type": "action", "action": true}', "action: field 'action' must be an integer, got boolean"),
        ('{"v": 1, "type": "seed", "seed": -1}', "seed: field 'seed' is -1; it must be in [0, 2**63)"),
        ('{"v": 1, "type": "steps", "steps": 9}', "steps: field 'steps' is 9; it must be in [1, 8]"),
    ],
)
def test_bad_messages_raise_bad_message_naming_the_problem(raw, error) -> None:
    with pytest.raises(BadMessage) as info:
        parse(raw)
    assert str(info.value) == error


def test_actions_are_refused_by_a_model_without_actions() -> None:
    with pytest.raises(BadMessage) as info:
        parse('{"v": 1, "type": "action", "action": 0}', num_actions=0)
    assert str(info.value) == "action: this model takes no actions (got action 0)"


def test_replies_are_versioned_json() -> None:
    ack = json.loads(encode_ack(3, PromptControl("fox", "p"), 12, superseded=True))
    assert ack == {"v": 1, "type": "ack", "seq": 3, "id": "p", "control": "prompt", "chunk": 12, "superseded": True}
    error = json.loads(encode_error(4, "message is not JSON"))
    assert error == {"v": 1, "type": "error", "seq": 4, "id": None, "error": "message is not JSON"}
