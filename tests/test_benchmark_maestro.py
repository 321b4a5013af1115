"""MAESTRO / Music Transformer: relative attention, MIDI encoding, datasets, training, loss."""

import json
import pickle

import numpy as np
import pretty_midi
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from dattri.benchmark.datasets.maestro import (
    EVENT_VOCAB_SIZE,
    MaestroDataset,
    config_from_state_dict,
    create_maestro_datasets,
    create_musictransformer_model,
    decode_midi,
    encode_midi,
    encode_midi_upstream,
    load_event_file,
    loss_maestro_musictransformer,
    train_maestro_musictransformer,
)
from dattri.benchmark.models.music_transformer import (
    TOKEN_PAD,
    MusicTransformer,
    MusicTransformerConfig,
    relative_attention_logits,
)

TINY = MusicTransformerConfig(
    n_layers=1, num_heads=2, d_model=16, dim_feedforward=32, dropout=0.0, max_sequence=256
)


def _brute_force_logits(q, k, er):
    """Relative attention logits by the definition, one (i, j) pair at a time."""
    *_, length, head = q.shape
    out = torch.full((*q.shape[:-1], length), float("-inf"), dtype=q.dtype)
    for i in range(length):
        for j in range(i + 1):
            rel = er[er.shape[0] - 1 - (i - j)]
            out[..., i, j] = (
                (q[..., i, :] * k[..., j, :]).sum(-1) + (q[..., i, :] * rel).sum(-1)
            ) / (head**0.5)
    return out


@pytest.mark.parametrize("length", [1, 4, 7])
def test_relative_attention_matches_brute_force(length):
    gen = torch.Generator().manual_seed(length)
    q = torch.randn(2, 3, length, 5, dtype=torch.float64, generator=gen)
    k = torch.randn(2, 3, length, 5, dtype=torch.float64, generator=gen)
    er = torch.randn(9, 5, dtype=torch.float64, generator=gen)  # table longer than the input
    got = relative_attention_logits(q, k, er)
    want = _brute_force_logits(q, k, er)
    assert torch.equal(got.isinf(), want.isinf())
    finite = ~want.isinf()
    torch.testing.assert_close(got[finite], want[finite], rtol=0, atol=1e-12)


def test_attention_layer_matches_explicit_softmax():
    torch.manual_seed(0)
    model = MusicTransformer(TINY).double().eval()
    attn = model.transformer.encoder.layers[0].self_attn
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    q, k, v = attn.in_proj(x).split(16, dim=-1)
    heads = [t.reshape(2, 6, 2, 8).transpose(1, 2) for t in (q, k, v)]
    weights = F.softmax(_brute_force_logits(heads[0], heads[1], attn.Er), dim=-1)
    want = attn.out_proj((weights @ heads[2]).transpose(1, 2).reshape(2, 6, 16))
    torch.testing.assert_close(attn(x), want, rtol=0, atol=1e-12)


def test_model_is_causal_and_sized_like_upstream():
    model = create_musictransformer_model()
    assert sum(p.numel() for p in model.parameters()) == 13_115_782
    torch.manual_seed(0)
    tiny = MusicTransformer(TINY).eval()
    x = torch.randint(0, 388, (1, 10))
    y = x.clone()
    y[0, 7:] = (y[0, 7:] + 1) % 388
    torch.testing.assert_close(tiny(x)[:, :7], tiny(y)[:, :7])
    assert not torch.allclose(tiny(x)[:, 7:], tiny(y)[:, 7:])
    torch.testing.assert_close(tiny(x[0]), tiny(x)[0])
    with pytest.raises(ValueError, match="max_sequence"):
        tiny(torch.zeros(1, 257, dtype=torch.long))


def test_upstream_state_dict_names_load():
    torch.manual_seed(0)
    model = MusicTransformer(TINY)
    upstream = {
        k.replace("in_proj.weight", "in_proj_weight").replace("in_proj.bias", "in_proj_bias"): v
        for k, v in model.state_dict().items()
    }
    assert "transformer.encoder.layers.0.self_attn.in_proj_weight" in upstream
    assert upstream["positional_encoding.pe"].shape == (256, 1, 16)
    other = MusicTransformer(config_from_state_dict(upstream))
    other.load_state_dict(upstream)
    x = torch.randint(0, 388, (2, 12))
    model.eval()
    other.eval()
    torch.testing.assert_close(other(x), model(x))


def _midi(notes, pedal=(), path=None):
    pm = pretty_midi.PrettyMIDI()
    inst = pretty_midi.Instrument(program=0)
    inst.notes = [pretty_midi.Note(velocity=v, pitch=p, start=s, end=e) for p, v, s, e in notes]
    inst.control_changes = [pretty_midi.ControlChange(64, value, t) for value, t in pedal]
    pm.instruments.append(inst)
    if path is not None:
        pm.write(str(path))
    return pm


def _random_notes(rng, n, step=0.05):
    notes, t = [], 0.0
    for _ in range(n):
        start = t + step * int(rng.integers(0, 4))
        notes.append(
            (
                int(rng.integers(21, 109)),
                4 * int(rng.integers(1, 32)),
                start,
                start + 0.01 * int(rng.integers(1, 250)),
            )
        )
        t = start
    return notes


