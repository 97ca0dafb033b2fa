"""How large an index FFmpeg would build for an mp4/mov file, estimated from its boxes before FFmpeg opens it.

FFmpeg's mov demuxer allocates an index entry (tens of bytes) per declared sample while it opens the file, and a
sample table can declare millions of samples in a few bytes (a constant sample size, one chunk, one time-to-sample
entry; a fragment's `trun` with no per-sample fields): a 2 KB file declaring 89 million frames costs 3 GB before
any limit applied while reading packets is reached. So the declarations are counted here first, from the ISO base
media file format boxes (ISO/IEC 14496-12), the way FFmpeg reads them: its atom table is flat, so a sample table is
read inside any box it descends into (`udta`, `edts`, `dinf`...), `hoov` (or `free`/`skip`/`wide` holding an
`mvhd`) is a `moov`, and a table outside any `trak` belongs to the last track. Per track: `stsz`/`stz2`
sample_count; uncompressed audio (FFmpeg reads it by chunk) counts its chunks, each split in pieces of 1024
samples; each `elst` entry repeats the index. Every fragment's `trun` sample_count adds to the total. Nothing
proportional to a declared count is allocated here, and the walk stops after MAX_BOXES boxes.
"""

from __future__ import annotations

import array
import struct
import sys
from dataclasses import dataclass, field

from .errors import Ovis2Error

_CONTAINERS = {
    b"moov",
    b"trak",
    b"mdia",
    b"minf",
    b"stbl",
    b"dinf",
    b"edts",
    b"udta",
    b"mvex",
    b"tref",
    b"moof",
    b"traf",
}
_MOOV_ALIASES = {b"moov", b"hoov"}
_PADDING = {b"free", b"skip", b"wide"}  # read as a moov by FFmpeg when they hold an mvhd
MAX_BOXES = 100_000
MAX_DEPTH = 16
CHUNKED_AUDIO_PIECE = 1024  # samples of uncompressed audio FFmpeg puts in one index entry at most


@dataclass
class DeclaredTrack:
    handler: bytes = b""  # mdia's hdlr handler_type: b"vide", b"soun", ...
    samples: int = 0  # stsz/stz2 sample_count
    chunks: int = 0  # stco/co64 entry_count
    samples_per_chunk: int = 0  # the largest stsc entry
    edits: int = 0  # elst entry_count
    one_tick_per_sample: bool = False  # stts is one entry of delta 1

    @property
    def chunked_audio(self) -> bool:
        """Uncompressed audio (PCM: one sample per audio sample), which FFmpeg indexes by chunk, not by sample."""
        return self.handler == b"soun" and self.one_tick_per_sample

    @property
    def index_entries(self) -> int:
        if self.chunked_audio:
            pieces = -(-self.samples_per_chunk // CHUNKED_AUDIO_PIECE)
            base = self.chunks * max(1, pieces)
        else:
            base = self.samples
        return base * max(1, self.edits)


@dataclass
class DeclaredIndex:
    tracks: list[DeclaredTrack] = field(default_factory=list)
    fragment_samples: int = 0  # trun sample_counts, all fragments
    num_boxes: int = 0

    @property
    def index_entries(self) -> int:
        edits = max((track.edits for track in self.tracks), default=0)
        return sum(track.index_entries for track in self.tracks) + self.fragment_samples * max(1, edits)

    def current_track(self) -> DeclaredTrack:
        if not self.tracks:  # a table before any trak: FFmpeg would fail it, but it is counted all the same
            self.tracks.append(DeclaredTrack())
        return self.tracks[-1]


def declared_index(data: bytes | memoryview) -> DeclaredIndex:
    """The index the file's boxes declare; Ovis2Error past MAX_BOXES boxes or for a compressed movie box."""
    index = DeclaredIndex()
    _walk(memoryview(data), 0, len(data), None, index)
    return index


def _walk(data: memoryview, start: int, end: int, parent: bytes | None, index: DeclaredIndex, depth: int = 0):
    """The boxes in [start, end), the body of a `parent` box (None: the file)."""
    for kind, s, e in _children(data, start, end, index):
        if kind == b"cmov":
            raise Ovis2Error("the mp4/mov video's index is compressed (cmov), which is not supported")
        if kind == b"trak":
            index.tracks.append(DeclaredTrack())
        movie = parent is None and kind in _PADDING and _holds_mvhd(data, s, e)
        if kind in _CONTAINERS or kind in _MOOV_ALIASES or movie:
            if depth < MAX_DEPTH:
                _walk(data, s, e, kind, index, depth + 1)
            continue
        _read_leaf(kind, data[s:e], index, parent == b"mdia")


def _children(data: memoryview, start: int, end: int, index: DeclaredIndex):
    """(type, body start, body end) of the boxes laid one after another in [start, end); a box claiming more
    than is there ends at `end` (FFmpeg reads what there is)."""
    at = start
    while at + 8 <= end:
        index.num_boxes += 1
        if index.num_boxes > MAX_BOXES:
            raise Ovis2Error(f"the mp4/mov video has more than {MAX_BOXES} boxes")
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


def _read_leaf(kind: bytes, body: memoryview, index: DeclaredIndex, in_mdia: bool) -> None:
    if kind in (b"stsz", b"stz2"):
        index.current_track().samples += _u32(body, 8)
    elif kind in (b"stco", b"co64"):
        index.current_track().chunks += _u32(body, 4)
    elif kind == b"stsc":  # entries of (first_chunk, samples_per_chunk, sample description index)
        entries = min(_u32(body, 4), max(0, (len(body) - 8) // 12))
        if entries:
            table = array.array("I", bytes(body[8 : 8 + 12 * entries]))
            if sys.byteorder == "little":
                table.byteswap()
            track = index.current_track()
            track.samples_per_chunk = max(track.samples_per_chunk, max(table[1::3]))
    elif kind == b"elst":
        index.current_track().edits += _u32(body, 4)
    elif kind == b"stts":
        index.current_track().one_tick_per_sample = _u32(body, 4) == 1 and _u32(body, 12) == 1
    elif kind == b"hdlr" and in_mdia and len(body) >= 12:  # minf's hdlr names a data handler
        index.current_track().handler = bytes(body[8:12])
    elif kind == b"trun":
        index.fragment_samples += _u32(body, 4)


def _holds_mvhd(data: memoryview, start: int, end: int) -> bool:
    return end - start >= 8 and bytes(data[start + 4 : start + 8]) == b"mvhd"


def _u32(body: memoryview, offset: int) -> int:
    return struct.unpack_from(">I", body, offset)[0] if offset + 4 <= len(body) else 0
