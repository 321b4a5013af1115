"""MAESTRO v2.0.0 as Music Transformer training windows (upstream-compatible).

Layout under ``dataset_path`` (the same folder names as upstream dattri 0.3):

* ``maestro-v2.0.0-midi.zip``: the official archive (downloaded when needed,
  verified by its MD5 as recorded by mirdata's MAESTRO loader);
* ``maestro-v2.0.0/``: the extracted MIDI files and ``maestro-v2.0.0.json``;
* ``maestro-v2.0.0-processed/{train,val,test}/<midi name>.npy``: encoded event
  ids (upstream wrote ``.pickle`` files there; those are read too, with an
  unpickler that only accepts plain lists of ints);
* ``generated_music/``: the generated-music test set (``generated_music.zip``
  from upstream's benchmark repository; no checksum is published for it).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from dattri.benchmark.datasets._safe_pickle import safe_pickle_load
from dattri.benchmark.datasets.download import download_file, extract_zip
from dattri.benchmark.datasets.maestro.midi import EVENT_VOCAB_SIZE, encode_midi

__all__ = [
    "GENERATED_MUSIC_URL",
    "MAESTRO_JSON",
    "MAESTRO_MD5",
    "MAESTRO_URL",
    "MAX_SEQUENCE",
    "MaestroDataset",
    "create_maestro_datasets",
    "download_maestro",
    "load_event_file",
    "prepare_maestro",
]

#: Official MAESTRO v2.0.0 MIDI archive.
MAESTRO_URL = (
    "https://storage.googleapis.com/magentadata/datasets/maestro/v2.0.0/maestro-v2.0.0-midi.zip"
)
#: MD5 of ``maestro-v2.0.0-midi.zip`` (as recorded by mirdata's MAESTRO loader).
MAESTRO_MD5 = "8a45cc678a8b23cd7bad048b1e9034c5"
#: Metadata file inside the archive (pieces with ``midi_filename`` and ``split``).
MAESTRO_JSON = "maestro-v2.0.0.json"
#: Generated-music test set of upstream's benchmark (no published checksum).
GENERATED_MUSIC_URL = (
    "https://huggingface.co/datasets/trais-lab/dattri-benchmark/resolve/main/"
    "maestro_musictransformer/generated_music.zip?download=true"
)
#: Window length of the benchmark (events per sample).
MAX_SEQUENCE = 256
_SPLIT_DIRS = {"train": "train", "validation": "val", "test": "test"}


def load_event_file(path: str | os.PathLike) -> np.ndarray:
    """Read one encoded piece (``.npy``, upstream ``.pickle``, or a MIDI file).

    Args:
        path: ``.npy`` / ``.pickle`` / ``.pkl`` of event ids, or ``.mid`` /
            ``.midi`` (encoded with upstream's encoder).

    Returns:
        int64 array ``(n_events,)``.

    Raises:
        ValueError: If the file holds something other than event ids in
            ``[0, 388)`` or has an unknown suffix.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        ids = np.load(path, allow_pickle=False)
    elif suffix in (".pickle", ".pkl"):
        ids = np.asarray(safe_pickle_load(path))
    elif suffix in (".mid", ".midi"):
        ids = np.asarray(encode_midi(path, method="upstream"))
    else:
        msg = f"{path}: unknown event-file type {suffix!r}; expected .npy, .pickle or .mid."
        raise ValueError(msg)
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= EVENT_VOCAB_SIZE):
        msg = f"{path}: event ids must lie in [0, {EVENT_VOCAB_SIZE}); re-encode the file."
        raise ValueError(msg)
    return ids


_EVENT_SUFFIXES = (".npy", ".pickle", ".pkl", ".mid", ".midi")


def _event_files(folder: Path) -> list[Path]:
    """Event files directly inside ``folder``, sorted by path (upstream's order)."""
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in _EVENT_SUFFIXES]
    return sorted(files, key=str)


