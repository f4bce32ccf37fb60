"""Tests for sleep1d.py (PART on 1D EEG, sleep staging), on CPU with tiny configurations: `pytest -q test_sleep1d.py`.

The recordings here are written by the formats' own libraries (wfdb, h5py / scipy.io, pyedflib),
independently of the readers under test.
"""

import json
import os
import threading

import h5py
import numpy as np
import pyedflib
import pytest
import scipy.io
import torch
import wfdb
from click.testing import CliRunner
from sklearn.metrics import cohen_kappa_score
from wfdb.io.convert.matlab import wfdb_to_mat

import baselines
import engine
import part
import sleep1d
import weights
from data import UserError
from conftest import crash_after_epoch, one_line_error
from vit import patchify

# ---------------------------------------------------------------- windows and targets


def pretext_config(method, context=1, **flags):
    """A tiny 1D pretraining config of `method` on 6-channel epochs of `context` x 30 s."""
    vit = sleep1d.eeg_vit("eeg_test", 100, 6)
    return baselines.pretext_config(method, vit=vit, img_size=(context * 3000,), **sleep1d.signal_stats(vit), **flags)


def test_dt_targets_match_hand_computation():
    w = 100
    t0 = torch.tensor([[0.0, 37.25, 1234.5, 2900.0]])
    boxes = torch.stack([t0, t0 + w], dim=-1)  # (1, 4, 2) as (t0, t1)
    pairs = torch.tensor([[[0, 1], [1, 2], [3, 0], [2, 2]]])
    expected = torch.tensor([[[37.25 / w], [(1234.5 - 37.25) / w], [-2900.0 / w], [0.0]]])
    torch.testing.assert_close(part.relative_targets(boxes, pairs), expected)


def test_pretraining_regresses_dt_of_the_windows_it_sampled(monkeypatch):
    """The targets PART trains on in 1D are (t_tgt - t_ref) / w of the windows it cut, computed here in numpy."""
    seen = {}
    for name, fn in (("boxes", part.sample_boxes), ("pairs", part.sample_pairs)):
        monkeypatch.setattr(part, fn.__name__, lambda *a, fn=fn, name=name, **k: seen.setdefault(name, fn(*a, **k)))
    loss_fn = part.relative_loss
    monkeypatch.setattr(
        part,
        "relative_loss",
        lambda pred, target, d: seen.setdefault("target", target) is not None and loss_fn(pred, target, d),
    )
    part.PART(pretext_config("part", num_patches=40, num_pairs=64))(torch.randn(3, 6, 3000))
    t0, pairs = seen["boxes"][..., 0].numpy().astype(np.float64), seen["pairs"].numpy()
    expected = np.stack([(t0[b, pairs[b, :, 1]] - t0[b, pairs[b, :, 0]]) / 100 for b in range(3)])[..., None]
    np.testing.assert_allclose(seen["target"].numpy(), expected, rtol=1e-5, atol=1e-4)
    assert np.abs(expected).max() > 10  # shifts of many windows, not only overlaps


def test_windows_lie_inside_the_epoch_at_continuous_starts():
    torch.manual_seed(0)
    boxes = part.sample_boxes(64, (3000,), 100, 40, "offgrid")  # (B, N, 2)
    assert boxes.shape == (64, 40, 2)
    assert (boxes[..., 0] >= 0).all() and (boxes[..., 1] <= 3000).all()
    torch.testing.assert_close(boxes[..., 1] - boxes[..., 0], torch.full((64, 40), 100.0))
    assert (boxes[..., 0] % 1 != 0).float().mean() > 0.99  # continuous, not on a grid
    assert boxes[..., 0].min() < 50 and boxes[..., 0].max() > 2850  # the whole epoch is reachable


