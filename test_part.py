"""Tests for PART, on CPU with tiny configurations: `pytest -q`."""

import gzip
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from torchvision.transforms import v2
import torch.distributed as dist
import torch.multiprocessing as mp

import baselines
import data
import engine
import part
import train
import weights
from conftest import TINY_RUN, crash_after_epoch, fmnist_flags, free_port, invoke, tiny_config, write_idx
from vit import VisionTransformer, _init_weights, patchify, resize_pos_embed, vit_config

# ---------------------------------------------------------------- sampler and targets


def test_targets_match_hand_computation():
    # boxes as x0, y0, x1, y1 with non-integer positions, all 4x4 (offgrid)
    boxes = torch.tensor([[[0.0, 0.0, 4.0, 4.0], [2.5, 1.25, 6.5, 5.25], [10.75, 3.0, 14.75, 7.0]]])
    pairs = torch.tensor([[[0, 1], [1, 2], [2, 0], [1, 1]]])
    # centres (2, 2), (4.5, 3.25), (12.75, 5); width = height = 4
    expected = torch.tensor([[[2.5 / 4, 1.25 / 4], [8.25 / 4, 1.75 / 4], [-10.75 / 4, -3 / 4], [0, 0]]])
    torch.testing.assert_close(part.relative_targets(boxes, pairs), expected)


def test_scale_targets_match_hand_computation():
    boxes = torch.tensor([[[1.0, 2.0, 3.0, 8.0], [4.5, 0.5, 12.5, 4.5]]])  # 2x6 at (2, 5); 8x4 at (8.5, 2.5)
    pairs = torch.tensor([[[0, 1], [1, 0]]])
    expected = torch.tensor([[[6.5 / 2, -2.5 / 6, 8 / 2, 4 / 6], [-6.5 / 8, 2.5 / 4, 2 / 8, 6 / 4]]])
    torch.testing.assert_close(part.relative_targets(boxes, pairs, scale=True), expected)


def test_targets_stay_fractional():
    boxes = torch.tensor([[[0.0, 0.0, 4.0, 4.0], [0.3, 0.0, 4.3, 4.0]]])
    target = part.relative_targets(boxes, torch.tensor([[[0, 1]]]))
    assert target.dtype == torch.float32 and target[0, 0, 0].item() == pytest.approx(0.3 / 4)