class MaestroDataset(Dataset):
    """Consecutive windows of encoded pieces (upstream's ``EPianoDataset`` full version).

    Pieces are taken in the given order (file-name order when built from a
    folder). A piece of ``n`` events yields windows at offsets ``0, max_seq,
    2 max_seq, ...`` below ``n - max_seq``; sample ``(x, tgt)`` is
    ``events[o : o + max_seq]`` and ``events[o + 1 : o + max_seq + 1]``. Pieces
    of at most ``max_seq`` events give no window. (Upstream drew the offset-0
    window of each piece at random; here it is the start of the piece.)

    Args:
        pieces: Event-id arrays, one per piece.
        max_seq: Window length.
        names: Optional piece names (for :attr:`index`).

    Attributes:
        index: ``(piece_name, offset)`` of every sample.
    """

    def __init__(
        self,
        pieces: Sequence[np.ndarray],
        max_seq: int = MAX_SEQUENCE,
        names: Sequence[str] | None = None,
    ) -> None:
        if max_seq < 1:
            msg = f"`max_seq` must be >= 1, got {max_seq}."
            raise ValueError(msg)
        names = [str(i) for i in range(len(pieces))] if names is None else list(names)
        if len(names) != len(pieces):
            msg = f"`names` has {len(names)} entries for {len(pieces)} pieces."
            raise ValueError(msg)
        self.max_seq = int(max_seq)
        self.pieces = [torch.as_tensor(np.asarray(p, dtype=np.int64)) for p in pieces]
        self.names = names
        self._where: list[tuple[int, int]] = []
        for piece_id, piece in enumerate(self.pieces):
            self._where.extend(
                (piece_id, offset) for offset in range(0, len(piece) - self.max_seq, self.max_seq)
            )
        self.index = [(self.names[p], o) for p, o in self._where]

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, max_seq: int = MAX_SEQUENCE) -> MaestroDataset:
        """Build from the event files directly inside ``folder`` (sorted by path).

        Raises:
            FileNotFoundError: If ``folder`` does not exist.
        """
        folder = Path(folder)
        if not folder.is_dir():
            msg = f"{folder} is not a folder of encoded pieces."
            raise FileNotFoundError(msg)
        files = _event_files(folder)
        if not files:
            msg = (
                f"{folder} holds no event files (.npy, .pickle, .mid); delete it and run "
                "create_maestro_datasets again, or point it at the right folder."
            )
            raise FileNotFoundError(msg)
        return cls([load_event_file(p) for p in files], max_seq, names=[p.name for p in files])

    def __len__(self) -> int:
        return len(self._where)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        piece_id, offset = self._where[int(index)]
        window = self.pieces[piece_id][offset : offset + self.max_seq + 1]
        return window[:-1], window[1:]


def download_maestro(dataset_path: str | os.PathLike, verbose: bool = True) -> Path:
    """Download and extract the MAESTRO v2.0.0 MIDI archive (MD5-verified).

    Args:
        dataset_path: Folder receiving ``maestro-v2.0.0-midi.zip`` and ``maestro-v2.0.0/``.
        verbose: Show a progress bar.

    Returns:
        The extracted ``maestro-v2.0.0`` folder.
    """
    root = Path(dataset_path).expanduser()
    archive = download_file(
        MAESTRO_URL, root / "maestro-v2.0.0-midi.zip", md5=MAESTRO_MD5, verbose=verbose
    )
    extract_zip(archive, root)
    return root / "maestro-v2.0.0"


def _pieces_from_json(json_path: Path) -> list[dict[str, str]]:
    data = json.loads(json_path.read_text(encoding="utf-8"))
    if isinstance(data, dict):  # column layout (MAESTRO v3 style): {field: {row: value}}
        rows = sorted(data["midi_filename"], key=int)
        return [
            {"midi_filename": data["midi_filename"][r], "split": data["split"][r]} for r in rows
        ]
    return [{"midi_filename": p["midi_filename"], "split": p["split"]} for p in data]


