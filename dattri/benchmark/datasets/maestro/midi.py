"""MIDI <-> event-token encoding of the Music Transformer (388 performance events).

Token layout (Oore et al., 2018; the layout of upstream's MAESTRO benchmark):

=============  ===========  ==========================================
ids            event        value
=============  ===========  ==========================================
``0..127``     note-on      MIDI pitch
``128..255``   note-off     MIDI pitch
``256..355``   time-shift   ``(id - 256 + 1) * 10`` ms (10 ms .. 1 s)
``356..387``   velocity     ``(id - 356) * 4`` (MIDI velocity // 4)
=============  ===========  ==========================================

Two encoders are provided:

* :func:`encode_midi` (``method="clean"``): every note is kept; a note released
  while the sustain pedal (CC 64 >= 64) is down sounds until the pedal is
  released or its pitch is struck again; times are quantised to 10 ms ticks and a
  velocity event is written only when the quantised velocity changes.
  :func:`decode_midi` inverts it exactly for notes on the 10 ms grid with
  velocities divisible by 4 and no pedal.
* :func:`encode_midi_upstream` (``method="upstream"``): the token stream of
  upstream dattri 0.3 (its vendored midi-neural-processor), reproduced so that
  windows, sample indices and published ground truth line up. It keeps that
  processor's behaviour: notes are only kept inside or before sustain-pedal
  spans (a file without pedal events encodes to no tokens, notes after the last
  pedal release are dropped), time shifts are rounded gap by gap, and a velocity
  event precedes almost every note-on.

MIDI files are read and written with ``pretty_midi`` (optional extra ``music``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from dattri.benchmark.datasets._optional import import_optional

if TYPE_CHECKING:  # pragma: no cover
    import pretty_midi

__all__ = [
    "EVENT_VOCAB_SIZE",
    "RANGE_NOTE_OFF",
    "RANGE_NOTE_ON",
    "RANGE_TIME_SHIFT",
    "RANGE_VEL",
    "START_IDX",
    "decode_midi",
    "encode_midi",
    "encode_midi_upstream",
    "import_pretty_midi",
]

RANGE_NOTE_ON = 128
RANGE_NOTE_OFF = 128
RANGE_TIME_SHIFT = 100
RANGE_VEL = 32
#: First id of each event type.
START_IDX = {
    "note_on": 0,
    "note_off": RANGE_NOTE_ON,
    "time_shift": RANGE_NOTE_ON + RANGE_NOTE_OFF,
    "velocity": RANGE_NOTE_ON + RANGE_NOTE_OFF + RANGE_TIME_SHIFT,
}
#: Number of event ids (388).
EVENT_VOCAB_SIZE = RANGE_NOTE_ON + RANGE_NOTE_OFF + RANGE_TIME_SHIFT + RANGE_VEL
_TICKS_PER_SECOND = 100
_SUSTAIN_CC = 64


def import_pretty_midi() -> Any:
    """Import ``pretty_midi`` or explain how to install it.

    Returns:
        The ``pretty_midi`` module.

    Raises:
        ImportError: If ``pretty_midi`` is not installed.
    """
    return import_optional(
        "pretty_midi",
        "Reading MIDI files needs the optional dependency `pretty_midi`; install it "
        "with `pip install 'dattri[music]'` (or `pip install pretty_midi`).",
    )


def _load(source: str | os.PathLike | pretty_midi.PrettyMIDI) -> pretty_midi.PrettyMIDI:
    pm = import_pretty_midi()
    if isinstance(source, pm.PrettyMIDI):
        return source
    try:
        return pm.PrettyMIDI(os.fspath(source))
    except Exception as exc:  # pretty_midi/mido raise many exception types
        msg = f"Could not read MIDI file {os.fspath(source)!r}: {exc}"
        raise ValueError(msg) from exc


def _time_shift_ids(ticks: int) -> list[int]:
    """Ids of the time-shift events covering ``ticks`` 10 ms steps (``ticks >= 0``)."""
    ids = []
    while ticks >= RANGE_TIME_SHIFT:
        ids.append(START_IDX["time_shift"] + RANGE_TIME_SHIFT - 1)
        ticks -= RANGE_TIME_SHIFT
    if ticks:
        ids.append(START_IDX["time_shift"] + ticks - 1)
    return ids


def _pedal_spans(control_changes: Sequence[Any]) -> list[tuple[float, float]]:
    """``(down, up)`` times of the sustain pedal; a pedal held at the end stays down."""
    spans, down = [], None
    for cc in sorted(control_changes, key=lambda c: c.time):
        if cc.number != _SUSTAIN_CC:
            continue
        if cc.value >= 64 and down is None:
            down = cc.time
        elif cc.value < 64 and down is not None:
            spans.append((down, cc.time))
            down = None
    if down is not None:
        spans.append((down, float("inf")))
    return spans


def _sustained_notes(instrument: Any) -> list[tuple[float, float, int, int]]:
    """``(start, end, pitch, velocity)`` of an instrument's notes with the pedal applied."""
    notes = sorted(instrument.notes, key=lambda n: (n.start, n.pitch))
    spans = _pedal_spans(instrument.control_changes)
    onsets: dict[int, list[float]] = {}
    for note in notes:
        onsets.setdefault(note.pitch, []).append(note.start)
    out = []
    for note in notes:
        end = note.end
        for down, up in spans:
            if down <= note.end < up:
                later = [t for t in onsets[note.pitch] if t > note.start]
                end = max(note.end, min([up, *later]))
                break
        out.append((note.start, end, note.pitch, note.velocity))
    return out