@pytest.mark.parametrize("mode", part.SAMPLERS)
def test_sampled_boxes_inside_image(mode):
    H, W, P = 24, 32, 4
    boxes = part.sample_boxes(64, (H, W), P, (H // P) * (W // P), mode)
    x0, y0, x1, y1 = boxes.unbind(-1)
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x1 <= W).all() and (y1 <= H).all()
    w, h = x1 - x0, y1 - y0
    if mode == "offgrid-scale":
        assert (w >= P / 2).all() and (w <= 2 * P).all() and (h >= P / 2).all() and (h <= 2 * P).all()
        assert (w - h).abs().max() > 1  # width and height are drawn independently
    else:
        torch.testing.assert_close(w, torch.full_like(w, P))
    if mode == "offgrid":
        assert (x0 != x0.round()).float().mean() > 0.99  # continuous positions, not on a grid
    if mode == "grid":
        canonical = part.grid_boxes((H, W), P)
        for b in boxes:  # each image: a permutation of the grid
            assert sorted(map(tuple, b.tolist())) == sorted(map(tuple, canonical.tolist()))
        assert not torch.equal(boxes[0], canonical)


def test_crop_is_exact_on_integer_boxes_and_interpolates_between():
    ramp = torch.arange(16.0).repeat(16, 1)[None, None]  # (1, 1, 16, 16): pixel value = x
    boxes = torch.tensor([[[4.0, 8.0, 8.0, 12.0], [4.5, 8.0, 8.5, 12.0]]])
    patches = part.crop_patches(ramp, boxes, 4)  # (1, 2, 1, 4, 4)
    torch.testing.assert_close(patches[0, 0, 0], ramp[0, 0, 8:12, 4:8])
    torch.testing.assert_close(patches[0, 1, 0], ramp[0, 0, 8:12, 4:8] + 0.5)


def bilinear_at(image, xs, ys):
    """Bilinear interpolation of one (H, W) image at float pixel-index coordinates, written out."""
    x0, y0 = xs.floor().long(), ys.floor().long()
    x1, y1 = (x0 + 1).clamp(max=image.shape[1] - 1), (y0 + 1).clamp(max=image.shape[0] - 1)
    fx, fy = xs - x0, ys - y0
    top = image[y0, x0] * (1 - fx) + image[y0, x1] * fx
    bottom = image[y1, x0] * (1 - fx) + image[y1, x1] * fx
    return top * (1 - fy) + bottom * fy


@pytest.mark.parametrize("H, W, P", [(28, 28, 4), (32, 32, 4), (224, 224, 16)])
def test_offgrid_crops_are_one_bilinear_sample_per_pixel(H, W, P):
    torch.manual_seed(0)
    image = torch.rand(1, 1, H, W, dtype=torch.float64)
    boxes = part.sample_boxes(1, (H, W), P, 1000, "offgrid").double()  # (1, 1000, 4)
    boxes[0, :4, :2] = torch.tensor(
        [[0.0, 0.0], [W - P, H - P], [0.0, H - P], [W - P, 0.0]], dtype=torch.float64
    )  # the corners
    boxes[0, :4, 2:] = boxes[0, :4, :2] + P
    patches = part.crop_patches(image, boxes, P)[0, :, 0]  # (1000, P, P)
    steps = torch.arange(P, dtype=torch.float64) + 0.5
    for box, patch in zip(
        boxes[0], patches
    ):  # crop pixel i: the centre of the box's i-th 1/P, in pixel-index coordinates
        xs, ys = box[0] + steps * (box[2] - box[0]) / P - 0.5, box[1] + steps * (box[3] - box[1]) / P - 0.5
        ys, xs = torch.meshgrid(ys, xs, indexing="ij")
        assert (patch - bilinear_at(image[0, 0], xs, ys)).abs().max() <= 1e-6


def test_patchify_matches_grid_crops():
    images = torch.rand(2, 3, 8, 12)
    boxes = part.grid_boxes((8, 12), 4).expand(2, -1, -1)
    torch.testing.assert_close(patchify(images, 4), part.crop_patches(images, boxes, 4))


def test_encode_grid_gives_the_encoders_tokens_of_the_normalised_grid_crops():
    model = part.PART(tiny_config()).eval()
    images = torch.randint(0, 256, (2, 1, 16, 16), dtype=torch.uint8)
    crops = part.crop_patches((images.float() / 255 - 0.5) / 0.25, part.grid_boxes((16, 16), 4).expand(2, -1, -1), 4)
    torch.testing.assert_close(
        part.encode_grid(model.encoder, model.normalize, images), model.encoder.forward_features(crops)
    )


def test_pairs_are_distinct_and_bounded():
    pairs = part.sample_pairs(8, 5, 25)  # all ordered pairs of 5 patches
    assert pairs.shape == (8, 25, 2) and pairs.min() >= 0 and pairs.max() < 5
    for p in pairs:
        assert len(set(map(tuple, p.tolist()))) == 25
    with pytest.raises(engine.UserError, match="more than the 25"):
        part.sample_pairs(8, 5, 26)


# ---------------------------------------------------------------- model


def test_vit_without_pos_embed_is_permutation_equivariant():
    vit = VisionTransformer(vit_config("vit_test", patch_size=4, in_chans=1)).eval()
    patches = torch.randn(2, 10, 1, 4, 4)
    perm = torch.randperm(10)
    torch.testing.assert_close(vit.forward_features(patches)[:, perm], vit.forward_features(patches[:, perm]))
    with_pos = VisionTransformer(vit_config("vit_test", patch_size=4, in_chans=1, pos_grid=(2, 5))).eval()
    assert not torch.allclose(with_pos.forward_features(patches)[:, perm], with_pos.forward_features(patches[:, perm]))


def test_cross_attention_head_is_the_papers_equation_written_out():
    torch.manual_seed(0)
    head = part.CrossAttentionHead(8, 2)
    x, pairs = torch.randn(2, 5, 8), part.sample_pairs(2, 5, 7)
    q = torch.stack(
        [
            torch.stack([head.query.weight @ torch.cat([x[b, i], x[b, j]]) + head.query.bias for i, j in p])
            for b, p in enumerate(pairs)
        ]
    )  # (2, 7, 8): X_hat = Linear(concat(X'_S0, X'_S1)), pair by pair
    theta = torch.softmax(q @ x.transpose(1, 2) / math.sqrt(8), dim=-1) @ x  # softmax(X_hat X'^T / sqrt(d)) X'
    expected = theta @ head.regressor.weight.T + head.regressor.bias  # then the regressor
    for form in (head, head.fast):  # the paper's form, and the rearranged one PART trains with
        torch.testing.assert_close(form(x, pairs), expected)


def test_pairwise_head_has_the_papers_parameter_count():
    head = part.PairwiseMlpHead(8, 2)
    assert sum(p.numel() for p in head.parameters()) == 2 * (2 * 8) + 2  # 2*d*2 weights and 2 biases
    N, D = 6, 8
    assert sum(p.numel() for p in part.MlpHead(D, N, 2).parameters()) == N * D * N * N * 2 + N * N * 2


@pytest.mark.parametrize("head_cls", [part.CrossAttentionHead, part.PairwiseMlpHead])
@pytest.mark.parametrize("K", [5, 40])  # fewer and more pairs than the N = 9 tokens
def test_fast_heads_equal_the_papers_per_pair_form_in_value_and_gradient(head_cls, K):
    torch.manual_seed(0)
    head = head_cls(16, 4)
    head.apply(_init_weights)
    x, pairs = torch.randn(3, 9, 16, requires_grad=True), part.sample_pairs(3, 9, K)
    grads = []
    for forward in (head.fast, head.forward):
        out = forward(x, pairs)
        weights = torch.randn_like(out, generator=torch.Generator().manual_seed(1))
        grads.append((out, *torch.autograd.grad((out * weights).sum(), [x, *head.parameters()])))
    for fast, slow in zip(*grads):
        assert ((fast - slow).norm() / slow.norm()).item() <= 1e-5


def test_table5_metrics_match_a_hand_computation():
    pred = torch.tensor([[[1.0, 2.0], [0.0, -1.0], [3.0, 0.5]]])
    target = torch.tensor([[[0.0, 0.0], [1.0, 1.0], [3.0, 2.5]]])
    _, m = part.relative_loss(pred, target)
    # errors (1, 2), (-1, -2), (0, -2)
    assert m["mse_x"].item() == pytest.approx((1 + 1 + 0) / 3) and m["mse_y"].item() == pytest.approx((4 + 4 + 4) / 3)
    assert m["mae_x"].item() == pytest.approx(2 / 3) and m["mae_y"].item() == pytest.approx(2)
    assert m["euclid"].item() == pytest.approx((5**0.5 + 5**0.5 + 2) / 3)
    assert m["euclid_zero"].item() == pytest.approx((0 + 2**0.5 + (9 + 6.25) ** 0.5) / 3)


def test_table5_metrics_of_a_1d_scale_target_read_its_one_shift_not_the_size_ratio():
    pred = torch.tensor([[[1.0, 5.0], [3.0, 0.0]]])  # (dt, size ratio) per pair
    target = torch.tensor([[[0.0, 1.0], [1.0, 2.0]]])
    _, m = part.relative_loss(pred, target, d=1)
    assert "mse_y" not in m and m["mse_x"].item() == pytest.approx((1 + 4) / 2)  # the shift alone: errors 1, 2
    assert m["euclid"].item() == pytest.approx(1.5) and m["euclid_zero"].item() == pytest.approx(0.5)


def test_loss_is_zero_on_perfect_prediction():
    boxes = part.sample_boxes(3, (16, 16), 4, 16, "offgrid-scale")
    target = part.relative_targets(boxes, part.sample_pairs(3, 16, 20), scale=True)
    loss, metrics = part.relative_loss(target.clone(), target)
    assert loss.item() == 0 and metrics["euclid"].item() == 0 and metrics["mae_x"].item() == 0
    # the trivial baseline: mean length of the translation
    assert metrics["euclid_zero"].item() == pytest.approx(target[..., :2].norm(dim=-1).mean().item())
    loss, _ = part.relative_loss(target + 0.5, target)
    assert loss.item() == pytest.approx(0.25)


@pytest.mark.slow
@pytest.mark.parametrize("head", part.HEADS)
@pytest.mark.parametrize("sampler", ["offgrid", "offgrid-scale"])
def test_a_few_steps_lower_the_loss(head, sampler):
    torch.manual_seed(0)
    model = part.PART(tiny_config(head=head, sampler=sampler))
    images = torch.rand(8, 1, 16, 16)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(100):
        torch.manual_seed(1)  # the same boxes and pairs each step: a fixed batch
        loss, _ = model(images)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_every_parameter_gets_a_gradient():
    for head in part.HEADS:
        model = part.PART(tiny_config(head=head))
        model(torch.rand(2, 1, 16, 16))[0].backward()
        assert [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0] == []


def test_grad_checkpointing_recomputes_and_gives_the_same_gradients():
    torch.manual_seed(0)
    vit = VisionTransformer(vit_config("vit_test", patch_size=4, in_chans=1, drop_path=0.5)).train()
    patches = torch.randn(3, 9, 1, 4, 4)
    calls, forward = [], vit.blocks[0].forward
    vit.blocks[0].forward = lambda *args: calls.append(1) or forward(*args)  # counts runs, recomputation included
    grads = []
    for checkpointed in (False, True):
        vit.grad_checkpointing, calls[:] = checkpointed, []
        vit.zero_grad()
        torch.manual_seed(1)  # the same drop-path draws in both runs
        vit.forward_features(patches).square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in vit.named_parameters()})
        assert len(calls) == (2 if checkpointed else 1)  # the checkpointed block ran again in backward
    torch.testing.assert_close(grads[0], grads[1])


