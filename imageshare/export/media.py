"""Cine loops as MP4 (H.264, at the file's own frame rate) and stills as PNG/JPEG."""

from __future__ import annotations

import io
import typing
from fractions import Fraction

import numpy as np
from pydicom import Dataset

from imageshare.archive.pixel_budget import decoded_frames
from imageshare.archive.rendering import RenderOptions, _to_8bit, render_frame
from imageshare.archive.viewing import frame_rate
from imageshare.domain.errors import NotAcceptable

DEFAULT_RATE = 25.0


def _rgb(ds: Dataset, frame: np.ndarray, index: int) -> np.ndarray:
    pixels = _to_8bit(ds, frame, None, index)  # the frame's own window (functional groups)
    if pixels.ndim == 2:
        pixels = np.stack([pixels] * 3, axis=-1)
    return np.ascontiguousarray(pixels[..., :3])


def cine_to_mp4(ds: Dataset) -> bytes:
    """The frames of a multi-frame instance as an H.264 MP4 at its own frame rate."""
    import av

    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames < 2:
        raise NotAcceptable("only multi-frame instances (cine loops) become videos")
    rate = Fraction(frame_rate(ds) or DEFAULT_RATE).limit_denominator(1000)
    height, width = int(ds.Rows), int(ds.Columns)
    out = io.BytesIO()
    with av.open(out, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.width, stream.height = width + width % 2, height + height % 2
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18", "preset": "veryfast"}
        # one frame in memory at a time, within the budget
        for index, pixels in enumerate(decoded_frames(ds)):
            rgb = _rgb(ds, pixels, index)
            if rgb.shape[0] != stream.height or rgb.shape[1] != stream.width:
                rgb = np.pad(rgb, ((0, stream.height - height), (0, stream.width - width),
                                   (0, 0)))
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return out.getvalue()


def still_image(stream: typing.BinaryIO, media_type: str = "image/png",
                frame: int = 0) -> bytes:
    """One frame rendered as PNG or JPEG with the file's own window."""
    return render_frame(stream, frame, RenderOptions(media_type=media_type, quality=95))