def test_clean_encoding_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    # Distinct pitches per note so no two notes of one pitch overlap; on the 10 ms grid.
    notes = [(60 + i, v, s, e) for i, (_, v, s, e) in enumerate(_random_notes(rng, 40))]
    ids = encode_midi(_midi(notes, path=tmp_path / "a.mid"), sustain=False)
    assert all(0 <= i < EVENT_VOCAB_SIZE for i in ids)
    assert encode_midi(tmp_path / "a.mid", sustain=False) == ids
    back = decode_midi(ids, tmp_path / "b.mid").instruments[0].notes
    got = sorted((n.pitch, n.velocity, round(n.start, 6), round(n.end, 6)) for n in back)
    want = sorted((p, v, round(s, 6), round(e, 6)) for p, v, s, e in notes)
    assert got == want
    assert encode_midi(tmp_path / "b.mid", sustain=False) == ids


def test_clean_encoding_events_and_sustain():
    notes = [(60, 80, 0.0, 0.5), (64, 40, 0.25, 1.75), (67, 40, 2.0, 2.1)]
    pedal = [(100, 0.1), (0, 1.0)]
    # velocity 20, on 60, 250 ms, velocity 10, on 64, 250 ms, off 60, 1.25 s, off 64, ...
    assert encode_midi(_midi(notes), sustain=False) == [
        376,
        60,
        280,
        366,
        64,
        280,
        188,
        355,
        280,
        192,
        280,
        67,
        265,
        195,
    ]
    # the pedal (0.1 .. 1.0) holds note 60 (released at 0.5) until 1.0
    assert encode_midi(_midi(notes, pedal)) == [
        376,
        60,
        280,
        366,
        64,
        330,
        188,
        330,
        192,
        280,
        67,
        265,
        195,
    ]
    with pytest.raises(ValueError, match="method"):
        encode_midi(_midi(notes), method="other")


def test_upstream_encoding_reproduces_its_quirks(tmp_path):
    notes = [(60, 80, 0.0, 0.5), (64, 40, 0.25, 1.75), (67, 40, 2.0, 2.1)]
    pedal = [(100, 0.1), (0, 1.0)]
    # Note 67 starts after the last pedal span and is dropped, as upstream does;
    # velocity events precede every note-on.
    assert encode_midi_upstream(_midi(notes, pedal, tmp_path / "u.mid")) == [
        376,
        60,
        280,
        366,
        64,
        280,
        188,
        355,
        280,
        192,
    ]
    assert encode_midi(tmp_path / "u.mid", method="upstream") == encode_midi_upstream(
        tmp_path / "u.mid"
    )
    assert encode_midi_upstream(_midi(notes)) == []  # no pedal: upstream keeps nothing
    same_velocity = [(60, 80, 0.0, 0.5), (62, 80, 0.5, 1.0)]
    assert encode_midi_upstream(_midi(same_velocity, [(100, 0.0), (0, 2.0)])) == [
        376,
        60,
        305,
        188,
        376,
        62,
        305,
        190,
    ]


def _write_maestro(root, rng):
    base = root / "maestro-v2.0.0"
    (base / "2004").mkdir(parents=True)
    pieces = []
    for i, split in enumerate(["train", "train", "validation", "test"]):
        name = f"2004/piece_{i}.midi"
        notes = _random_notes(rng, 150 if split == "train" else 90)
        end = max(e for *_, e in notes) + 1
        _midi(notes, [(127, 0.0), (0, end)], base / name)
        pieces.append({"midi_filename": name, "split": split, "canonical_title": f"t{i}"})
    (base / "maestro-v2.0.0.json").write_text(json.dumps(pieces))


def test_create_maestro_datasets_from_local_midi(tmp_path):
    rng = np.random.default_rng(1)
    _write_maestro(tmp_path, rng)
    train, test = create_maestro_datasets(str(tmp_path))
    processed = tmp_path / "maestro-v2.0.0-processed"
    files = sorted((processed / "train").iterdir())
    assert [p.name for p in files] == ["piece_0.midi.npy", "piece_1.midi.npy"]
    pieces = [np.load(p) for p in files]
    assert pieces[0].tolist() == encode_midi_upstream(tmp_path / "maestro-v2.0.0/2004/piece_0.midi")
    want = [(p, o) for p, piece in enumerate(pieces) for o in range(0, len(piece) - 256, 256)]
    assert len(train) == len(want) > 0
    for sample, (p, o) in zip(train, want):
        x, tgt = sample
        assert x.dtype == torch.int64 and x.shape == tgt.shape == (256,)
        assert x.tolist() == pieces[p][o : o + 256].tolist()
        assert tgt.tolist() == pieces[p][o + 1 : o + 257].tolist()
    assert len(test) == len(MaestroDataset.from_folder(processed / "val"))
    # a second call reads the processed folder (the MIDI files are no longer needed)
    (tmp_path / "maestro-v2.0.0" / "maestro-v2.0.0.json").unlink()
    again, _ = create_maestro_datasets(str(tmp_path))
    assert len(again) == len(train)
    assert torch.equal(again[0][0], train[0][0])


