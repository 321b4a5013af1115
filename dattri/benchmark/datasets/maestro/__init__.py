"""MAESTRO v2.0.0 with a Music Transformer: upstream dattri's ``maestro`` module.

Needs the optional extra ``music`` (``pretty_midi``) only to read MIDI files.
"""

from dattri.benchmark.datasets.maestro import data, maestro_musictransformer, midi
from dattri.benchmark.datasets.maestro.data import *  # noqa: F403
from dattri.benchmark.datasets.maestro.maestro_musictransformer import *  # noqa: F403
from dattri.benchmark.datasets.maestro.midi import *  # noqa: F403
from dattri.benchmark.models.music_transformer import (
    MusicTransformer,
    MusicTransformerConfig,
)

__all__ = [
    *data.__all__,
    *maestro_musictransformer.__all__,
    *midi.__all__,
    "MusicTransformer",
    "MusicTransformerConfig",
]
