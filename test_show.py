"""Tests for `train.py show`, the numbers behind section 5.1's figures, and `train.py plot`."""

import pytest
import torch
import torch.nn as nn
from PIL import Image

import figures
import part
from conftest import TINY_RUN, invoke, tiny_config

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class OracleHead(nn.Module):
    """A stub relative head whose `fast`, the form PART and figures call, answers every pair with the ground truth
    of the boxes it was given."""

    def __init__(self, boxes, scale):
        super().__init__()
        self.boxes, self.scale = boxes, scale

    def fast(self, x, pairs):
        return part.relative_targets(self.boxes, pairs, self.scale)


def sampled(sampler, seed=0):
    """A tiny PART, one random image's patches and boxes, and its all-pair predictions' inputs."""
    torch.manual_seed(seed)
    model = part.PART(tiny_config(sampler=sampler)).eval()
    image = torch.randint(0, 256, (1, 1, 16, 16), dtype=torch.uint8)
    patches, boxes = model.sample(image)
    return model, patches, boxes


def numbers(model, patches, boxes):
    pred = figures.predict_all_pairs(model, patches, chunk=37)[0]  # a chunk that does not divide N*N = 256
    placed = figures.placed_boxes(boxes[0], pred)
    return pred, placed, figures.placement_errors(boxes[0], placed), figures.symmetry_scores(pred)


@pytest.mark.parametrize("sampler", part.SAMPLERS)
def test_ground_truth_head_reconstructs_exactly_and_is_symmetric(sampler):
    model, patches, boxes = sampled(sampler)
    model.relative = OracleHead(boxes, model.scale)
    pred, placed, errors, symmetry = numbers(model, patches, boxes)
    assert errors.max() < 1e-4  # every reference puts every target exactly on its true centre
    torch.testing.assert_close(placed, boxes[0][None].expand_as(placed))  # sizes too, with offgrid-scale
    assert figures.patch_uncertainty(placed).max() < 1e-4
    assert set(symmetry) == set(figures.OUTPUT_NAMES[: pred.shape[-1]])
    assert all(abs(v - 1) < 1e-6 for v in symmetry.values()), symmetry
    assert all(
        abs(v - 1) < 1e-6 for v in figures.correlations(pred, figures.all_pair_targets(boxes[0], model.scale)).values()
    )


@pytest.mark.parametrize("sampler", ["offgrid", "offgrid-scale"])
def test_random_model_neither_reconstructs_nor_is_symmetric(sampler):
    model, patches, boxes = sampled(sampler)
    pred, placed, errors, symmetry = numbers(model, patches, boxes)
    assert figures.off_diagonal(errors).mean() > 1.0  # pixels, on a 16 x 16 image
    assert figures.patch_uncertainty(placed).max() > 0
    assert all(v < 0.9 for v in symmetry.values()), symmetry


@pytest.mark.parametrize("head", part.HEADS)
def test_all_pairs_in_chunks_match_predict(head):
    torch.manual_seed(0)
    model = part.PART(tiny_config(head=head)).eval()
    patches, _ = model.sample(torch.randint(0, 256, (2, 1, 16, 16), dtype=torch.uint8))
    N = patches.shape[1]
    pairs = figures.all_pairs(N).expand(2, -1, -1)
    with torch.no_grad():
        expected = model.predict(patches, pairs).reshape(2, N, N, -1)
    torch.testing.assert_close(figures.predict_all_pairs(model, patches, chunk=50), expected)
    assert pairs[0, 3 * N + 5].tolist() == [3, 5]  # row i*N + j is the pair (reference i, target j)


def test_raster_order_and_targets_of_a_known_layout():
    # a 2 x 2 grid of 4 px patches given in scrambled order
    boxes = torch.tensor([[4.0, 4, 8, 8], [0, 0, 4, 4], [0, 4, 4, 8], [4, 0, 8, 4]])
    assert figures.raster_order(boxes, 4).tolist() == [1, 3, 2, 0]
    truth = figures.all_pair_targets(boxes)
    assert truth[1, 0].tolist() == [1.0, 1.0] and truth[0, 1].tolist() == [-1.0, -1.0]