def test_grad_ckpt_flag_reaches_the_encoder_and_changes_no_result(fake_fmnist, tmp_path, monkeypatch):
    common = ["pretrain", "--data-dir", fake_fmnist, *TINY_RUN, "--epochs", 1]
    assert invoke(*common, "--out-dir", tmp_path / "plain").exit_code == 0
    calls = []
    monkeypatch.setattr("vit.checkpoint", lambda *a, **k: calls.append(1) or torch.utils.checkpoint.checkpoint(*a, **k))
    assert invoke(*common, "--grad-ckpt", "--out-dir", tmp_path / "ckpt").exit_code == 0
    a, b = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=True)["model"] for d in ("plain", "ckpt"))
    assert calls and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_config_errors_are_clear():
    with pytest.raises(engine.UserError, match="--patch-size 5 must divide"):
        tiny_config(vit=vit_config("vit_test", patch_size=5, in_chans=1))
    with pytest.raises(engine.UserError, match="--pairs 300 is more than the 256"):
        tiny_config(num_pairs=300)


def test_encoder_loads_into_timm_with_the_same_features():
    timm = pytest.importorskip("timm")
    model = part.PART(tiny_config())
    state = weights.encoder_state_dict({"model": model.state_dict()})
    ref = timm.models.vision_transformer.VisionTransformer(
        img_size=16, patch_size=4, in_chans=1, num_classes=0, embed_dim=32, depth=2, num_heads=2, class_token=False,
        pos_embed="none", global_pool="avg", fc_norm=False,
    )
    ref.load_state_dict(state)  # strict: every key matches by name and shape
    images = torch.rand(2, 1, 16, 16)
    ours = model.encoder.eval().forward_features(patchify(images, 4))
    torch.testing.assert_close(ours, ref.eval().forward_features(images), atol=1e-5, rtol=1e-4)