def test_generated_music_folder_and_upstream_pickles(tmp_path):
    rng = np.random.default_rng(2)
    _write_maestro(tmp_path, rng)
    gen = tmp_path / "generated_music"
    gen.mkdir()
    ids = rng.integers(0, 388, size=600).tolist()
    with (gen / "gen_0.pickle").open("wb") as fh:
        pickle.dump(ids, fh)  # upstream's processed format: a pickled list of ints
    _, test = create_maestro_datasets(str(tmp_path), generated_music=True)
    assert len(test) == 2  # offsets 0 and 256 (600 - 256 = 344)
    assert test[1][0].tolist() == ids[256:512]
    with (gen / "evil.pickle").open("wb") as fh:
        pickle.dump(np.arange(3), fh)  # needs numpy globals: refused, nothing runs
    with pytest.raises(pickle.UnpicklingError, match="plain data"):
        load_event_file(gen / "evil.pickle")
    np.save(gen / "bad.npy", np.array([1, 400]))
    with pytest.raises(ValueError, match="bad.npy"):
        load_event_file(gen / "bad.npy")


def _tiny_loader(n=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    data = torch.randint(0, 388, (n, 33), generator=gen)
    pieces = [row.numpy() for row in data]
    ds = MaestroDataset(pieces, max_seq=32)
    return ds, DataLoader(ds, batch_size=3, shuffle=False)


def test_train_is_seeded_and_loss_is_negative_last_token_ce(tmp_path):
    ds, loader = _tiny_loader()
    rng_state = torch.random.get_rng_state()
    model = train_maestro_musictransformer(loader, seed=3, num_epoch=2, config=TINY)
    assert torch.equal(torch.random.get_rng_state(), rng_state)  # caller's RNG untouched
    again = train_maestro_musictransformer(loader, seed=3, num_epoch=2, config=TINY)
    for a, b in zip(model.parameters(), again.parameters()):
        assert torch.equal(a, b)
    untrained = create_musictransformer_model(config=TINY)
    path = tmp_path / "model_weights_0.pt"
    torch.save(model.state_dict(), path)
    values = loss_maestro_musictransformer(str(path), loader)
    assert values.shape == (len(ds),)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    tgt = torch.stack([ds[i][1] for i in range(len(ds))])
    with torch.no_grad():
        want = -F.cross_entropy(model(x)[:, -1], tgt[:, -1], reduction="none")
    torch.testing.assert_close(values, want)
    assert (values <= 0).all()  # a log-likelihood
    untrained_path = tmp_path / "untrained.pt"
    torch.save(untrained.state_dict(), untrained_path)
    fitted = train_maestro_musictransformer(loader, seed=3, num_epoch=20, config=TINY, lr=1e-2)
    fitted_path = tmp_path / "fitted.pt"
    torch.save(fitted.state_dict(), fitted_path)
    # training raised the likelihood of the training samples' last events
    before = loss_maestro_musictransformer(str(untrained_path), loader).mean()
    assert loss_maestro_musictransformer(str(fitted_path), loader).mean() > before + 1.0


def test_loss_ignores_padding_target(tmp_path):
    torch.manual_seed(0)
    model = create_musictransformer_model(config=TINY)
    path = tmp_path / "m.pt"
    torch.save(model.state_dict(), path)
    x = torch.randint(0, 388, (2, 8))
    tgt = x.clone()
    tgt[1, -1] = TOKEN_PAD
    values = loss_maestro_musictransformer(str(path), [(x, tgt)])
    assert values[1] == 0
    with pytest.raises(FileNotFoundError, match="model_path"):
        loss_maestro_musictransformer(str(tmp_path / "missing.pt"), [(x, tgt)])


def test_generated_music_archive_with_top_folder_and_empty_folder(tmp_path):
    rng = np.random.default_rng(3)
    _write_maestro(tmp_path, rng)
    nested = tmp_path / "generated_music" / "generated_music"
    nested.mkdir(parents=True)
    np.save(nested / "g.npy", rng.integers(0, 388, size=300).astype(np.int16))
    _, test = create_maestro_datasets(str(tmp_path), generated_music=True)
    assert len(test) == 1
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no event files"):
        MaestroDataset.from_folder(tmp_path / "empty")


def test_per_sample_gradients_under_vmap():
    from torch.func import functional_call, grad, vmap

    cfg = MusicTransformerConfig(
        n_layers=1, num_heads=2, d_model=8, dim_feedforward=16, dropout=0.0, max_sequence=8
    )
    torch.manual_seed(0)
    model = MusicTransformer(cfg).double().eval()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, x, y):
        return F.cross_entropy(functional_call(model, p, (x,)), y)

    x = torch.randint(0, 388, (3, 6))
    y = torch.randint(0, 388, (3, 6))
    batched = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    for i in range(3):
        single = grad(loss)(params, x[i], y[i])
        for name, g in single.items():
            torch.testing.assert_close(batched[name][i], g, rtol=0, atol=1e-12)
    assert batched["transformer.encoder.layers.0.self_attn.Er"].abs().sum() > 0