def test_crop_is_exact_on_integer_starts_and_interpolates_between():
    signals = torch.randn(2, 3, 3000, dtype=torch.float64)
    t0 = torch.tensor([[0.0, 2900.0, 17.0], [1234.25, 2899.5, 0.75]], dtype=torch.float64)
    windows = part.crop_patches(signals, torch.stack([t0, t0 + 100], dim=-1), 100)  # (B, N, C, w)
    assert windows.shape == (2, 3, 3, 100)
    grid = np.arange(3000)
    for b in range(2):
        for n in range(3):
            for c in range(3):
                expected = np.interp(t0[b, n].item() + np.arange(100), grid, signals[b, c].numpy())
                np.testing.assert_allclose(windows[b, n, c].numpy(), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(windows[0, 1], signals[0, :, 2900:])  # the last window ends on the last sample


def test_grid_windows_are_the_epoch_in_time_order():
    x = torch.randn(2, 6, 3000)
    windows = patchify(x, 100)
    assert windows.shape == (2, 30, 6, 100)
    torch.testing.assert_close(windows[1, 7], x[1, :, 700:800])


# ---------------------------------------------------------------- finetuning model and metric


def stager(**overrides):
    return part.Classifier(sleep1d.stager_config(sleep1d.eeg_vit("eeg_test", 100, 6), **{"pos_mask": 0.2, **overrides}))


def test_position_embeddings_are_masked_in_training_only(monkeypatch):
    torch.manual_seed(0)
    model = stager()
    seen = []
    forward = model.encoder.forward_features
    monkeypatch.setattr(
        model.encoder, "forward_features", lambda windows, pos=None: seen.append(pos) or forward(windows, pos)
    )
    x = torch.randn(8, 6, 3000)
    model.train()
    model.logits(x)
    pos = seen[-1]  # (B, 1 + 30, D)
    keep = (pos != 0).any(dim=-1)  # (B, 1 + 30): a masked token's embedding is exactly zero
    torch.testing.assert_close(
        pos[keep], model.encoder.pos_embed.expand(8, -1, -1)[keep]
    )  # the others are the encoder's own
    assert keep.shape == (8, 31) and keep[:, 0].all()  # the class token keeps its embedding
    assert ((keep[:, 1:] == 0).sum(dim=1) == 6).all()  # 20% of the 30 window tokens
    assert len({tuple(row.tolist()) for row in keep}) > 1  # drawn afresh per epoch
    model.eval()
    a, b = model.logits(x), model.logits(x)
    assert seen[-1] is None and seen[-2] is None and torch.equal(a, b)
    model.train()
    assert not torch.allclose(model.logits(x), a)  # in training the masking changes the output
    assert seen[-1] is not None


def test_kappa_matches_scikit_learn():
    g = np.random.default_rng(0)
    for trial in range(5):
        y = g.choice(5, size=400, p=[0.3, 0.05, 0.4, 0.1, 0.15])
        pred = np.where(g.random(400) < 0.2 * trial, g.integers(0, 5, 400), y)  # from perfect to noisy
        confusion = sleep1d.confusion_matrix(torch.from_numpy(pred), torch.from_numpy(y))
        assert confusion.sum() == 400 and confusion[2, 2] == ((y == 2) & (pred == 2)).sum()
        assert sleep1d.cohen_kappa(confusion) == pytest.approx(cohen_kappa_score(y, pred), abs=1e-12)


# ---------------------------------------------------------------- real formats, written by their own libraries

FREQS = (2.0, 5.0, 9.0, 13.0, 17.0, 21.0, 25.0)  # Hz, one per 30-s epoch, to check that stages stay aligned with signal


def tagged_night(fs, channels):
    """A night whose epoch k is a sine at FREQS[k] (plus noise), (C, T) in uV."""
    t = np.arange(int(30 * fs)) / fs
    wave = np.concatenate([np.sin(2 * np.pi * f * t) for f in FREQS])
    return 40 * wave + np.random.default_rng(0).normal(0, 2, (channels, len(wave)))


def dominant_hz(epoch):
    """Strongest frequency of a 100 Hz (C, 3000) epoch, averaged over channels."""
    spectrum = np.abs(np.fft.rfft(epoch.astype(np.float64), axis=-1)).mean(axis=0)
    return np.fft.rfftfreq(epoch.shape[-1], 1 / 100)[spectrum.argmax()]


def check_epochs(x, y, expected_stages, freqs):
    assert x.dtype == np.float16 and x.shape == (len(expected_stages), x.shape[1], 3000)
    assert y.tolist() == expected_stages
    assert [dominant_hz(e) for e in x] == pytest.approx(freqs, abs=0.1)  # each stage on its own epoch, at 100 Hz
    np.testing.assert_allclose(x.astype(np.float64).mean(axis=-1), 0, atol=1e-2)  # instance-normalised
    np.testing.assert_allclose(x.astype(np.float64).std(axis=-1), 1, atol=1e-2)


PHYSIONET_EXTRA = ("E1-M2", "ECG")  # a published record also holds EOG, EMG, respiration, SaO2 and ECG
PHYSIONET_STAGE_NAMES = ("wake", "nonrem1", "nonrem2", "nonrem3", "rem", "undefined", "nonrem2")  # one per epoch


def write_physionet_record(folder, name, arousal="hdf5"):
    """A PhysioNet/CinC 2018 training record as published: <name>.hea + <name>.mat (WFDB, written
    by wfdb's wrsamp and wfdb2mat, as the challenge's files were), 200 Hz, and <name>-arousal.mat
    (MATLAB v7.3 = HDF5 with a 512-byte MATLAB header, or MATLAB v5) with data.sleep_stages."""
    fs, names = 200, list(sleep1d.PHYSIONET_CHANNELS + PHYSIONET_EXTRA)
    folder.mkdir(parents=True)
    signal = tagged_night(fs, len(names))
    wfdb.wrsamp(
        name, fs=fs, units=["uV"] * len(names), sig_name=names, p_signal=signal.T, fmt=["16"] * len(names),
        adc_gain=[100.0] * len(names), baseline=[0] * len(names), write_dir=str(folder),
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)  # wfdb2mat writes <name with _ for ->m.hea and .mat into the working directory
        wfdb_to_mat(name)
    converted = name.replace("-", "_") + "m"
    (folder / f"{name}.dat").unlink()
    (folder / f"{converted}.mat").rename(folder / f"{name}.mat")
    (folder / f"{name}.hea").write_text((folder / f"{converted}.hea").read_text().replace(converted, name))
    (folder / f"{converted}.hea").unlink()
    T = signal.shape[1]
    per_sample = np.repeat(PHYSIONET_STAGE_NAMES, 30 * fs)
    masks = {
        k: (per_sample == k).astype(np.float64)[None]
        for k in ("wake", "nonrem1", "nonrem2", "nonrem3", "rem", "undefined")
    }
    path = folder / f"{name}-arousal.mat"
    if arousal == "hdf5":
        with h5py.File(path, "w", userblock_size=512) as f:
            stages = f.create_group("data").create_group("sleep_stages")
            for k, v in masks.items():
                stages[k] = v  # (1, T), as MATLAB stores a row vector
            f["data"]["arousals"] = np.zeros((1, T))
        with open(path, "r+b") as f:
            f.write(b"MATLAB 7.3 MAT-file, written by the test suite".ljust(116))
    else:
        scipy.io.savemat(path, {"data": {"sleep_stages": masks, "arousals": np.zeros((1, T))}})
    return folder / f"{name}.hea"


@pytest.mark.parametrize("arousal", ["hdf5", "v5"])
def test_physionet2018_record_is_read_and_staged(tmp_path, arousal):
    write_physionet_record(tmp_path / "training" / "tr03-0005", "tr03-0005", arousal)
    (refs,) = sleep1d.list_records("physionet2018", tmp_path)
    assert refs.subject == "tr03-0005" and refs.scored
    signal, fs, runs = refs.read(sleep1d.PHYSIONET_CHANNELS)
    assert signal.shape == (6, 7 * 30 * 200) and fs == 200
    x, y, _ = sleep1d.preprocess(signal, fs, runs)
    check_epochs(x, y, [0, 1, 2, 3, 4, 2], [f for f, s in zip(FREQS, PHYSIONET_STAGE_NAMES) if s != "undefined"])


EDF_ANNOTATIONS = [  # (onset s, duration s, text) as in Sleep-EDF's hypnograms; W lasts two epochs
    (0, 60, "Sleep stage W"),
    (60, 30, "Sleep stage 1"),
    (90, 30, "Sleep stage 2"),
    (120, 30, "Sleep stage 3"),
    (150, 30, "Sleep stage 4"),
    (180, 30, "Sleep stage R"),
]


def write_sleep_edf(folder, night, annotations=EDF_ANNOTATIONS + [(210, 30, "Sleep stage ?")], eeg=None):
    """A Sleep-EDF night as published: <night>0-PSG.edf (EEG Fpz-Cz, EEG Pz-Oz at 100 Hz, an EMG at
    1 Hz) and <night>H-Hypnogram.edf, an EDF+ file holding only annotations; written by pyedflib."""
    folder.mkdir(parents=True, exist_ok=True)
    eeg = tagged_night(100, 2) if eeg is None else eeg
    headers = [
        pyedflib.highlevel.make_signal_header(c, sample_frequency=100, physical_min=-100, physical_max=100)
        for c in sleep1d.SLEEP_EDF_CHANNELS
    ]
    headers.append(
        pyedflib.highlevel.make_signal_header("EMG submental", sample_frequency=1, physical_min=-100, physical_max=100)
    )
    pyedflib.highlevel.write_edf(str(folder / f"{night}0-PSG.edf"), [*eeg, np.zeros(eeg.shape[1] // 100)], headers)
    hypnogram = pyedflib.EdfWriter(str(folder / f"{night}H-Hypnogram.edf"), 0, file_type=pyedflib.FILETYPE_EDFPLUS)
    for onset, duration, text in annotations:
        hypnogram.writeAnnotation(onset, duration, text)
    hypnogram.close()
    return folder / f"{night}0-PSG.edf", folder / f"{night}H-Hypnogram.edf"


def test_sleep_edf_night_is_read_and_rk_stages_3_4_become_n3(tmp_path):
    write_sleep_edf(tmp_path / "sleep-cassette", "SC4011E")
    write_sleep_edf(tmp_path / "sleep-cassette", "SC4012E")  # the same subject's second night
    write_sleep_edf(tmp_path / "sleep-cassette", "SC4021E")
    (tmp_path / "sleep-cassette" / "SC4021EH-Hypnogram.edf").unlink()  # unscored: pretraining only
    refs = sleep1d.list_records("sleep-edf", tmp_path)
    assert [(r.subject, r.scored) for r in refs] == [("SC401", True), ("SC401", True), ("SC402", False)]
    x, y, _ = sleep1d.preprocess(*refs[0].read(sleep1d.SLEEP_EDF_CHANNELS))
    check_epochs(x, y, [0, 0, 1, 2, 3, 3, 4], FREQS)  # "Sleep stage ?" dropped
    _, y, _ = sleep1d.preprocess(*refs[2].read(sleep1d.SLEEP_EDF_CHANNELS))
    assert (y == sleep1d.UNSCORED).all() and len(y) == 7


# ---------------------------------------------------------------- bad files


def test_physionet2018_bad_files_name_the_file(tmp_path):
    header = write_physionet_record(tmp_path / "a", "tr03-0005")
    read = sleep1d.list_records("physionet2018", tmp_path)[0].read
    with pytest.raises(UserError, match=r"no channel \['Fz-Cz'\]"):
        read(("Fz-Cz",))
    arousal = header.with_name("tr03-0005-arousal.mat")
    arousal.write_bytes(b"not a MATLAB file")
    with pytest.raises(UserError, match=f"{arousal}.*data.sleep_stages"):
        read(sleep1d.PHYSIONET_CHANNELS)
    signal_file = header.with_suffix(".mat")
    signal_file.write_bytes(signal_file.read_bytes()[:5000])  # truncated
    with pytest.raises(UserError, match=str(signal_file)):
        read(sleep1d.PHYSIONET_CHANNELS)
    signal_file.unlink()
    with pytest.raises(UserError, match=f"{signal_file} not found"):
        read(sleep1d.PHYSIONET_CHANNELS)
    header.write_text("this is not a header\n")
    with pytest.raises(UserError, match=f"{header} is not a readable WFDB header"):
        read(sleep1d.PHYSIONET_CHANNELS)


def test_physionet2018_stages_of_another_length_name_the_file(tmp_path):
    header = write_physionet_record(tmp_path / "a", "tr03-0005", arousal="v5")
    arousal = header.with_name("tr03-0005-arousal.mat")
    scipy.io.savemat(arousal, {"data": {"sleep_stages": {k: np.zeros((1, 10)) for k in sleep1d.PHYSIONET_STAGES}}})
    with pytest.raises(UserError, match=f"{arousal}: sleep_stages.wake has 10 samples"):
        sleep1d.list_records("physionet2018", tmp_path)[0].read(sleep1d.PHYSIONET_CHANNELS)


def test_sleep_edf_bad_files_name_the_file(tmp_path):
    psg, hypnogram = write_sleep_edf(tmp_path, "SC4011E", annotations=[(0, 30, "Lights off")])
    read = sleep1d.list_records("sleep-edf", tmp_path)[0].read
    with pytest.raises(UserError, match=f"{hypnogram} has no sleep-stage annotations"):
        read(sleep1d.SLEEP_EDF_CHANNELS)
    with pytest.raises(UserError, match=rf"{psg} has no channel \['EEG C3'\]"):
        read(("EEG C3",))
    with pytest.raises(UserError, match=f"{psg}: channels .* different rates"):
        read(("EEG Fpz-Cz", "EMG submental"))
    psg.write_bytes(b"0       garbage")
    with pytest.raises(UserError, match=f"{psg} is not a readable EDF"):
        read(sleep1d.SLEEP_EDF_CHANNELS)


# ---------------------------------------------------------------- subject splits


def test_subject_splits_are_disjoint_and_cover_every_subject():
    refs = [
        sleep1d.RecordRef(f"s{i:02d}", f"s{i:02d}n{n}", i < 30, None) for i in range(40) for n in (1, 2)
    ]  # 2 nights each
    split = sleep1d.split_subjects(refs, finetune=10, test=10, seed=0)
    sets = {k: set(v) for k, v in split.items()}
    assert len(sets["finetune"]) == len(sets["test"]) == 10 and len(sets["pretrain"]) == 20
    assert not (
        sets["pretrain"] & sets["finetune"] or sets["pretrain"] & sets["test"] or sets["finetune"] & sets["test"]
    )
    assert set.union(*sets.values()) == {r.subject for r in refs}
    assert all(int(s[1:]) < 30 for s in sets["finetune"] | sets["test"])  # labelled sets need stages
    assert {f"s{i}" for i in range(30, 40)} <= sets["pretrain"]
    assert (
        sleep1d.split_subjects(refs, 10, 10, seed=0) == split and sleep1d.split_subjects(refs, 10, 10, seed=1) != split
    )
    with pytest.raises(UserError, match="30 subjects have sleep stages"):
        sleep1d.split_subjects(refs, finetune=25, test=10)


# ---------------------------------------------------------------- the cache of preprocessed nights

ONE_PROCESS = engine.Dist(0, 0, 1, torch.device("cpu"))


def test_nights_are_preprocessed_once_into_memory_mapped_files_that_give_the_same_epochs(tmp_path, monkeypatch):
    refs, channels = sleep1d.synthetic_records(3, 6), sleep1d.SYNTHETIC_CHANNELS[:2]
    subjects = [r.subject for r in refs]
    epochs = sleep1d.load_epochs(refs, subjects, channels, True, "nights", tmp_path, ONE_PROCESS)
    direct = [sleep1d.preprocess(*r.read(channels)) for r in refs]  # in memory, as before the cache
    expected = np.concatenate([x[y >= 0] for x, y, _ in direct])
    assert np.array_equal(np.stack([epochs[i][0].numpy() for i in range(len(epochs))]), expected)
    assert epochs.stages.tolist() == np.concatenate([y[y >= 0] for _, y, _ in direct]).tolist()
    assert all(isinstance(a, np.memmap) for a in epochs.epochs.arrays)
    monkeypatch.setattr(sleep1d, "preprocess", lambda *a: pytest.fail("a cached night was preprocessed again"))
    again = sleep1d.load_epochs(refs, subjects, channels, True, "nights", tmp_path, ONE_PROCESS)
    assert torch.equal(again[len(again) - 1][0], epochs[len(epochs) - 1][0])
    assert len(list(tmp_path.glob("*.npy"))) == 2 * 3 and not list(tmp_path.glob("*.tmp"))  # epochs and labels
    night = next(p for p in sorted(tmp_path.glob("*.npy")) if not p.name.endswith(".labels.npy"))
    night.write_bytes(b"")  # a cache damaged after it was written
    with pytest.raises(UserError, match=f"{night}, a cached night, is unreadable .*: delete it and rerun"):
        sleep1d.load_epochs(refs, subjects, channels, True, "nights", tmp_path, ONE_PROCESS)


def test_sleep_edf_wake_is_trimmed_to_30_minutes_either_side_of_sleep_by_default(tmp_path):
    hours = [(0, 7200, "Sleep stage W"), (7200, 1200, "Sleep stage 2"), (8400, 6000, "Sleep stage W")]  # 4 h, as SC
    eeg = np.random.default_rng(0).normal(0, 20, (2, 14400 * 100)).clip(-90, 90)  # within the header's range
    write_sleep_edf(tmp_path / "sc", "SC4011E", hours, eeg)
    for n in (2, 3):
        write_sleep_edf(tmp_path / "sc", f"SC40{n}1E")
    refs = sleep1d.list_records("sleep-edf", tmp_path / "sc")
    args = ("sleep-edf", tmp_path / "sc", None, 1, 1, 0, 0, 0)
    assert sleep1d.load_split(*args, None)[3]["trim_wake"] == 30  # the field's default for Sleep-EDF
    assert sleep1d.load_split(*args, -1)[3]["trim_wake"] is None
    assert sleep1d.load_split("synthetic", None, None, 1, 1, 0, 4, 4, None)[3]["trim_wake"] is None
    load = lambda trim: sleep1d.load_epochs(  # noqa: E731
        refs[:1], ["SC401"], sleep1d.SLEEP_EDF_CHANNELS, True, "nights", tmp_path / "cache", ONE_PROCESS, trim
    )
    whole, trimmed = load(None), load(30)
    assert whole.stages.tolist() == [0] * 240 + [2] * 40 + [0] * 200
    assert trimmed.stages.tolist() == [0] * 60 + [2] * 40 + [0] * 60  # 30 minutes = 60 epochs either side
    assert trimmed.starts[0] == (7200 - 1800) * 100 and trimmed.starts[-1] == (8400 + 1800 - 30) * 100
    assert torch.equal(trimmed[0][0], whole[180][0])


def test_a_nights_cache_name_changes_with_its_channels_and_files(tmp_path):
    header = write_physionet_record(tmp_path / "training" / "tr03-0005", "tr03-0005")
    (ref,) = sleep1d.list_records("physionet2018", tmp_path)
    stem = sleep1d.cache_stem(ref, sleep1d.PHYSIONET_CHANNELS)
    assert stem.startswith("tr03-0005-") and sleep1d.cache_stem(ref, sleep1d.PHYSIONET_CHANNELS) == stem
    assert sleep1d.cache_stem(ref, sleep1d.PHYSIONET_CHANNELS[:3]) != stem
    os.utime(header.with_name("tr03-0005-arousal.mat"), ns=(0, 0))  # the stages file replaced
    assert sleep1d.cache_stem(ref, sleep1d.PHYSIONET_CHANNELS) != stem


def test_the_processes_of_a_node_preprocess_a_share_each_and_wait_for_the_rest(tmp_path, monkeypatch):
    refs, channels = sleep1d.synthetic_records(5, 4), sleep1d.SYNTHETIC_CHANNELS[:1]
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    writer, written = sleep1d.write_night, []

    def write_night(ref, *args):
        written.append((threading.current_thread().name, ref.name))
        writer(ref, *args)

    monkeypatch.setattr(sleep1d, "write_night", write_night)
    stems = {}

    def rank(k):
        stems[k] = sleep1d.cache_nights(refs, channels, tmp_path, engine.Dist(k, k, 2, None), "")

    second = threading.Thread(name="rank 1", target=rank, args=(1,))
    second.start()
    rank(0)  # returns once all 5 nights are there, its 3 and rank 1's 2
    second.join()
    assert stems[0] == stems[1] and all(os.path.exists(f"{s}.npy") for s in stems[0])
    assert sorted(written) == [("MainThread", refs[k].name) for k in (0, 2, 4)] + [
        ("rank 1", refs[k].name) for k in (1, 3)
    ]


# ---------------------------------------------------------------- CLI


def invoke(*args):
    return CliRunner().invoke(sleep1d.main, [str(a) for a in args])


TINY_DATA = ["--synthetic-subjects", 6, "--synthetic-epochs", 8, "--finetune-subjects", 2, "--test-subjects", 2]
TINY_RUN = [*TINY_DATA, "--preset", "eeg_test", "--batch-size", 8, "--log-every", 1, "--warmup-epochs", 0.5]


def test_cli_pretrain_resume_then_finetune(tmp_path, monkeypatch):
    common = ["pretrain", *TINY_RUN, "--pairs", 64, "--epochs", 2]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    result = invoke(*common, "--out-dir", straight)
    assert result.exit_code == 0 and "SYNTHETIC" in result.output, result.output
    crash_after_epoch(monkeypatch, 1)
    assert invoke(*common, "--out-dir", resumed).exit_code != 0
    monkeypatch.undo()
    result = invoke(*common, "--out-dir", resumed)
    assert result.exit_code == 0 and "resuming from" in result.output
    a, b = (torch.load(d / "checkpoint.pt", weights_only=True) for d in (straight, resumed))
    assert a["epoch"] == b["epoch"] == 2 and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    rows = [json.loads(line) for line in open(straight / "log.jsonl")]
    assert [r["epoch"] for r in rows if "val_euclid" in r] == [1, 2] and rows[-1]["val_euclid_zero"] > 0

    finetune = ["finetune", *TINY_RUN, "--epochs", 1]
    result = invoke(*finetune, "--init", straight / "checkpoint.pt", "--out-dir", tmp_path / "ft")
    assert result.exit_code == 0 and "encoder from" in result.output, result.output
    ft = torch.load(tmp_path / "ft" / "checkpoint.pt", weights_only=True)
    assert not torch.equal(
        ft["model"]["encoder.blocks.1.mlp.fc2.weight"], a["model"]["encoder.blocks.1.mlp.fc2.weight"]
    )  # trained on
    confusion = torch.tensor(ft["metrics"]["confusion"])
    assert confusion.shape == (5, 5) and confusion.sum() == 2 * 8  # every epoch of the 2 held-out subjects, once
    assert (
        ft["metrics"]["kappa"] == pytest.approx(sleep1d.cohen_kappa(confusion))
        and not (tmp_path / "ft" / "checkpoint_best.pt").exists()
    )
    result = invoke(*finetune, "--init", "scratch", "--out-dir", tmp_path / "scratch")
    assert result.exit_code == 0 and "loaded" not in result.output
    result = invoke(*finetune, "--init", straight / "checkpoint.pt", "--split-seed", 1, "--out-dir", tmp_path / "leak")
    assert result.exit_code != 0 and "was pretrained on subjects" in result.output and "Traceback" not in result.output


def test_finetune_loads_the_encoder_and_adds_new_position_embeddings_and_head(tmp_path):
    assert invoke("pretrain", *TINY_RUN, "--pairs", 64, "--epochs", 1, "--out-dir", tmp_path).exit_code == 0
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    vit, state, _, _ = sleep1d.encoder_from(str(tmp_path / "checkpoint.pt"), None, sleep1d.PHYSIONET_CHANNELS, 0.1)
    model = part.Classifier(sleep1d.stager_config(vit, 0.2))
    fresh, unexpected = weights.load_encoder(model.encoder, state)
    assert sorted(fresh) == ["cls_token", "head.bias", "head.weight", "pos_embed"] and unexpected == []
    assert model.encoder.pos_embed.shape == (1, 31, 32)
    for k, v in model.encoder.state_dict().items():
        if k not in fresh:
            assert torch.equal(v, ckpt["model"][f"encoder.{k}"]), k


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data", "sleep-edf", "--data-dir", "EMPTY"], "no recordings (*-PSG.edf + *-Hypnogram.edf) found below"),
        (["--data", "physionet2018"], "--data physionet2018 needs --data-dir"),
        (
            ["--synthetic-subjects", 5],
            "5 subjects have sleep stages; --finetune-subjects 2 + --test-subjects 10 need more",
        ),
        (["--pairs", 5000], "--pairs 5000 is more than the 1600 ordered pairs of 40 patches"),
    ],
)
def test_bad_input_stops_with_a_clear_message(tmp_path, args, message):
    args = [str(tmp_path) if a == "EMPTY" else a for a in args]
    result = invoke("pretrain", "--finetune-subjects", 2, *args, "--out-dir", tmp_path / "out")
    assert result.exit_code != 0 and message in result.output and "Traceback" not in result.output


def test_finetune_without_a_checkpoint_says_which_it_needs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke("finetune", *TINY_DATA)
    assert result.exit_code != 0 and "run `python sleep1d.py pretrain` first" in result.output


# ---------------------------------------------------------------- channels and subject splits (sleep1d.py)


@pytest.mark.parametrize(
    "channels, needles",
    [
        ("", ["--channels ''", "F3-M2,F4-M1"]),
        (" , ,", ["--channels ' , ,'", "F3-M2,F4-M1"]),
        ("F3-M2,Cz", ["--channels", "['Cz']", "'O2-M1'"]),
    ],
    ids=["empty", "only commas", "a channel the data lack"],
)
def test_sleep_channels_that_name_nothing_or_what_the_data_lack_are_refused(tmp_path, channels, needles):
    result = invoke(
        "pretrain", *TINY_RUN, "--channels", channels, "--out-dir", tmp_path / "run"
    )
    assert one_line_error(result, *needles)
    assert not (tmp_path / "run").exists()


def test_sleep_edf_channels_the_files_lack_are_named_with_those_they_have(tmp_path):
    nights = [write_sleep_edf(tmp_path / "edf", night)[0] for night in ("SC4011E", "SC4021E")]
    result = invoke(
        "finetune", "--init", "scratch", "--data", "sleep-edf", "--data-dir", tmp_path / "edf", "--channels",
        "EEG Fpz-Cz,EEG Cz", "--finetune-subjects", 1, "--test-subjects", 1, "--out-dir", tmp_path / "run",
    )
    assert one_line_error(result, "['EEG Cz']", "'EEG Pz-Oz'", "--channels") and any(
        str(psg) in result.output for psg in nights
    )
    assert not (tmp_path / "run").exists()


def test_synthetic_nights_are_read_with_the_channels_asked_for():
    signal, _, _ = sleep1d.synthetic_night(0, n_epochs=2)
    picked, _, _ = sleep1d.synthetic_records(1, 2)[0].read(("C4-M1", "F3-M2"))
    assert np.array_equal(picked, signal[[3, 0]])


def test_subject_counts_that_leave_no_pretraining_subjects_say_so(tmp_path):
    result = invoke(
        "pretrain", *TINY_RUN, "--synthetic-subjects", 4, "--out-dir", tmp_path / "run"
    )
    assert one_line_error(
        result, "leaves no pretraining subjects", "--finetune-subjects", "--test-subjects", "--synthetic-subjects"
    )
    assert not (tmp_path / "run").exists()
