"""Shared test fixtures and helpers: tiny data written by the tests, tiny configs, the CLI, a crash."""

import gzip
import json
import os
import socket
import struct

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from pycocotools import mask as mask_utils

import engine
import part
import train
from vit import vit_config


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: an end-to-end run (training, two ranks, torchrun): -m 'not slow' skips")


CEILING_S = 900  # the longest a test waits for another process: a hang, never a busy machine, reaches it
LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def global_state():
    """What one test could leave behind for the next: the launcher's variables, torch's CUDA probes, TF32."""
    cuda = torch.cuda
    return {
        **{name: os.environ.get(name) for name in LAUNCH_VARS},
        "cuda": (cuda.is_available, cuda.device_count, cuda.set_device),
        "tf32": (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision),
    }


@pytest.fixture(autouse=True)
def leaves_no_state():
    """Every test ends with the process as it found it (torn down after the test's own monkeypatch)."""
    before = global_state()
    yield
    after = global_state()
    assert after == before, {k: (before[k], after[k]) for k in before if before[k] != after[k]}


def tiny_config(**overrides):
    vit = vit_config("vit_test", patch_size=4, in_chans=1)
    return part.PARTConfig(
        **{"vit": vit, "img_size": (16, 16), "num_pairs": 32, "mean": (0.5,), "std": (0.25,), **overrides}
    )


def write_idx(path, array):
    """An idx file as the MNIST format describes it, written independently of data.read_idx."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + b"".join(struct.pack(">I", s) for s in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype("uint8").tobytes())


@pytest.fixture(autouse=True, scope="session")
def eeg_cache(tmp_path_factory):
    """sleep1d.py's default cache of preprocessed nights in a folder of this test session, not the user's."""
    folder = tmp_path_factory.mktemp("xdg-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(folder))
        yield folder / "part" / "eeg"


@pytest.fixture
def fake_fmnist(tmp_path):
    """A Fashion-MNIST folder of 96 train and 32 test images with simple learnable structure."""
    g = torch.Generator().manual_seed(0)
    for prefix, n in (("train", 96), ("t10k", 32)):
        images = torch.zeros(n, 28, 28)
        images[:, 6:22, 6:22] = torch.rand(n, 1, 1, generator=g) * 200 + 55  # a bright square on black
        images += torch.rand(n, 28, 28, generator=g) * 30
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", images.clamp(0, 255).numpy())
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", torch.randint(0, 10, (n,), generator=g).numpy())
    return tmp_path


def fmnist_flags(data_dir, val_from_train=0, train_subset=0):
    """train.py's data flags for a Fashion-MNIST folder, as load_sets takes them."""
    return {
        "data_name": "fashion-mnist", "data_dir": data_dir, "img_size": None, "in_chans": None, "mean": (), "std": (),
        "train_subset": train_subset, "val_from_train": val_from_train, "skip_bad_files": False,
    }


TINY_RUN = ["--preset", "vit_test", "--pairs", "16", "--batch-size", "32", "--log-every", "1", "--warmup-epochs", "0.5"]


def tiny_run(method):
    """TINY_RUN for `method`: --pairs is PART's alone."""
    return TINY_RUN if method == "part" else [a for a in TINY_RUN if a not in ("--pairs", "16")]


def invoke(*args):
    return CliRunner().invoke(train.main, [str(a) for a in args])


def crash_after_epoch(monkeypatch, epoch):
    """The next run dies at the end of the epoch after `epoch`, before that checkpoint is written."""
    save = engine.save_checkpoint

    def save_or_crash(path, state):
        if state["epoch"] > epoch:
            raise KeyboardInterrupt
        save(path, state)

    monkeypatch.setattr(engine, "save_checkpoint", save_or_crash)


def square_mask(H, W, x0, y0, x1, y1):
    m = np.zeros((H, W), np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


def write_coco(root, masks=True):
    """A COCO folder written without detect.py: 64 x 48 grayscale images with bright squares,
    categories 3 and 7 (labels 1 and 2), polygon and compressed-RLE masks (or none), and in each
    split one image without objects."""
    H, W = 48, 64
    objects = [(4, 4, 20, 20), (30, 10, 50, 30), (10, 26, 28, 44)]  # x0, y0, x1, y1
    for split, n in (("train2017", 4), ("val2017", 2)):
        (root / split).mkdir(parents=True)
        images, anns = [], []
        for i in range(n):
            pixels = np.full((H, W), 20, np.uint8)
            placed = objects[: i % 3 + 1] if i else []  # image 0 is empty
            for k, (x0, y0, x1, y1) in enumerate(placed):
                pixels[y0:y1, x0:x1] = 200
                ann = {
                    "id": len(anns) + 1,
                    "image_id": i + 1,
                    "category_id": (3, 7)[k % 2],
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": (x1 - x0) * (y1 - y0),
                    "iscrowd": 0,
                }
                if masks and k % 2 == 0:  # a polygon around the square's pixels
                    ann["segmentation"] = [[x0, y0, x1, y0, x1, y1, x0, y1]]
                elif masks:
                    rle = mask_utils.encode(np.asfortranarray(square_mask(H, W, x0, y0, x1, y1)))
                    ann["segmentation"] = {"size": [H, W], "counts": rle["counts"].decode("ascii")}
                anns.append(ann)
            Image.fromarray(pixels).save(root / split / f"img{i}.png")
            images.append({"id": i + 1, "file_name": f"img{i}.png", "height": H, "width": W})
        categories = [{"id": 3, "name": "a"}, {"id": 7, "name": "b"}]
        (root / "annotations").mkdir(exist_ok=True)
        (root / "annotations" / f"instances_{split}.json").write_text(
            json.dumps({"images": images, "annotations": anns, "categories": categories})
        )
    return root


def one_line_error(result, *needles):
    """The command stopped with exit code 1 and a single 'Error: ...' line holding every needle, no traceback."""
    lines = [line for line in result.output.splitlines() if line.startswith("Error")]
    return (
        result.exit_code == 1
        and "Traceback" not in result.output
        and len(lines) == 1
        and all(str(n) in lines[0] for n in needles)
    )


def photo_folder(root, n, size=32, corrupt=None):
    """n small noise JPEGs (and one truncated file named `corrupt`) below root."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / f"img_{i:03d}.jpg")
    if corrupt:
        good = (root / "img_000.jpg").read_bytes()
        (root / corrupt).write_bytes(good[: len(good) // 3])  # a JPEG cut short
    return root


TINY_IMAGES = [
    "--data",
    "images",
    "--img-size",
    32,
    "--patch-size",
    8,
    "--preset",
    "vit_test",
    "--pairs",
    16,
    "--log-every",
    1,
]


def refused(call, *needles):
    """call() raises engine.UserError with a one-line message holding every needle."""
    with pytest.raises(engine.UserError) as error:
        call()
    message = str(error.value)
    assert "\n" not in message and all(str(n) in message for n in needles), message


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
