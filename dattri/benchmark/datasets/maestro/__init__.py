"""MAESTRO v2.0.0 with a Music Transformer: upstream dattri's ``maestro`` module.

Needs the optional extra ``music`` (``pretty_midi``) only to read MIDI files.
"""

from dattri.benchmark.datasets.maestro.data import (
    GENERATED_MUSIC_URL,
    MAESTRO_JSON,
    MAESTRO_MD5,
    MAESTRO_URL,
    MAX_SEQUENCE,
    MaestroDataset,
    create_maestro_datasets,
    download_maestro,
    load_event_file,
    prepare_maestro,
)
from dattri.benchmark.datasets.maestro.maestro_musictransformer import (
    ADAM_BETAS,
    ADAM_EPSILON,
    LR,
    config_from_state_dict,
    create_musictransformer_model,
    loss_maestro_musictransformer,
    train_maestro_musictransformer,
)
from dattri.benchmark.datasets.maestro.midi import (
    EVENT_VOCAB_SIZE,
    RANGE_NOTE_OFF,
    RANGE_NOTE_ON,
    RANGE_TIME_SHIFT,
    RANGE_VEL,
    START_IDX,
    decode_midi,
    encode_midi,
    encode_midi_upstream,
    import_pretty_midi,
)
from dattri.benchmark.models.music_transformer import (
    MusicTransformer,
    MusicTransformerConfig,
)

__all__ = [
    "ADAM_BETAS",
    "ADAM_EPSILON",
    "EVENT_VOCAB_SIZE",
    "GENERATED_MUSIC_URL",
    "LR",
    "MAESTRO_JSON",
    "MAESTRO_MD5",
    "MAESTRO_URL",
    "MAX_SEQUENCE",
    "RANGE_NOTE_OFF",
    "RANGE_NOTE_ON",
    "RANGE_TIME_SHIFT",
    "RANGE_VEL",
    "START_IDX",
    "MaestroDataset",
    "MusicTransformer",
    "MusicTransformerConfig",
    "config_from_state_dict",
    "create_maestro_datasets",
    "create_musictransformer_model",
    "decode_midi",
    "download_maestro",
    "encode_midi",
    "encode_midi_upstream",
    "import_pretty_midi",
    "load_event_file",
    "loss_maestro_musictransformer",
    "prepare_maestro",
    "train_maestro_musictransformer",
]