def encode_midi(
    source: str | os.PathLike | pretty_midi.PrettyMIDI,
    method: str = "clean",
    sustain: bool = True,
) -> list[int]:
    """Encode a MIDI file into performance-event ids.

    Args:
        source: A MIDI file path or a ``pretty_midi.PrettyMIDI``.
        method: ``"clean"`` (documented in the module) or ``"upstream"``
            (:func:`encode_midi_upstream`).
        sustain: Apply the sustain pedal (``"clean"`` only).

    Returns:
        Event ids in ``[0, 388)``.

    Raises:
        ValueError: If ``method`` is unknown or the file cannot be read.
    """
    if method == "upstream":
        return encode_midi_upstream(source)
    if method != "clean":
        msg = f"`method` must be 'clean' or 'upstream', got {method!r}."
        raise ValueError(msg)
    midi = _load(source)
    events: list[tuple[int, int, int, int]] = []  # (tick, kind 0=off 1=on, pitch, velocity)
    for instrument in midi.instruments:
        if sustain:
            notes = _sustained_notes(instrument)
        else:
            notes = [(n.start, n.end, n.pitch, n.velocity) for n in instrument.notes]
        for start, end, pitch, velocity in notes:
            on = round(start * _TICKS_PER_SECOND)
            off = round(end * _TICKS_PER_SECOND)
            if off <= on:  # zero length on the 10 ms grid: not representable
                continue
            events.append((on, 1, pitch, velocity))
            events.append((off, 0, pitch, 0))
    events.sort()
    ids: list[int] = []
    tick, current_velocity = 0, None
    for when, kind, pitch, velocity in events:
        ids.extend(_time_shift_ids(when - tick))
        tick = when
        if kind == 1:
            quantised = min(velocity // 4, RANGE_VEL - 1)
            if quantised != current_velocity:
                ids.append(START_IDX["velocity"] + quantised)
                current_velocity = quantised
            ids.append(START_IDX["note_on"] + pitch)
        else:
            ids.append(START_IDX["note_off"] + pitch)
    return ids


def decode_midi(
    ids: Sequence[int], file_path: str | os.PathLike | None = None
) -> pretty_midi.PrettyMIDI:
    """Turn event ids back into a one-instrument (piano) MIDI.

    Ids outside ``[0, 388)`` (end and pad tokens) are skipped; a note-on whose
    pitch is already sounding restarts it; notes never switched off and notes of
    zero length are dropped.

    Args:
        ids: Event ids (any int sequence or 1-D tensor).
        file_path: Also write the MIDI file here.

    Returns:
        The ``pretty_midi.PrettyMIDI``.
    """
    pm = import_pretty_midi()
    time, velocity = 0.0, 0
    sounding: dict[int, tuple[float, int]] = {}
    notes = []
    for raw in ids:
        idx = int(raw)
        if not 0 <= idx < EVENT_VOCAB_SIZE:
            continue
        if idx >= START_IDX["velocity"]:
            velocity = (idx - START_IDX["velocity"]) * 4
        elif idx >= START_IDX["time_shift"]:
            time += (idx - START_IDX["time_shift"] + 1) / _TICKS_PER_SECOND
        elif idx >= START_IDX["note_off"]:
            pitch = idx - START_IDX["note_off"]
            if pitch in sounding:
                start, vel = sounding.pop(pitch)
                if time > start:
                    notes.append(pm.Note(velocity=vel, pitch=pitch, start=start, end=time))
        else:
            sounding[idx] = (time, velocity)
    notes.sort(key=lambda n: (n.start, n.pitch))
    midi = pm.PrettyMIDI()
    piano = pm.Instrument(program=0, is_drum=False, name="piano")
    piano.notes = notes
    midi.instruments.append(piano)
    if file_path is not None:
        midi.write(os.fspath(file_path))
    return midi


# --------------------------------------------------------------------------------------
# upstream dattri 0.3 token stream


class _UpstreamSpan:
    """A pedal-down span and the notes started inside it (upstream's semantics)."""

    def __init__(self, start: float) -> None:
        self.start = start
        self.end: float | None = None
        self.managed: list[Any] = []

    def extend_notes(self) -> None:
        """Lengthen managed notes to the next onset of their pitch or the span end."""
        next_onset: dict[int, float] = {}
        for note in reversed(self.managed):
            if note.pitch in next_onset:
                note.end = next_onset[note.pitch]
            else:
                note.end = max(self.end, note.end)
            next_onset[note.pitch] = note.start


def _upstream_spans(control_changes: Sequence[Any]) -> list[_UpstreamSpan]:
    spans: list[_UpstreamSpan] = []
    current = None
    for cc in control_changes:
        if cc.value >= 64 and current is None:
            current = _UpstreamSpan(cc.time)
        elif cc.value < 64 and current is not None:
            current.end = cc.time
            spans.append(current)
            current = None
        elif cc.value < 64 and spans:
            spans[-1].end = cc.time
    return spans


def _upstream_notes(spans: list[_UpstreamSpan], notes: list[Any]) -> list[Any]:
    stream: list[Any] = []
    for span in spans:
        for position, note in enumerate(notes):
            if note.start < span.start:
                stream.append(note)
            elif note.start > span.end:
                notes = notes[position:]
                span.extend_notes()
                break
            else:
                span.managed.append(note)
    for span in spans:
        stream.extend(span.managed)
    stream.sort(key=lambda n: n.start)
    return stream


def encode_midi_upstream(source: str | os.PathLike | pretty_midi.PrettyMIDI) -> list[int]:
    """Encode a MIDI file exactly as upstream dattri 0.3 does (see the module notes).

    The input's ``pretty_midi`` note objects are copied before the pedal step
    lengthens them, so a ``PrettyMIDI`` passed in is left unchanged.

    Args:
        source: A MIDI file path or a ``pretty_midi.PrettyMIDI``.

    Returns:
        Event ids in ``[0, 388)``.
    """
    pm = import_pretty_midi()
    midi = _load(source)
    notes: list[Any] = []
    for instrument in midi.instruments:
        copies = [pm.Note(n.velocity, n.pitch, n.start, n.end) for n in instrument.notes]
        pedal = [cc for cc in instrument.control_changes if cc.number == _SUSTAIN_CC]
        notes += _upstream_notes(_upstream_spans(pedal), copies)
    notes.sort(key=lambda n: n.start)
    # (time, is_on, pitch, velocity or None), stable-sorted by time only.
    split = []
    for note in notes:
        split.append((note.start, True, note.pitch, note.velocity))
        split.append((note.end, False, note.pitch, None))
    split.sort(key=lambda e: e[0])
    ids: list[int] = []
    current_time, previous_velocity = 0.0, 0
    for when, is_on, pitch, velocity in split:
        ids.extend(_time_shift_ids(round((when - current_time) * _TICKS_PER_SECOND)))
        if velocity is not None and previous_velocity != velocity // 4:
            # Upstream compares the *raw* previous velocity with the quantised one.
            ids.append(START_IDX["velocity"] + velocity // 4)
        ids.append(START_IDX["note_on" if is_on else "note_off"] + pitch)
        current_time, previous_velocity = when, velocity
    return ids