def test_resize_pos_embed_keeps_prefix_and_is_identity_on_same_grid():
    pos = torch.randn(1, 1 + 12, 8)
    assert resize_pos_embed(pos, (3, 4), (3, 4), 1) is pos
    big = resize_pos_embed(pos, (3, 4), (6, 2), 1)
    assert big.shape == (1, 13, 8) and torch.equal(big[:, :1], pos[:, :1])


# ---------------------------------------------------------------- data


def test_idx_reader_round_trips_and_rejects_garbage(tmp_path):
    array = torch.randint(0, 256, (5, 28, 28)).numpy()
    write_idx(tmp_path / "x.gz", array)
    assert (data.read_idx(tmp_path / "x.gz") == array).all()
    with gzip.open(tmp_path / "bad.gz", "wb") as f:
        f.write(b"\x12\x34\x56\x78garbage")
    with pytest.raises(engine.UserError, match="bad.gz is not an idx file"):
        data.read_idx(tmp_path / "bad.gz")


def test_image_folder_of_unlabelled_files(tmp_path):
    from PIL import Image

    for i in range(4):
        Image.new("RGB", (40, 30), (i * 40, 0, 0)).save(tmp_path / f"{i}.png")
    info = data.data_info("images", img_size=16)
    ds = data.build_dataset("images", str(tmp_path), "train", info, data.pretrain_transform(info, "images"))
    x, y = ds[0]
    assert len(ds) == 3 and x.shape == (3, 16, 16) and x.dtype == torch.uint8 and y == -1


