"""A real-time run of the producer under the deadline scheduler, with a paced sink and optional background load.

The producer (this thread) generates; a sink thread shows each frame at its deadline (or at once when it is late)
and records when it did, so the metrics see what a viewer sees. Used by `framecast bench` and benchmarks/.
"""

from __future__ import annotations

import multiprocessing
import queue
import threading
import time

from framecast.stream.deadline import Action, DeadlineConfig, DeadlineScheduler, Fill, decoder_frame_rule
from framecast.stream.engine import StreamEngine
from framecast.stream.metrics import StreamMetrics
from framecast.stream.producer import Decoder, Producer


def degradation_steps(full: tuple[int, ...], *, fixed: bool = False) -> tuple[tuple[int, ...], ...]:
    """The step lists to degrade through: the full list, about half of it evenly spaced from its first step
    ((1000, 750, 500, 250) -> (1000, 500); (1000, 500, 250) -> (1000, 500)), the first step alone.

    `fixed`: the sampler cannot shorten a chunk's steps (Rolling Forcing's window holds one chunk per step), so the
    scheduler degrades by filling and dropping only.
    """
    if fixed:
        return (full,)
    half = -(-len(full) // 2)
    lists = [full, tuple(full[i * len(full) // half] for i in range(half)), full[:1]]
    return tuple(dict.fromkeys(lists))  # drop duplicates, keep order


def engine_step_lists(engine) -> tuple[tuple[int, ...], ...]:
    """The step lists a live engine can run (a rolling-window or stream-batch engine: only its full list)."""
    config = engine.config
    return degradation_steps(config.denoising_steps, fixed=getattr(config, "fixed_steps", False))


def _busy(stop: multiprocessing.synchronize.Event) -> None:
    x = 1.0001
    while not stop.is_set():
        for _ in range(100_000):
            x = x * x % 1.7


def warm_up(engine: StreamEngine, decoder: Decoder, scheduler: DeadlineScheduler) -> None:
    """Run every step list twice (first runs pay one-off costs) and teach the cost model from the second run."""
    for steps in scheduler.config.step_lists:
        for attempt in range(2):
            start = time.monotonic()
            chunk = engine.next_chunk(steps)
            generated = time.monotonic()
            decoder.decode(chunk.latents)
            if attempt:
                stages = {"denoise": generated - start, "decode": time.monotonic() - generated}
                scheduler.cost_model.observe(Action.GENERATE, len(steps), stages)
                scheduler.cost_model.observe(Action.GENERATE, len(steps), stages)  # past the model's warm-up skip
    engine.reset()
    if hasattr(decoder, "reset"):
        decoder.reset()


def run_realtime_bench(
    engine: StreamEngine,
    decoder: Decoder,
    *,
    fps: int,
    latency_budget_s: float,
    seconds: float,
    fill: str = "repeat",
    background_load: int = 0,
) -> StreamMetrics:
    config = DeadlineConfig(
        fps=fps, latency_budget_s=latency_budget_s, step_lists=engine_step_lists(engine),
        fill=Fill(fill), chunk_frames=engine.config.chunk_frames, **decoder_frame_rule(decoder),
    )
    scheduler = DeadlineScheduler(config)
    warm_up(engine, decoder, scheduler)
    stop_load = multiprocessing.Event()
    workers = [multiprocessing.Process(target=_busy, args=(stop_load,), daemon=True) for _ in range(background_load)]
    for worker in workers:
        worker.start()
    scheduler.clock.restart()
    metrics = StreamMetrics(start_s=scheduler.clock.start_s)
    producer = Producer(engine, decoder, scheduler, metrics)
    frames: queue.Queue = queue.Queue(maxsize=256)
    end = scheduler.clock.start_s + seconds

    def show() -> None:
        while (frame := frames.get()) is not None:
            wait = frame.deadline_s - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            metrics.frame_at_sink()

    sink = threading.Thread(target=show, name="framecast-bench-sink", daemon=True)
    sink.start()
    try:
        for frame in producer.frames():
            if frame.deadline_s > end:
                break
            frames.put(frame)
    finally:
        frames.put(None)
        sink.join()
        stop_load.set()
        for worker in workers:
            worker.join()
    return metrics
