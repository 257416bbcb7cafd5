"""The relay: one producer thread, many viewers, bounded mailboxes that drop the oldest and count it."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from framecast.models.config import preset
from framecast.models.dit import CausalWanDiT
from framecast.models.errors import ConfigError, SessionClosed
from framecast.models.preview import PreviewDecoder
from framecast.models.text import HashedTextEncoder
from framecast.stream.deadline import Action
from framecast.stream.engine import EngineConfig, StreamEngine
from framecast.stream.relay import Mailbox, Relay
from framecast.stream.session import Session, SessionConfig


def test_a_viewer_that_never_reads_stalls_neither_the_producer_nor_other_viewers() -> None:
    async def main() -> None:
        relay: Relay[int] = Relay(capacity=2)
        slow = relay.subscribe()  # never read
        fast = relay.subscribe(capacity=64)
        publish_s: list[float] = []

        def produce() -> None:  # the engine thread
            for index in range(300):
                start = time.perf_counter()
                relay.publish(index)
                publish_s.append(time.perf_counter() - start)
                time.sleep(0.001)

        producer = threading.Thread(target=produce)
        producer.start()
        received = [await asyncio.wait_for(fast.get(), 5) for _ in range(300)]
        producer.join()
        assert received == list(range(300))  # every frame, in order
        assert fast.dropped == 0
        assert slow.dropped == 298 and len(slow) == 2  # holds the newest two; the rest were dropped and counted
        assert [await slow.get(), await slow.get()] == [298, 299]
        assert max(publish_s) < 0.05  # publish never waits for a reader
        assert relay.dropped_total == 298
        relay.unsubscribe(slow)
        assert relay.viewers == 1 and relay.dropped_total == 298  # a departed viewer's drops stay counted

    asyncio.run(main())


def test_mailbox_delivers_what_is_left_then_raises_once_closed() -> None:
    async def main() -> None:
        mailbox: Mailbox[str] = Mailbox(capacity=3)
        for item in "abcd":
            mailbox.put(item)
        assert (mailbox.dropped, mailbox.put_count, len(mailbox)) == (1, 4, 3)
        mailbox.close()
        mailbox.put("e")  # ignored once closed
        assert [await mailbox.get() for _ in range(3)] == ["b", "c", "d"]
        with pytest.raises(SessionClosed, match="closed"):
            await mailbox.get()

    asyncio.run(main())


def test_a_waiting_reader_is_woken_from_another_thread_and_by_close() -> None:
    async def main() -> None:
        mailbox: Mailbox[int] = Mailbox()
        threading.Timer(0.05, mailbox.put, args=(7,)).start()
        assert await asyncio.wait_for(mailbox.get(), 2) == 7
        threading.Timer(0.05, mailbox.close).start()
        with pytest.raises(SessionClosed):
            await asyncio.wait_for(mailbox.get(), 2)

    asyncio.run(main())


def test_closed_relay_refuses_subscribers_and_capacity_is_checked() -> None:
    async def main() -> None:
        relay: Relay[int] = Relay()
        viewer = relay.subscribe()
        relay.close()
        assert viewer.is_closed
        relay.publish(1)  # no viewers left: nothing happens
        with pytest.raises(SessionClosed, match="relay is closed"):
            relay.subscribe()
        with pytest.raises(ConfigError, match="capacity=0 must be an integer >= 1"):
            Mailbox(0)

    asyncio.run(main())
    with pytest.raises(ConfigError, match="capacity=0 must be an integer >= 1"):
        Relay(capacity=0)


def test_a_live_session_keeps_streaming_past_a_viewer_that_never_reads() -> None:
    """The real producer (tiny DiT, preview decoder, 64x64 px, 16 fps run 16x faster than real time)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    dit = CausalWanDiT(preset("tiny")).float().eval()
    text = HashedTextEncoder(dit.config.text_dim, dit.config.text_len)
    engine = StreamEngine(dit, EngineConfig(latent_height=8, latent_width=8), text.encode("a quiet lake"))
    session = Session(engine, PreviewDecoder(dit.config.out_dim), text.encode,
                      SessionConfig(fps=16, speed=16.0, latency_budget_s=0.5))

    async def main() -> None:
        slow = session.frames.subscribe()  # never read: capacity 2, the session default
        fast = session.frames.subscribe(capacity=64)
        session.start()
        try:
            frames = [await asyncio.wait_for(fast.get(), 5) for _ in range(120)]
        finally:
            await asyncio.to_thread(session.close)
        indices = [frame.index for frame in frames]
        sent = [r.frame for r in session.scheduler.records if r.action is not Action.DROP and r.frame <= indices[-1]]
        assert indices == sent[sent.index(indices[0]):] and fast.dropped == 0  # every frame the stream made
        assert {frame.rgb.shape for frame in frames} == {(64, 64, 3)}
        assert len(slow) == 2 and slow.dropped == slow.put_count - 2 >= 118  # dropped, and counted
        assert session.frames.dropped_total == slow.dropped
        assert session.metrics.to_json()["frames_at_sink"] >= 120  # the producer was never held up

    try:
        asyncio.run(main())
    finally:
        torch.set_num_threads(threads)
    assert session.failure is None and not session.is_running