@pytest.mark.parametrize(
    "name, folder, files, label_key",
    [
        ("cifar10", "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], b"labels"),
        ("cifar100", "cifar-100-python", ["train", "test"], b"fine_labels"),
    ],
)
def test_cifar_python_pickles_load_in_channel_row_column_order(tmp_path, name, folder, files, label_key):
    import pickle

    (tmp_path / folder).mkdir()
    rows = {}
    for i, file in enumerate(files):  # the published layout: each row is 1024 red, then green, then blue values
        rows[file] = torch.randint(0, 256, (3, 3072), dtype=torch.uint8).numpy()
        batch = {b"data": rows[file], label_key: [i, i + 1, i + 2], b"coarse_labels": [0, 0, 0]}
        with open(tmp_path / folder / file, "wb") as f:
            pickle.dump(batch, f)
    info = data.data_info(name)
    train_set = data.build_dataset(name, str(tmp_path), "train", info, None)
    val_set = data.build_dataset(name, str(tmp_path), "val", info, None)
    assert len(train_set) == 3 * (len(files) - 1) and len(val_set) == 3
    x, y = val_set[1]
    red, green, blue = (rows[files[-1]][1, c * 1024 : (c + 1) * 1024].reshape(32, 32) for c in range(3))
    assert x.shape == (3, 32, 32) and y == len(files)
    assert (x[0].numpy() == red).all() and (x[1].numpy() == green).all() and (x[2, 5, 7] == blue[5, 7])


def test_finetune_on_an_image_folder_tree_at_another_size(tmp_path):
    from PIL import Image

    for split, n in (("train", 8), ("val", 4)):
        for label, colour in enumerate(("cat", "dog")):
            (tmp_path / split / colour).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (30 + i, 24), (200 * label, 40, 20 * i)).save(tmp_path / split / colour / f"{i}.jpg")
    out = tmp_path / "ft"
    result = invoke(
        "finetune", "--data", "imagefolder", "--data-dir", tmp_path, "--img-size", 24, "--init", "scratch", "--preset",
        "vit_test", "--patch-size", 8, "--batch-size", 4, "--epochs", 1, "--out-dir", out,
    )
    assert result.exit_code == 0, result.output
    model = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
    assert model["encoder.pos_embed"].shape == (1, 1 + 3 * 3, 32) and model["encoder.head.weight"].shape == (2, 32)
    accuracies = [json.loads(line)["val_acc"] for line in open(out / "log.jsonl") if "val_acc" in line]
    assert len(accuracies) == 1 and accuracies[0] in (
        0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1,
    )  # of 8 val images
    result = invoke(
        "finetune", "--data", "imagefolder", "--data-dir", tmp_path / "train", "--init", "scratch", "--out-dir", out
    )
    assert result.exit_code != 0 and "train/train not found" in result.output and "Traceback" not in result.output


# ---------------------------------------------------------------- training CLI


def test_pretrain_resume_continues_exactly(fake_fmnist, tmp_path, monkeypatch):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = ["pretrain", "--data-dir", fake_fmnist, *TINY_RUN, "--img-size", 16, "--epochs", 2]
    assert invoke(*common, "--out-dir", straight).exit_code == 0
    crash_after_epoch(monkeypatch, 1)
    assert invoke(*common, "--out-dir", resumed).exit_code != 0
    first = torch.load(resumed / "checkpoint.pt", weights_only=True)
    monkeypatch.undo()
    result = invoke(*common, "--out-dir", resumed)
    assert result.exit_code == 0 and "resuming from" in result.output
    a = torch.load(straight / "checkpoint.pt", weights_only=True)
    b = torch.load(resumed / "checkpoint.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2 and first["epoch"] == 1
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=0)
    assert not torch.equal(first["model"]["encoder.norm.weight"], b["model"]["encoder.norm.weight"])
    assert not list(resumed.glob("checkpoint.pt*.tmp"))
    rows = [line for line in open(resumed / "log.jsonl")]
    assert any('"val_euclid"' in r for r in rows) and any('"img_per_s"' in r for r in rows)