def save_checkpoint(tmp_path, sampler="offgrid"):
    torch.manual_seed(0)
    cfg = tiny_config(sampler=sampler)
    path = tmp_path / f"{sampler}.pt"
    torch.save(
        {
            "model": part.PART(cfg).state_dict(),
            "config": {"kind": "part", "data": "fashion-mnist", "model": cfg.to_dict()},
        },
        path,
    )
    return path


def assert_png(path, cols, rows):
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.size == (round(cols * figures.PANEL * figures.DPI), round(rows * figures.PANEL * figures.DPI))


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["offgrid", "offgrid-scale"])
def test_show_writes_the_four_figures_from_an_image_file(tmp_path, sampler):
    photo = tmp_path / "photo.jpg"
    Image.new("RGB", (40, 30), "orange").save(photo)  # RGB and another size: converted to 1 x 16 x 16
    result = invoke(
        "show", "--ckpt", save_checkpoint(tmp_path, sampler), "--image", photo, "--out-dir", tmp_path / "show"
    )
    assert result.exit_code == 0, result.output
    assert "mean placement error" in result.output and "negative symmetry" in result.output
    assert ("dw" in result.output) == (sampler == "offgrid-scale")
    assert_png(tmp_path / "show/photo_reconstruction.png", 3, 1)
    assert_png(tmp_path / "show/photo_uncertainty.png", 2, 1)
    assert_png(tmp_path / "show/photo_symmetry.png", 4, 4 if sampler == "offgrid-scale" else 2)
    assert_png(tmp_path / "show/photo_errors.png", 1, 1)


def test_show_takes_held_out_images_of_the_checkpoints_dataset(tmp_path, fake_fmnist):
    result = invoke(
        "show", "--ckpt", save_checkpoint(tmp_path), "--data-dir", fake_fmnist, "--index", 3, "--target", 5,
        "--out-dir", tmp_path,
    )
    assert result.exit_code == 0, result.output
    assert "#5 " in result.output
    assert_png(tmp_path / "fashion-mnist_val3_uncertainty.png", 2, 1)


@pytest.mark.parametrize(
    "make, args, message",
    [
        (lambda p: p.write_text("not an image"), ["--image", "{file}"], "is not a readable image"),
        (lambda p: None, ["--image", "{file}"], "is not a readable image"),  # missing
        (
            lambda p: torch.save({"weights": torch.zeros(1)}, p),
            ["--ckpt", "{file}"],
            "expected a PART 2D pretraining checkpoint",
        ),
        (lambda p: None, ["--ref", "99"], "--ref 99 is not a patch"),
    ],
)
def test_show_stops_with_a_clear_message(tmp_path, make, args, message):
    file = tmp_path / "file.png"
    make(file)
    args = [a.format(file=file) for a in args]
    ckpt = [] if "--ckpt" in args else ["--ckpt", save_checkpoint(tmp_path)]
    image = [] if "--image" in args else ["--image", tmp_path / "img.png"]
    Image.new("L", (16, 16)).save(tmp_path / "img.png")
    result = invoke("show", *ckpt, *image, *args, "--out-dir", tmp_path)
    assert result.exit_code == 1 and message in result.output, result.output


def test_plot_command_draws_two_runs_and_names_a_folder_without_a_log(fake_fmnist, tmp_path):
    for seed in (0, 1):
        assert (
            invoke(
                "pretrain", "--data-dir", fake_fmnist, *TINY_RUN, "--seed", seed, "--log-every", 1, "--out-dir",
                tmp_path / f"run{seed}",
            ).exit_code
            == 0
        )
    result = invoke("plot", tmp_path / "run0", tmp_path / "run1", "--out", tmp_path / "curves.png")
    assert result.exit_code == 0 and "2 run(s)" in result.output, result.output
    with Image.open(tmp_path / "curves.png") as png:
        assert png.width > 600
    (tmp_path / "empty").mkdir()
    result = invoke("plot", tmp_path / "empty", "--out", tmp_path / "none.png")
    assert result.exit_code == 1 and "log.jsonl" in result.output and "empty" in result.output, result.output
