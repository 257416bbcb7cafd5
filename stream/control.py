"""The live control protocol: JSON text messages, version 1. Pure: no sockets, no asyncio, no torch.

Up (client -> server), one JSON object per websocket text message, at most `max_bytes` bytes of UTF-8:

    {"v": 1, "type": "prompt", "text": "a red fox in snow"}    switch prompt (1..max_prompt_chars characters)
    {"v": 1, "type": "action", "action": 2}                     action id for the next frames, 0 <= id < num_actions
    {"v": 1, "type": "pause"}                                   hold the stream at the next chunk boundary
    {"v": 1, "type": "resume"}                                  continue it (media time does not advance while held)
    {"v": 1, "type": "seed", "seed": 7}                         reseed the noise, 0 <= seed < 2**63
    {"v": 1, "type": "steps", "steps": 2}                       at most this many denoising steps, 1..8

Every message may carry `"id"`: a string (at most 64 characters) or integer of the client's choosing, echoed in the
reply. Unknown fields are refused (a typo must not pass silently). Controls are applied at chunk boundaries; several
controls of one type that arrive before the same boundary are coalesced (only the newest applies), and each is still
acknowledged.

Down (server -> client), JSON text messages (binary messages carry frames, see stream/sinks/websocket.py):

    {"v": 1, "type": "hello", "session": "...", "can_steer": true, "fps": "16", "format": "jpeg",
     "num_actions": 4, "paused": false, "latency_budget_s": 1.0}                once, at connect
    {"v": 1, "type": "ack", "seq": 3, "id": "a", "control": "prompt", "chunk": 12, "superseded": false}
    {"v": 1, "type": "error", "seq": 4, "id": null, "error": "message is not JSON: ..."}
    {"v": 1, "type": "chunk", "chunk": 12, "first_frame": 141, "frames": 12, "action": "generate", "steps": 4,
     "slack_s": 0.42}                                   as a chunk's first frame is sent (chunk null for a fill)

`seq` counts the messages this connection sent, from 1, malformed ones included, so an error can be matched to the
message that caused it even when it had no readable `id`. `chunk` in an ack is the engine chunk index from which the
control is in effect (for a superseded control: the chunk at which its replacement took effect); it is sent when the
control is applied, so it may precede that chunk's frames by up to the latency budget. `slack_s` is how long before
its deadline the chunk was ready. A malformed message gets an error reply; the connection and the stream go on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar

from framecast.models.errors import BadMessage

PROTOCOL_VERSION = 1
DEFAULT_MAX_BYTES = 4096
DEFAULT_MAX_PROMPT_CHARS = 1000
MAX_ID_CHARS = 64
MAX_STEPS = 8  # as EngineConfig.denoising_steps
MAX_SEED = 2**63


@dataclass(frozen=True)
class PromptControl:
    text: str
    id: str | int | None = None
    type: ClassVar[str] = "prompt"


@dataclass(frozen=True)
class ActionControl:
    action: int
    id: str | int | None = None
    type: ClassVar[str] = "action"


@dataclass(frozen=True)
class PauseControl:
    id: str | int | None = None
    type: ClassVar[str] = "pause"


@dataclass(frozen=True)
class ResumeControl:
    id: str | int | None = None
    type: ClassVar[str] = "resume"


@dataclass(frozen=True)
class SeedControl:
    seed: int
    id: str | int | None = None
    type: ClassVar[str] = "seed"


@dataclass(frozen=True)
class StepsControl:
    steps: int
    id: str | int | None = None
    type: ClassVar[str] = "steps"


Control = PromptControl | ActionControl | PauseControl | ResumeControl | SeedControl | StepsControl
CONTROL_TYPES: dict[str, type] = {
    cls.type: cls for cls in (ActionControl, PauseControl, PromptControl, ResumeControl, SeedControl, StepsControl)
}
_TYPE_NAMES = ", ".join(sorted(CONTROL_TYPES))
_FIELDS = {  # required fields besides v, type and the optional id
    "prompt": ("text",), "action": ("action",), "pause": (), "resume": (), "seed": ("seed",), "steps": ("steps",),
}


def _type_name(value: object) -> str:
    names = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _integer(kind: str, message: dict, name: str) -> int:
    value = message[name]
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadMessage(f"{kind}: field {name!r} must be an integer, got {_type_name(value)}")
    return value


def parse_control(
    raw: str | bytes,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    num_actions: int = 0,
    max_prompt_chars: int = DEFAULT_MAX_PROMPT_CHARS,
) -> Control:
    """One client message -> its Control. `num_actions`: the model's action count (0: it takes none).

    Raises:
        BadMessage: naming the problem: too large, not UTF-8, not JSON, not an object, missing or unsupported
            version, missing or unknown type, a missing, unknown or wrongly typed field, an empty or too long prompt,
            an action, seed or step count out of range.
    """
    size = len(raw.encode() if isinstance(raw, str) else raw)
    if size > max_bytes:
        raise BadMessage(f"message is {size} bytes; the limit is {max_bytes}")
    if isinstance(raw, bytes):
        try:
            raw = raw.decode()
        except UnicodeDecodeError:
            raise BadMessage("message is not UTF-8 text") from None
    try:
        message = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise BadMessage(f"message is not JSON: {exc.msg} at character {exc.pos}") from None
    if not isinstance(message, dict):
        raise BadMessage(f"message must be a JSON object, got {_type_name(message)}")
    if "v" not in message:
        raise BadMessage(f"missing field 'v' (the protocol version; this server speaks v={PROTOCOL_VERSION})")
    version = message["v"]
    if isinstance(version, bool) or not isinstance(version, int):
        raise BadMessage(f"field 'v' must be an integer, got {_type_name(version)}")
    if version != PROTOCOL_VERSION:
        raise BadMessage(f"unsupported version v={version}; this server speaks v={PROTOCOL_VERSION}")
    if "type" not in message:
        raise BadMessage(f"missing field 'type' (one of {_TYPE_NAMES})")
    kind = message["type"]
    if not isinstance(kind, str):
        raise BadMessage(f"field 'type' must be a string, got {_type_name(kind)}")
    if kind not in CONTROL_TYPES:
        raise BadMessage(f"unknown type {kind!r}; expected one of {_TYPE_NAMES}")
    fields = _FIELDS[kind]
    unknown = sorted(set(message) - {"v", "type", "id", *fields})
    if unknown:
        raise BadMessage(f"{kind}: unknown field {unknown[0]!r}")
    for name in fields:
        if name not in message:
            raise BadMessage(f"{kind}: missing field {name!r}")
    control_id = message.get("id")
    if control_id is not None:
        if isinstance(control_id, bool) or not isinstance(control_id, (str, int)):
            raise BadMessage(f"field 'id' must be a string or an integer, got {_type_name(control_id)}")
        if isinstance(control_id, str) and len(control_id) > MAX_ID_CHARS:
            raise BadMessage(f"field 'id' has {len(control_id)} characters; the limit is {MAX_ID_CHARS}")
    if kind == "prompt":
        text = message["text"]
        if not isinstance(text, str):
            raise BadMessage(f"prompt: field 'text' must be a string, got {_type_name(text)}")
        if not text.strip():
            raise BadMessage("prompt: field 'text' is empty")
        if len(text) > max_prompt_chars:
            raise BadMessage(f"prompt: field 'text' has {len(text)} characters; the limit is {max_prompt_chars}")
        return PromptControl(text, control_id)
    if kind == "action":
        action = _integer(kind, message, "action")
        if not num_actions:
            raise BadMessage(f"action: this model takes no actions (got action {action})")
        if not 0 <= action < num_actions:
            raise BadMessage(f"action: field 'action' is {action}; this model's actions are 0..{num_actions - 1}")
        return ActionControl(action, control_id)
    if kind == "seed":
        seed = _integer(kind, message, "seed")
        if not 0 <= seed < MAX_SEED:
            raise BadMessage(f"seed: field 'seed' is {seed}; it must be in [0, 2**63)")
        return SeedControl(seed, control_id)
    if kind == "steps":
        steps = _integer(kind, message, "steps")
        if not 1 <= steps <= MAX_STEPS:
            raise BadMessage(f"steps: field 'steps' is {steps}; it must be in [1, {MAX_STEPS}]")
        return StepsControl(steps, control_id)
    return CONTROL_TYPES[kind](id=control_id)


# replies and events: one JSON object per text message, always with the protocol version
def encode(kind: str, **fields: object) -> str:
    """A server message of type `kind` as JSON text."""
    return json.dumps({"v": PROTOCOL_VERSION, "type": kind, **fields}, separators=(",", ":"))


def encode_ack(seq: int, control: Control, chunk: int, *, superseded: bool = False) -> str:
    return encode("ack", seq=seq, id=control.id, control=control.type, chunk=chunk, superseded=superseded)


def encode_error(seq: int | None, error: str, control_id: str | int | None = None) -> str:
    return encode("error", seq=seq, id=control_id, error=error)
