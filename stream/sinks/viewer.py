"""What every kind of viewer does with the controls its client sends up, in one place.

A viewer (a websocket, a WebRTC data channel) hands each text message it receives to its `ControlInbox`. The inbox
counts it (`seq`, from 1, malformed messages included, as stream/control.py specifies), parses it, and submits it to
the session with the client's token; the ack comes back later through `reply` (the viewer's event mailbox `put`).
A bad message gets an error reply and nothing closes: only a closed session ends the conversation.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from framecast.models.errors import BadMessage, SessionClosed
from framecast.stream.control import encode_error, parse_control

log = logging.getLogger("framecast.controls")

if TYPE_CHECKING:  # the session module imports torch; a viewer needs only its interface
    from framecast.stream.session import Reply, Session


class ControlInbox:
    """Parses and submits one client's controls; errors go back to the client as `encode_error` replies.

    `token`: what the client presented (steering needs the session's); `max_message_bytes`: the control size limit.
    """

    def __init__(self, session: Session, *, token: str | None, reply: Reply, max_message_bytes: int) -> None:
        self.session, self.token, self.reply = session, token, reply
        self.max_message_bytes = max_message_bytes
        self.can_steer = session.can_steer(token)
        self.received = 0  # messages received so far: the seq of the last one

    def receive(self, raw: str | bytes) -> bool:
        """Handle one message (any thread). Returns False once the session is closed: stop reading then."""
        self.received += 1
        seq = self.received
        control = None
        try:
            control = parse_control(raw, max_bytes=self.max_message_bytes, num_actions=self.session.num_actions)
            self.session.submit(control, token=self.token, seq=seq, reply=self.reply)
        except BadMessage as exc:
            log.info("session %s: control message %d refused: %s", self.session.id, seq, exc)
            self.reply(encode_error(seq, str(exc), None if control is None else control.id))
        except SessionClosed as exc:
            self.reply(encode_error(seq, str(exc), None if control is None else control.id))
            return False
        return True
