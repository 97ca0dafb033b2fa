"""The index an mp4/mov file declares, counted from boxes built here the way FFmpeg's flat atom table reads them
(ovis2/mp4_sample_tables.py): every track, tables hidden in other boxes, moov aliases, chunked audio, edit lists,
fragments, and a bound on the walk."""

from __future__ import annotations

import struct

import pytest

from ovis2.errors import Ovis2Error
from ovis2.mp4_sample_tables import MAX_BOXES, declared_index


def box(kind: bytes, *children: bytes, body: bytes = b"") -> bytes:
    payload = body + b"".join(children)
    return struct.pack(">I4s", 8 + len(payload), kind) + payload


def full(kind: bytes, *fields: int) -> bytes:
    """A full box (version and flags 0) of 32-bit fields."""
    return box(kind, body=struct.pack(f">I{len(fields)}I", 0, *fields))


def stsz(samples: int) -> bytes:
    return full(b"stsz", 16, samples)  # a constant size: no per-sample table behind the count


def hdlr(handler: bytes) -> bytes:
    return box(b"hdlr", body=struct.pack(">II4s", 0, 0, handler) + bytes(12))


def trak(*tables: bytes, handler: bytes = b"vide") -> bytes:
    return box(b"trak", box(b"mdia", hdlr(handler), box(b"minf", box(b"stbl", *tables))))


def moov(*traks: bytes, kind: bytes = b"moov") -> bytes:
    return box(kind, full(b"mvhd", *([0] * 24)), *traks)


def test_the_samples_of_every_track_count_towards_one_total():
    index = declared_index(box(b"ftyp", body=b"isom") + moov(trak(stsz(100_000)), trak(stsz(100_000))))
    assert index.index_entries == 200_000 and len(index.tracks) == 2


@pytest.mark.parametrize("hiding_place", [b"udta", b"edts", b"dinf"])
def test_a_table_hidden_in_a_box_ffmpeg_reads_into_is_counted(hiding_place):
    hidden = box(b"trak", box(b"mdia", hdlr(b"vide"), box(b"minf", box(hiding_place, stsz(3_000_000)))))
    assert declared_index(moov(hidden)).index_entries == 3_000_000


def test_ffmpeg_s_other_names_for_the_movie_box_are_read():
    movie = moov(trak(stsz(3_000_000)))
    assert declared_index(movie.replace(b"moov", b"hoov", 1)).index_entries == 3_000_000
    assert declared_index(movie.replace(b"moov", b"free", 1)).index_entries == 3_000_000  # it holds an mvhd
    assert declared_index(box(b"free", stsz(3_000_000))).index_entries == 0  # padding, never read


def test_uncompressed_audio_counts_its_chunks_in_pieces_of_1024_samples_not_its_samples():
    stts = full(b"stts", 1, 10_000_000, 1)  # one entry: every sample lasts one tick
    stsc = full(b"stsc", 1, 1, 1_000_000, 1)
    stco = full(b"stco", 10, *range(10))
    pcm = trak(stts, stsz(10_000_000), stsc, stco, handler=b"soun")
    assert declared_index(moov(pcm)).index_entries == 10 * 977
    compressed = trak(full(b"stts", 2, 1, 1, 1, 2), stsz(10_000_000), stsc, stco, handler=b"soun")
    assert declared_index(moov(compressed)).index_entries == 10_000_000


def test_each_edit_repeats_a_tracks_index():
    edits = box(b"edts", full(b"elst", 5, *([0] * 15)))
    edited = box(b"trak", edits, box(b"mdia", hdlr(b"vide"), box(b"minf", box(b"stbl", stsz(1000)))))
    assert declared_index(moov(edited)).index_entries == 5000


@pytest.mark.parametrize("fragment_box", [b"traf", b"udta"])
def test_every_fragments_runs_count(fragment_box):
    fragment = box(b"moof", box(fragment_box, full(b"tfhd", 1), full(b"trun", 2_000_000, 0)))
    index = declared_index(moov(trak(stsz(0))) + fragment + fragment)
    assert index.index_entries == 4_000_000


def test_64_bit_box_sizes_are_read():
    table = stsz(3_000_000)
    large = struct.pack(">I4sQ", 1, b"stbl", 16 + len(table)) + table
    assert declared_index(moov(box(b"trak", box(b"mdia", box(b"minf", large))))).index_entries == 3_000_000


def test_the_walk_stops_after_its_bound_on_boxes():
    with pytest.raises(Ovis2Error, match=f"more than {MAX_BOXES} boxes"):
        declared_index(box(b"free") * (MAX_BOXES + 1))


def test_a_compressed_movie_box_is_refused():
    with pytest.raises(Ovis2Error, match="compressed"):
        declared_index(box(b"moov", box(b"cmov")))