def test_checkpoint_round_trips_into_a_fresh_model(fake_fmnist, tmp_path):
    assert invoke("pretrain", "--data-dir", fake_fmnist, *TINY_RUN, "--epochs", 1, "--out-dir", tmp_path).exit_code == 0
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)  # plain types only
    model = part.PART(part.PARTConfig(**ckpt["config"]["model"]))
    model.load_state_dict(ckpt["model"])
    torch.testing.assert_close(model.state_dict(), ckpt["model"])
    assert invoke("export", "--ckpt", tmp_path / "checkpoint.pt", "--out-dir", tmp_path / "export").exit_code == 0
    exported = torch.load(tmp_path / "export" / "encoder.pt", weights_only=True)
    assert not any(k.startswith(("relative.", "encoder.")) for k in exported)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data-dir", "/no/such/dir"], "--data-dir /no/such/dir is not a folder"),
        (["--patch-size", 5], "--patch-size 5 must divide the input size 28x28"),
        (["--pairs", 100000], "--pairs 100000 is more than the 2401 ordered pairs"),
        (["--data", "cifar10", "--data-dir", "."], "cifar-10-batches-py/data_batch_1 not found"),
    ],
)
def test_bad_input_stops_with_a_clear_message(fake_fmnist, tmp_path, args, message):
    args = ["--data-dir", fake_fmnist, *args] if "--data-dir" not in args else args
    result = invoke("pretrain", *args, "--out-dir", tmp_path)
    assert result.exit_code != 0 and message in result.output
    assert "Traceback" not in result.output


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(fake_fmnist, tmp_path):
    common = ["pretrain", "--data-dir", fake_fmnist, *TINY_RUN, "--out-dir", tmp_path]
    assert invoke(*common, "--epochs", 1).exit_code == 0
    good = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    result = invoke(*common, "--epochs", 2, "--blr", "1e30", "--resume-changed")
    assert result.exit_code != 0 and "loss is nan" in result.output.lower()
    kept = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert kept["epoch"] == 1 and torch.equal(
        kept["model"]["encoder.norm.weight"], good["model"]["encoder.norm.weight"]
    )


def tiny_model(kind):
    """A pretraining model (PART, MAE, DropPos, MP3), the finetuning classifier or the linear probe (its BatchNorm's
    running statistics are buffers every rank must agree on), at the same tiny size, seeded."""
    torch.manual_seed(0)
    if kind in baselines.METHODS:
        cfg = baselines.pretext_config(
            kind, **{k: v for k, v in tiny_config().to_dict().items() if k != "vit"}, vit=tiny_config().vit
        )
        return baselines.pretext_model(kind, cfg)
    return part.Classifier(
        part.ClassifierConfig(vit=tiny_config().vit, img_size=(16, 16), num_classes=4, mean=(0.5,), std=(0.25,),
                              linear_probe=kind == "probe")
    )


def _ddp_worker(rank, world, port, out_dir, kind):
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    dd = engine.setup_distributed()
    model = tiny_model(kind)
    g = torch.Generator().manual_seed(rank)  # deliberately different data per process
    images = (torch.rand(64, 1, 16, 16, generator=g) * 255).to(torch.uint8)
    ds = data.TensorImages(images, torch.randint(0, 4, (64,), generator=g))
    recipe = engine.Recipe(epochs=2, batch_size=8, blr=1e-3, warmup_epochs=0.5, workers=0, log_every=1)
    engine.fit(model, ds, ds, recipe, out_dir, {"kind": "test"}, dd)
    torch.save(model.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("kind", [*baselines.METHODS, "classifier", "probe"])
def test_two_process_ddp_keeps_replicas_identical(tmp_path, kind):
    mp.spawn(_ddp_worker, args=(2, free_port(), str(tmp_path), kind), nprocs=2)
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    init = tiny_model(kind).state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    trained = "encoder.head.1.weight" if kind == "probe" else "encoder.blocks.0.attn.qkv.weight"  # a probe trains its head alone
    assert not torch.equal(a[trained], init[trained])


# ---------------------------------------------------------------- finetuning


@pytest.fixture
def pretrained(fake_fmnist, tmp_path):
    """A tiny PART checkpoint trained for one epoch on the fake Fashion-MNIST."""
    out = tmp_path / "pretrain"
    assert invoke("pretrain", "--data-dir", fake_fmnist, *TINY_RUN, "--epochs", 1, "--out-dir", out).exit_code == 0
    return out / "checkpoint.pt"


def classifier_from(path, **overrides):
    """The classifier `train.py finetune` builds from checkpoint `path`, before any training step."""
    vit, state, config = weights.encoder_from_init(str(path), vit_config("vit_mini", patch_size=4))
    info = data.data_info("fashion-mnist")
    cfg = train.classifier_config(
        info, 10, vit, True, overrides.get("preset"), overrides.get("patch_size"), 0.0, "cls",
        overrides.get("linear_probe", False), 0.0,
    )
    model = part.Classifier(cfg)
    weights.load_encoder(model.encoder, state, config["model"], str(path), main=False)
    return model


def test_finetune_model_takes_the_encoder_and_adds_new_tokens_and_head(pretrained):
    ckpt = torch.load(pretrained, weights_only=True)["model"]
    model = classifier_from(pretrained)
    own = model.encoder.state_dict()
    assert own["pos_embed"].shape == (1, 1 + 7 * 7, 32) and own["cls_token"].shape == (1, 1, 32)
    assert own["head.weight"].shape == (10, 32)
    for key in ("pos_embed", "cls_token", "head.weight"):
        assert "encoder." + key not in ckpt
    for key, value in own.items():
        if "encoder." + key in ckpt:
            assert torch.equal(value, ckpt["encoder." + key]), key
    assert sum("encoder." + k in ckpt for k in own) == len(ckpt) - sum(k.startswith("relative.") for k in ckpt)


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--preset", "vit_mini", "its ViT has embed_dim 32, depth 2"),
        ("--patch-size", 7, "ask for embed_dim 32, depth 2, num_heads 2, patch_size 7"),
    ],
)
def test_finetune_from_a_checkpoint_of_another_size_fails_clearly(
    pretrained, fake_fmnist, tmp_path, flag, value, message
):
    result = invoke(
        "finetune", "--data-dir", fake_fmnist, "--init", pretrained, flag, value, "--out-dir", tmp_path / "ft"
    )
    assert result.exit_code != 0 and message in result.output and "Traceback" not in result.output


