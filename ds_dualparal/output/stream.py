"""Finished blocks decoded and written beside the pipeline, not inside it.

The first stage hands each final block to `BlockOutput.submit` and goes straight back to the
schedule; a worker thread decodes the block with the streaming VAE decoder and passes the frames to
the sinks (mp4 writer, PNG frames). On CUDA the decode runs on a stream of its own at the lowest
priority, so it overlaps the transformer's kernels and yields to them: when both have work ready,
the GPU schedules the pipeline's first (it runs on a stream of the highest priority,
`pipeline.generation.Generator`; PyTorch's lowest priority is that of the default stream, so the
difference has to come from there). Blocks are decoded in the order they are submitted, which is temporal order, so
the video equals a decode of the whole latent video. A failure in the worker is raised on the
caller's thread at the next `submit` or at `close`.

With `inline` (a single stage on CUDA: cli/runner.py) `submit` itself queues the decode's kernels, on the
pipeline's stream (`stream`), between two block-steps, and the worker only waits for the frames and writes them.
A single GPU has no idle time for a decode beside the pipeline to fill (its kernels add to the
transformer's either way), while a decode on a stream of its own takes its memory from a pool of its
own, on top of the transformer's: inline it reuses the memory the block-step's activations were freed
to, and the stage's peak is the larger of the two, not their sum.
"""

from __future__ import annotations

import queue
import threading
import time
from contextlib import nullcontext
from typing import Callable

import numpy as np
import torch

from .video import StreamingDecoder, to_uint8_frames, uint8_frames

FrameSink = Callable[[np.ndarray, int], object]  # (frames (n, H, W, 3) uint8, index of the first frame)


class BlockOutput:
    """Decodes submitted latent blocks in order, on a worker thread (or, `inline`, at `submit`), and feeds their
    frames to `sinks` on the worker thread."""

    def __init__(self, decoder: StreamingDecoder, sinks: list[FrameSink], device: torch.device,
                 inline: bool = False, stream: torch.cuda.Stream | None = None):
        self.decoder = decoder
        self.sinks = sinks
        self.frames_written = 0
        self.seconds = 0.0  # decode and write time on the worker (it overlaps the denoising)
        self.inline = inline  # decode in `submit`, on `stream` (CUDA; None: the current one), module docstring
        self._device = device
        self._inline_stream = stream
        self._stream = None
        if device.type == "cuda" and not inline:
            least, _ = torch.cuda.Stream.priority_range()  # (least, greatest): a higher number is a lower priority
            self._stream = torch.cuda.Stream(device, priority=least)
        self._queue: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._cancelled = False
        self._finished = threading.Event()
        self._worker = threading.Thread(target=self._work, name="block-output", daemon=True)
        self._worker.start()

    def submit(self, block: int, latents: torch.Tensor, frames: np.ndarray | None = None) -> None:
        """Queue block `block`'s final latents (not modified afterwards) for decoding and writing.

        `frames` (n, H, W, 3) uint8 are written instead of the decoded frames (a continued video clip's
        own); the latents are decoded all the same, to carry the decoder's temporal cache on."""
        self._raise_failure()
        if self.inline:
            started = time.perf_counter()
            decoded, ready = self._decode_here(latents)
            self.seconds += time.perf_counter() - started
            self._queue.put((block, decoded, ready, frames, True))
            return
        ready = None
        if self._stream is not None:
            # the worker's stream waits for the kernels that produced the latents, and the allocator
            # keeps their memory until the worker's kernels that read them are done
            ready = torch.cuda.Event()
            ready.record()
            latents.record_stream(self._stream)
        self._queue.put((block, latents, ready, frames, False))

    def _decode_here(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        """The block's uint8 frames, on the host; on CUDA copied without waiting, with the event the worker
        waits for before reading them."""
        if self._device.type != "cuda":
            return uint8_frames(self.decoder.decode(latents)), None
        caller = torch.cuda.current_stream(self._device)
        stream = self._inline_stream or caller
        with torch.cuda.stream(stream):
            if stream != caller:  # every decode on one stream: the decoder's cache lives in its memory pool
                stream.wait_stream(caller)
                latents.record_stream(stream)
            frames = uint8_frames(self.decoder.decode(latents))
            host = torch.empty(frames.shape, dtype=torch.uint8, pin_memory=True)
            host.copy_(frames, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(stream)
        return host, ready

    def close(self, cancel: bool = False) -> None:
        """Waits for every submitted block to be written; raises the worker's failure, if any.

        With `cancel` (the caller is failing) the blocks not yet started are dropped. A Ctrl-C while
        waiting does the same and waits for the block in hand: a worker left running inside torch
        when the interpreter exits aborts the process ("terminate called without an active exception").
        """
        self._cancelled = self._cancelled or cancel
        self._queue.put(None)
        # an Event, not join(): Python 3.11's join, interrupted by Ctrl-C, marks a running thread as
        # stopped (its bpo-45274 fix releases the thread's own lock), and the next join returns at once
        try:
            self._finished.wait()
        except BaseException:
            self._cancelled = True
            self._finished.wait()
            raise
        self._raise_failure()

    def _raise_failure(self) -> None:
        if self._error is not None:
            raise self._error

    def _work(self) -> None:
        try:
            self._work_through_queue()
        finally:
            self._finished.set()

    def _work_through_queue(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is not None or self._cancelled:
                continue  # drain: the caller learns of the failure at its next call, or is failing
            block, latents, ready, given, decoded = item
            started = time.perf_counter()
            try:
                if decoded:  # `latents` are the frames already, on the host once `ready` has happened
                    if ready is not None:
                        ready.synchronize()
                    frames = latents.numpy()
                else:
                    with torch.cuda.stream(self._stream) if self._stream is not None else nullcontext():
                        if ready is not None:
                            self._stream.wait_event(ready)
                        frames = to_uint8_frames(self.decoder.decode(latents))  # to the CPU: waits for the decode
                if given is not None:
                    assert given.shape == frames.shape, f"block {block}: frames {given.shape}, decoded {frames.shape}"
                    frames = given
                for sink in self.sinks:
                    sink(frames, self.frames_written)
                self.frames_written += len(frames)
            except BaseException as err:  # noqa: BLE001 - handed to the caller's thread
                self._error = err
            self.seconds += time.perf_counter() - started
