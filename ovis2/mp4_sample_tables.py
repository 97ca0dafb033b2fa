"""How many samples each track of an mp4/mov file declares, read from its boxes before FFmpeg opens it.

FFmpeg's mov demuxer allocates an index entry (tens of bytes) per declared sample while it opens the file, and a
sample table can declare millions of samples in a few bytes (a constant sample size, one chunk, one time-to-sample
entry; or a fragment's `trun` with no per-sample fields): a 2 KB file declaring 89 million frames costs 3 GB
before any limit applied while reading packets is reached. So the declarations are counted here first, from the
ISO base media file format boxes (ISO/IEC 14496-12): `stsz`/`stz2` sample_count per track, plus the `trun`
sample_count of every fragment of that track (`tfhd` track_ID). Nothing proportional to a declared count is
allocated here.
"""

from __future__ import annotations

import struct
from collections import defaultdict
from dataclasses import dataclass

from .errors import Ovis2Error

_CONTAINER_BOXES = {b"moov", b"trak", b"mdia", b"minf", b"stbl", b"moof", b"traf"}
_MAX_DEPTH = 12


@dataclass
class DeclaredTrack:
    track_id: int | None
    handler: bytes = b""  # hdlr's handler_type: b"vide", b"soun", ...
    samples: int = 0  # stsz/stz2 sample_count plus the track's trun sample_counts
    one_tick_per_sample: bool = False  # stts is one entry of delta 1: FFmpeg reads such audio by chunks

    @property
    def chunked_audio(self) -> bool:
        """Uncompressed audio (PCM: one sample per audio sample), which FFmpeg indexes by chunk, not by sample."""
        return self.handler == b"soun" and self.one_tick_per_sample


def declared_tracks(data: bytes | memoryview) -> list[DeclaredTrack]:
    """The tracks the file's `moov` boxes describe, with the samples their tables and fragments declare."""
    data = memoryview(data)  # bodies are read in place, never copied
    tracks: list[DeclaredTrack] = []
    fragment_samples: dict[int, int] = defaultdict(int)
    for kind, start, end in _boxes(data, 0, len(data)):
        if kind == b"cmov":
            raise Ovis2Error("the mp4/mov video's index is compressed (cmov), which is not supported")
        if kind == b"moov":
            tracks += [_track(data, s, e) for k, s, e in _boxes(data, start, end) if k == b"trak"]
        elif kind == b"moof":
            _count_fragment(data, start, end, fragment_samples)
    by_id = {track.track_id: track for track in tracks}
    for track_id, count in fragment_samples.items():
        track = by_id.get(track_id)
        if track is None:
            track = by_id[track_id] = DeclaredTrack(track_id)
            tracks.append(track)
        track.samples += count
    return tracks


def _track(data: memoryview, start: int, end: int) -> DeclaredTrack:
    track = DeclaredTrack(None)
    for parent, kind, s, e in _walk(data, b"trak", start, end, 1):
        body = data[s:e]
        if kind == b"tkhd" and len(body) >= 4:
            offset = 20 if body[0] == 1 else 12  # version 1 has 64-bit creation and modification times
            track.track_id = _u32(body, offset)
        elif kind == b"hdlr" and parent == b"mdia" and len(body) >= 12:  # minf's hdlr names a data handler
            track.handler = bytes(body[8:12])
        elif kind in (b"stsz", b"stz2") and len(body) >= 12:
            track.samples += _u32(body, 8) or 0
        elif kind == b"stts" and len(body) >= 8:
            entries = _u32(body, 4)
            track.one_tick_per_sample = entries == 1 and _u32(body, 12) == 1
    return track


def _count_fragment(data: memoryview, start: int, end: int, samples: dict[int, int]) -> None:
    for kind, s, e in _boxes(data, start, end):
        if kind != b"traf":
            continue
        track_id = None
        for inner, s2, e2 in _boxes(data, s, e):
            body = data[s2:e2]
            if inner == b"tfhd" and len(body) >= 8:
                track_id = _u32(body, 4)
            elif inner == b"trun" and len(body) >= 8:
                samples[track_id] += _u32(body, 4) or 0


def _walk(data: memoryview, parent: bytes, start: int, end: int, depth: int):
    """(parent type, type, body start, body end) of every box in `parent`'s body [start, end), depth first, into
    the container boxes."""
    for kind, s, e in _boxes(data, start, end):
        yield parent, kind, s, e
        if kind in _CONTAINER_BOXES and depth < _MAX_DEPTH:
            yield from _walk(data, kind, s, e, depth + 1)


def _boxes(data: memoryview, start: int, end: int):
    """(type, body start, body end) of the boxes laid one after another in [start, end); a box claiming more
    than is there ends at `end` (FFmpeg reads what there is)."""
    at = start
    while at + 8 <= end:
        size, kind = struct.unpack_from(">I4s", data, at)
        header = 8
        if size == 1:
            if at + 16 > end:
                return
            (size,) = struct.unpack_from(">Q", data, at + 8)
            header = 16
        elif size == 0:  # to the end of the enclosing space
            size = end - at
        if size < header:
            return
        yield kind, at + header, min(at + size, end)
        at += size


def _u32(body: memoryview, offset: int) -> int | None:
    return struct.unpack_from(">I", body, offset)[0] if offset + 4 <= len(body) else None