def test_finetune_without_a_checkpoint_says_which_it_needs(fake_fmnist, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke("finetune", "--data-dir", fake_fmnist)
    assert result.exit_code != 0 and "run `python train.py pretrain` first" in result.output


def test_a_few_finetune_steps_raise_accuracy_on_a_fixed_batch(pretrained):
    torch.manual_seed(0)
    model = classifier_from(pretrained)
    images = (torch.rand(32, 1, 28, 28) * 255).to(torch.uint8)
    labels = torch.arange(32) % 10
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _, before = model(images, labels)
    for _ in range(40):
        loss, _ = model(images, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    _, after = model(images, labels)
    assert before["acc"] < 0.3 and after["acc"] > 0.9


def test_probe_pools_patch_tokens_unless_the_weights_trained_a_class_token(pretrained):
    state, _ = weights.pretrained_encoder(str(pretrained))
    assert "cls_token" not in state
    assert train.default_pool(state, linear_probe=True) == "avg"
    assert train.default_pool(state, linear_probe=False) == "cls"  # finetuning trains the new token, as the paper
    assert train.default_pool({**state, "cls_token": torch.zeros(1, 1, 32)}, linear_probe=True) == "cls"


def test_linear_probe_leaves_the_encoder_unchanged(pretrained, fake_fmnist, tmp_path):
    out = tmp_path / "probe"
    result = invoke(
        "finetune", "--data-dir", fake_fmnist, "--init", pretrained, "--linear-probe", "--batch-size", 32, "--epochs",
        2, "--blr", 1e-2, "--out-dir", out,
    )
    assert result.exit_code == 0, result.output
    before = torch.load(pretrained, weights_only=True)["model"]
    after = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
    encoder = [k for k in before if k.startswith("encoder.")]
    assert encoder and all(torch.equal(before[k], after[k]) for k in encoder)
    assert not torch.equal(after["encoder.head.1.weight"], torch.zeros_like(after["encoder.head.1.weight"]))
    assert (
        torch.load(out / "checkpoint.pt", weights_only=True)["config"]["model"]["pool"] == "avg"
    )  # PART trained no class token
    rows = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [r["epoch"] for r in rows if "val_acc" in r] == [1, 2] and (out / "checkpoint_best.pt").exists()


def test_knn_matches_a_loop_over_neighbours():
    g = torch.Generator().manual_seed(0)
    bank = torch.nn.functional.normalize(torch.randn(50, 8, generator=g), dim=-1)
    labels = torch.randint(0, 3, (50,), generator=g)
    queries = torch.nn.functional.normalize(torch.randn(7, 8, generator=g), dim=-1)
    expected = []
    for q in queries:
        sims = sorted(((float(q @ b), int(y)) for b, y in zip(bank, labels)), reverse=True)[:5]
        votes = [sum(math.exp(s / 0.1) for s, y in sims if y == c) for c in range(3)]
        expected.append(votes.index(max(votes)))
    assert part.knn_predict(bank, labels, queries, k=5, temperature=0.1, chunk=3).tolist() == expected
    assert part.knn_predict(bank, labels, bank, k=1).tolist() == labels.tolist()  # each point is its own neighbour


def test_knn_command_scores_held_out_images(pretrained, fake_fmnist):
    result = invoke("knn", "--ckpt", pretrained, "--data-dir", fake_fmnist, "--k", 5)
    assert result.exit_code == 0 and "32 held-out fashion-mnist images, 96 training images vote, k 5" in result.output
    assert 0 <= float(result.output.split("kNN top-1 ")[1].split(":")[0]) <= 1
    result = invoke("knn", "--ckpt", pretrained, "--data-dir", fake_fmnist, "--k", 500)
    assert result.exit_code != 0 and "--k 500: expected 1 to the 96 training images" in result.output


def test_knn_reads_the_tokens_a_checkpoint_trained(pretrained, fake_fmnist, tmp_path):
    result = invoke("knn", "--ckpt", pretrained, "--data-dir", fake_fmnist, "--pool", "cls")
    assert result.exit_code == 1 and "--pool cls" in result.output and "no class token" in result.output
    ft = tmp_path / "ft"
    assert (
        invoke(
            "finetune", "--data-dir", fake_fmnist, "--init", pretrained, "--epochs", 1, "--batch-size", 32, "--out-dir",
            ft,
        ).exit_code
        == 0
    )
    result = invoke("knn", "--ckpt", ft / "checkpoint.pt", "--data-dir", fake_fmnist, "--pool", "cls", "--k", 5)
    assert result.exit_code == 0 and "pool cls" in result.output, result.output
    # the class token's features, by hand: the finetuned encoder with its position embeddings, token 0
    encoder, model, _ = weights.frozen_encoder(ft / "checkpoint.pt", random_init=False)
    dd = engine.Dist(0, 0, 1, torch.device("cpu"))
    info, _, val_set = train.load_sets(fmnist_flags(fake_fmnist), data.eval_transform, data.eval_transform)
    feats, _ = train.knn_features(encoder, model["mean"], model["std"], "cls", val_set, dd)
    images = torch.stack([val_set[i][0] for i in range(len(val_set))])
    patches = patchify(
        (images.float() / 255 - torch.tensor(model["mean"]).view(1, -1, 1, 1))
        / torch.tensor(model["std"]).view(1, -1, 1, 1),
        4,
    )
    torch.testing.assert_close(feats, torch.nn.functional.normalize(encoder.forward_features(patches)[:, 0], dim=-1))


def test_finetune_resume_continues_exactly(pretrained, fake_fmnist, tmp_path, monkeypatch):
    common = [
        "finetune",
        "--data-dir",
        fake_fmnist,
        "--init",
        pretrained,
        "--batch-size",
        32,
        "--epochs",
        2,
        "--mixup",
        0.8,
        "--cutmix",
        1.0,
    ]
    assert invoke(*common, "--out-dir", tmp_path / "a").exit_code == 0
    crash_after_epoch(monkeypatch, 1)
    assert invoke(*common, "--out-dir", tmp_path / "b").exit_code != 0
    monkeypatch.undo()
    assert "resuming from" in invoke(*common, "--out-dir", tmp_path / "b").output
    a, b = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=True)["model"] for d in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_the_model_file_and_the_engine_import_lean():
    code = (
        "import sys, part; lean = not {'click', 'PIL', 'matplotlib'} & set(sys.modules); import train; "
        "print(lean, 'matplotlib' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=os.path.dirname(__file__)
    )
    assert out.stdout.split() == ["True", "False"]  # part: no click, PIL or matplotlib; train: no matplotlib


def test_every_recipe_resizes_bicubic_as_mae_and_deit():
    info = data.data_info("in1k")
    small = data.data_info("fashion-mnist", img_size=32)  # not its native 28: resized too
    transforms = [
        data.pretrain_transform(info, "in1k"),
        data.eval_transform(info, "in1k"),
        data.eval_transform(small, "fashion-mnist"),
        data.finetune_transform(info, "in1k", 2, 9, 0.25),
    ]
    resizers = [t for c in transforms for t in c.transforms if isinstance(t, (v2.Resize, v2.RandomResizedCrop))]
    assert len(resizers) == 4 and all(t.interpolation == v2.InterpolationMode.BICUBIC for t in resizers)
