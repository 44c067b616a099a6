"""The mp4 encoder's own cost: 189 frames of 480x832 (the anchor config's video) through `Mp4Writer`
(ffmpeg, libx264, the writer's settings), for smooth moving content and for random noise (the worst
case for the encoder). Runs on a CPU machine; the GPU machine has no ffmpeg.

    python launch/encode_cost.py
"""

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ds_dualparal.output.video import Mp4Writer  # noqa: E402

FRAMES, HEIGHT, WIDTH, FPS = 189, 480, 832, 16


def frames(kind: str) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    if kind == "random":
        return [rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8) for _ in range(FRAMES)]
    return [(np.stack([x + 4 * t, y + 2 * t, x + y - 3 * t], -1) % 256).astype(np.uint8) for t in range(FRAMES)]


def main() -> int:
    with tempfile.TemporaryDirectory() as folder:
        for kind in ("smooth", "random"):
            video = frames(kind)
            started = time.perf_counter()
            with Mp4Writer(Path(folder) / f"{kind}.mp4", FPS) as writer:
                for first in range(0, FRAMES, 32):
                    writer.append(np.stack(video[first:first + 32]))
            print(f"{kind}: {FRAMES} frames of {WIDTH}x{HEIGHT} encoded in {time.perf_counter() - started:.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