def prepare_maestro(
    maestro_root: str | os.PathLike,
    output_dir: str | os.PathLike,
    method: str = "upstream",
    verbose: bool = True,
) -> dict[str, int]:
    """Encode every piece listed in ``maestro-v2.0.0.json`` into ``output_dir/<split>/``.

    Args:
        maestro_root: Folder with ``maestro-v2.0.0.json`` and the MIDI files.
        output_dir: Receives ``train/``, ``val/`` and ``test/`` with one ``.npy`` per piece.
        method: Encoder (``"upstream"`` reproduces upstream's windows; ``"clean"``).
        verbose: Show a progress bar.

    Returns:
        Number of pieces written per split folder.

    Raises:
        FileNotFoundError: If the metadata file or a listed MIDI file is missing.
        ValueError: If a piece has an unknown split.
    """
    maestro_root, output_dir = Path(maestro_root), Path(output_dir)
    json_path = maestro_root / MAESTRO_JSON
    if not json_path.is_file():
        msg = f"{json_path} not found; extract maestro-v2.0.0-midi.zip into {maestro_root.parent}."
        raise FileNotFoundError(msg)
    pieces = _pieces_from_json(json_path)
    counts = dict.fromkeys(_SPLIT_DIRS.values(), 0)
    for folder in counts:
        (output_dir / folder).mkdir(parents=True, exist_ok=True)
    for piece in tqdm(pieces, desc="encode MAESTRO", disable=not verbose):
        split = _SPLIT_DIRS.get(piece["split"])
        if split is None:
            msg = f"{piece['midi_filename']}: unknown split {piece['split']!r} in {json_path}."
            raise ValueError(msg)
        midi_path = maestro_root / piece["midi_filename"]
        if not midi_path.is_file():
            msg = f"{midi_path} is listed in {json_path} but missing; re-extract the archive."
            raise FileNotFoundError(msg)
        ids = np.asarray(encode_midi(midi_path, method=method), dtype=np.int16)
        np.save(output_dir / split / (midi_path.name + ".npy"), ids)
        counts[split] += 1
    return counts


def create_maestro_datasets(
    dataset_path: str,
    generated_music: bool = False,
) -> tuple[MaestroDataset, MaestroDataset]:
    """Create the MAESTRO train and test windows (upstream's signature and layout).

    When ``dataset_path/maestro-v2.0.0-processed`` is missing, the MIDI archive
    is extracted (downloaded first if absent, MD5-verified) and encoded. With
    ``generated_music=True`` the test set is built from ``dataset_path/
    generated_music`` (downloaded from upstream's benchmark repository when
    missing).

    Args:
        dataset_path: Root folder of the MAESTRO data (created if missing).
        generated_music: Use the generated-music set instead of the validation
            split as the second dataset.

    Returns:
        ``(train_dataset, test_dataset)``: windows of 256 events, each sample
        ``(x, tgt)`` of int64 tensors ``(256,)``; the second set is MAESTRO's
        validation split (as upstream) or the generated music.
    """
    root = Path(dataset_path).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    processed = root / "maestro-v2.0.0-processed"
    if not (processed / "train").is_dir():
        maestro_root = root / "maestro-v2.0.0"
        if not (maestro_root / MAESTRO_JSON).is_file():
            maestro_root = download_maestro(root)
        prepare_maestro(maestro_root, processed)
    train = MaestroDataset.from_folder(processed / "train", MAX_SEQUENCE)
    if not generated_music:
        return train, MaestroDataset.from_folder(processed / "val", MAX_SEQUENCE)
    generated = root / "generated_music"
    if not generated.is_dir():
        archive = download_file(GENERATED_MUSIC_URL, root / "generated_music.zip")
        extract_zip(archive, generated)
    subfolders = [
        p for p in generated.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))
    ]
    if not _event_files(generated) and len(subfolders) == 1:  # archive with a top folder
        generated = subfolders[0]
    return train, MaestroDataset.from_folder(generated, MAX_SEQUENCE)
