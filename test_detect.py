"""Tests for detect.py on CPU with a tiny ViT and small images: `pytest -q test_detect.py`."""

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import detect
import engine
import part
import weights
from conftest import one_line_error, refused, square_mask, write_coco
from vit import Attention, VisionTransformer, resize_pos_embed, vit_config, window_partition, window_unpartition

LOSSES = {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}


def tiny_config(masks=True, patch_size=4, window=0, global_blocks=()):
    vit = vit_config(
        "vit_test", patch_size=patch_size, in_chans=1, pos_grid=(16, 16), window=window, global_blocks=global_blocks
    )
    return detect.DetectConfig(
        vit=vit, num_classes=2, masks=masks, img_size=64, rois=32, anchor_size=16, proposals=50, mean=(0.5,),
        std=(0.25,),
    )


@pytest.fixture
def coco(tmp_path):
    return write_coco(tmp_path / "coco")


@pytest.fixture
def part_checkpoint(tmp_path):
    """A PART pretraining checkpoint as engine.fit writes it, of a vit_test / 4 on 16 x 16 images."""
    cfg = part.PARTConfig(
        vit=vit_config("vit_test", patch_size=4, in_chans=1), img_size=(16, 16), num_pairs=16, mean=(0.3,),
        std=(0.2,),
    )
    torch.manual_seed(1)
    model = part.PART(cfg)
    path = tmp_path / "part.pt"
    torch.save({"model": model.state_dict(), "config": {"kind": "part", "model": cfg.to_dict()}, "epoch": 1}, path)
    return path, model


def run_cli(*args):
    return CliRunner().invoke(detect.main, [str(a) for a in args])


TINY_RUN = [
    "--preset",
    "vit_test",
    "--img-size",
    "64",
    "--rois",
    "32",
    "--proposals",
    "50",
    "--epochs",
    "1",
    "--batch-size",
    "2",
    "--blr",
    "0.01",
    "--log-every",
    "1",
]

# ---------------------------------------------------------------- the backbone


@pytest.mark.parametrize("patch_size", [4, 16])
def test_pyramid_gives_five_maps_of_256_channels_at_strides_4_to_64(patch_size):
    backbone = detect.ViTBackbone(tiny_config(patch_size=patch_size).vit)
    maps = backbone(torch.randn(2, 1, 128, 64))
    assert list(maps) == ["0", "1", "2", "3", "pool"]
    for (name, x), stride in zip(maps.items(), (4, 8, 16, 32, 64)):
        assert x.shape == (2, 256, 128 // stride, 64 // stride), name
    assert backbone.out_channels == 256


def test_layernorm2d_normalises_over_channels_only():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 3, 5) * torch.arange(1.0, 16.0).reshape(1, 1, 3, 5) + 3  # scale and offset vary per position
    ln = detect.LayerNorm2d(6)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 2)
        ln.bias.uniform_(-1, 1)
    mean, var = x.mean(dim=1, keepdim=True), x.var(dim=1, unbiased=False, keepdim=True)
    expected = (x - mean) / torch.sqrt(var + ln.eps) * ln.weight[:, None, None] + ln.bias[:, None, None]
    torch.testing.assert_close(ln(x), expected)
    assert not torch.allclose(torch.nn.GroupNorm(1, 6, eps=ln.eps)(x), (x - mean) / torch.sqrt(var + ln.eps), atol=1e-3)


def test_window_attention_covering_the_grid_is_global_attention():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 7, 32)  # (B, h, w, D), neither side a multiple of the window
    assert torch.equal(window_unpartition(window_partition(x, 3), 3, 2, 5, 7), x)
    x = x[:, :, :5].reshape(
        2, 25, 32
    )  # one window of 5 x 5 tokens, without padding (padded tokens take part as zeros, as in ViTDet)
    attn = Attention(32, 2, window=0)
    windowed = Attention(32, 2, window=5)
    windowed.load_state_dict(attn.state_dict())
    torch.testing.assert_close(windowed(x, grid=(5, 5)), attn(x, grid=(5, 5)))
    small = Attention(32, 2, window=2)
    small.load_state_dict(attn.state_dict())
    assert not torch.allclose(
        small(x, grid=(5, 5)), attn(x), atol=1e-4
    )  # a real restriction, not global attention again


def test_global_blocks_stay_global_and_the_others_window():
    cfg = tiny_config(window=4, global_blocks=(1,))
    blocks = detect.Detector(cfg).rcnn.backbone.encoder.blocks
    assert [b.attn.window for b in blocks] == [4, 0]


# ---------------------------------------------------------------- Mask R-CNN


def targets_for(images, with_masks=True):
    """Two squares in the first image, none in the second."""
    H, W = images[0].shape[-2:]
    boxes = torch.tensor([[4.0, 4.0, 20.0, 20.0], [30.0, 10.0, 50.0, 30.0]])
    first = {"boxes": boxes, "labels": torch.tensor([1, 2])}
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    if with_masks:
        first["masks"] = torch.from_numpy(
            np.stack([square_mask(H, W, 4, 4, 20, 20), square_mask(H, W, 30, 10, 50, 30)])
        )
        empty["masks"] = torch.zeros(0, H, W, dtype=torch.uint8)
    return [first, empty]


@pytest.mark.slow
def test_mask_rcnn_gives_five_losses_in_training_and_detections_in_eval():
    torch.manual_seed(0)
    model = detect.Detector(tiny_config())
    images = [
        torch.randint(0, 256, (1, 48, 64), dtype=torch.uint8),
        torch.randint(0, 256, (1, 40, 56), dtype=torch.uint8),
    ]
    loss, losses = model(images, targets_for(images))
    assert set(losses) == LOSSES | {"loss"} and torch.isfinite(loss)
    loss.backward()
    encoder = model.rcnn.backbone.encoder
    assert encoder.patch_embed.proj.weight.grad.abs().sum() > 0 and encoder.pos_embed.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        outputs = model(images)
    for out, image in zip(outputs, images):
        assert set(out) == {"boxes", "labels", "scores", "masks"}
        n = len(out["scores"])
        assert n > 0 and out["boxes"].shape == (n, 4) and out["labels"].shape == (n,)
        assert out["masks"].shape == (n, 1, *image.shape[-2:])  # pasted back at the input's own size
        assert (out["boxes"][:, 2] <= image.shape[-1]).all() and (out["boxes"][:, 3] <= image.shape[-2]).all()


def test_box_only_config_is_faster_rcnn_without_a_mask_loss():
    model = detect.Detector(tiny_config(masks=False))
    images = [torch.randint(0, 256, (1, 48, 64), dtype=torch.uint8)] * 2
    loss, losses = model(images, targets_for(images, with_masks=False))
    assert set(losses) == LOSSES - {"loss_mask"} | {"loss"} and torch.isfinite(loss)


# ---------------------------------------------------------------- COCO data


def test_coco_loader_decodes_polygons_and_rle_and_keeps_empty_images(coco):
    ds = detect.CocoDetection(coco, "train2017")
    assert len(ds) == 4 and ds.in_chans == 1 and ds.masks and ds.cat_ids == [3, 7]
    image, target = ds[0]
    assert image.shape == (1, 48, 64) and target["boxes"].shape == (0, 4) and target["masks"].shape == (0, 48, 64)
    image, target = ds[2]  # polygons (category 3) and an RLE mask (category 7)
    assert image.dtype == torch.uint8 and int(target["image_id"]) == 3
    torch.testing.assert_close(target["boxes"], torch.tensor([[4.0, 4, 20, 20], [30, 10, 50, 30], [10, 26, 28, 44]]))
    assert target["labels"].tolist() == [1, 2, 1]
    assert torch.equal(target["masks"][1], torch.from_numpy(square_mask(48, 64, 30, 10, 50, 30)))  # RLE: exact
    polygon = target["masks"][0].bool()
    inside = torch.from_numpy(square_mask(48, 64, 4, 4, 20, 20)).bool()
    assert (
        polygon[inside].all() and (polygon & ~inside).sum() <= 2 * 17 + 1
    )  # rasterised outline may add one row and column


def test_ground_truth_as_detections_scores_100_ap(coco):
    """The loader's targets, turned into detections and results, round-trip through COCOeval to AP 100."""
    ds = detect.CocoDetection(coco, "val2017")
    boxes, masks = [], []
    for _, target in (ds[i] for i in range(len(ds))):
        out = {
            "boxes": target["boxes"],
            "labels": target["labels"],
            "scores": torch.ones(len(target["labels"])),
            "masks": target["masks"][:, None].float(),
        }
        b, m = detect.image_results(out, int(target["image_id"]), ds.cat_ids)
        boxes, masks = boxes + b, masks + m
    for iou_type, results in (("bbox", boxes), ("segm", masks)):
        metrics = detect.coco_metrics(ds.coco, results, iou_type)
        assert metrics == pytest.approx({"AP": 100.0, "AP50": 100.0, "AP75": 100.0})
        assert all(type(v) is float for v in metrics.values())  # numpy floats would break torch.load(weights_only=True)
    shifted = [{**r, "bbox": [r["bbox"][0] + 8, *r["bbox"][1:]]} for r in boxes]  # half a square off: a miss at IoU 0.5
    assert detect.coco_metrics(ds.coco, shifted, "bbox")["AP50"] < 50


@pytest.mark.slow
def test_train_from_a_part_checkpoint_then_eval(coco, part_checkpoint, tmp_path):
    path, pretrained = part_checkpoint
    out = tmp_path / "run"
    result = run_cli("train", "--data-dir", coco, "--init", path, "--out-dir", out, *TINY_RUN)
    assert result.exit_code == 0, result.output
    assert "box" in result.output and "mask" in result.output  # the final table
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["config"]["model"]["vit"]["embed_dim"] == 32 and ckpt["metrics"]["AP_mask"] >= 0
    result = run_cli("eval", "--ckpt", out / "checkpoint.pt")
    assert result.exit_code == 0, result.output
    assert f"{ckpt['metrics']['AP_box']:8.1f}" in result.output  # eval alone reproduces the run's own number


def test_part_weights_reach_the_backbone(part_checkpoint, coco):
    path, pretrained = part_checkpoint
    cfg, state, _, _ = detect.prepare(
        str(path), str(coco), img_size=64, preset="vit_mini", patch_size=16, window=0, global_blocks=(), anchor_size=16,
        proposals=50,
    )
    assert cfg.vit.embed_dim == 32 and cfg.vit.patch_size == 4  # the checkpoint's encoder, not --preset / --patch-size
    encoder = detect.build_detector(cfg, state, str(path)).rcnn.backbone.encoder
    for name, value in pretrained.encoder.state_dict().items():
        if name != "pos_embed":
            torch.testing.assert_close(encoder.state_dict()[name], value, msg=name)


def test_xavier_init_starts_a_scratch_encoder_as_mae_and_keeps_the_weights_a_checkpoint_brings(part_checkpoint, coco):
    common = dict(img_size=64, preset="vit_test", patch_size=4, window=0, global_blocks=(), anchor_size=16, proposals=50)
    qkv = {}
    for xavier in (False, True):
        cfg, weights, _, _ = detect.prepare("scratch", str(coco), **common, xavier_init=xavier)
        torch.manual_seed(0)
        qkv[xavier] = detect.build_detector(cfg, weights, "scratch").rcnn.backbone.encoder.blocks[0].attn.qkv.weight
    bound = math.sqrt(6 / sum(qkv[True].shape))  # xavier-uniform's, fan_in + fan_out of the fused qkv
    assert 0.9 * bound < qkv[True].abs().max() <= bound and qkv[False].std() < 0.021  # DeiT's trunc-normal 0.02
    path, pretrained = part_checkpoint
    cfg, weights, _, _ = detect.prepare(str(path), str(coco), **common, xavier_init=True)
    encoder = detect.build_detector(cfg, weights, str(path)).rcnn.backbone.encoder
    torch.testing.assert_close(encoder.blocks[0].attn.qkv.weight, pretrained.encoder.blocks[0].attn.qkv.weight)


@pytest.mark.slow
def test_box_only_data_trains_without_masks(tmp_path):
    root = write_coco(tmp_path / "boxes", masks=False)
    result = run_cli("train", "--data-dir", root, "--init", "scratch", "--out-dir", tmp_path / "run", *TINY_RUN)
    assert result.exit_code == 0, result.output
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert (
        ckpt["config"]["model"]["masks"] is False and "AP_box" in ckpt["metrics"] and "AP_mask" not in ckpt["metrics"]
    )
    assert not any(k.startswith("rcnn.roi_heads.mask") for k in ckpt["model"])


def break_json(root):
    (root / "annotations" / "instances_train2017.json").write_text('{"images": [')
    return "instances_train2017.json is not valid JSON"


def drop_image(root):
    (root / "val2017" / "img1.png").unlink()
    return "img1.png"


def drop_a_required_field(root):
    path = root / "annotations" / "instances_val2017.json"
    coco = json.loads(path.read_text())
    del coco["images"][0]["file_name"]
    path.write_text(json.dumps(coco))
    return "needs ['id', 'file_name', 'height', 'width']"


@pytest.mark.parametrize("corrupt", [break_json, drop_image, drop_a_required_field])
def test_bad_data_stops_with_a_message_naming_it(coco, tmp_path, corrupt):
    message = corrupt(coco)
    result = run_cli("train", "--data-dir", coco, "--init", "scratch", "--out-dir", tmp_path / "run", *TINY_RUN)
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit), result.output  # not a traceback
    assert message in result.output


def test_a_bare_state_dict_is_read_at_its_own_size_and_a_wrong_checkpoint_named(coco, part_checkpoint, tmp_path):
    path, pretrained = part_checkpoint
    bare = tmp_path / "vit_test_encoder.pt"
    torch.save(weights.encoder_state_dict({"model": pretrained.state_dict()}), bare)  # the weights alone, no config
    cfg, (state, _), _, _ = detect.prepare(
        str(bare), str(coco), img_size=64, preset="vit_mini", patch_size=8, window=0, global_blocks=(), anchor_size=16,
        proposals=50,
    )
    assert (cfg.vit.embed_dim, cfg.vit.depth, cfg.vit.patch_size) == (32, 2, 4)  # the file's vit_test/4, not the flags'
    result = run_cli("eval", "--ckpt", path)  # a PART checkpoint is not a detector
    assert (
        result.exit_code != 0
        and "part.pt is a PART 2D pretraining checkpoint (train.py pretrain --method part); expected a detector"
        in result.output
    )


def test_pyramid_needs_a_power_of_two_patch_size():
    with pytest.raises(engine.UserError, match="power-of-two patch size, not 6"):
        detect.SimpleFeaturePyramid(32, 6)


def test_landscape_and_portrait_reach_the_backbone_on_the_training_grid(monkeypatch):
    torch.manual_seed(0)
    model = detect.Detector(tiny_config()).eval()  # img_size 64, patch 4: the 16 x 16 grid of the position embeddings
    seen, resized, resize = [], [], resize_pos_embed
    model.rcnn.backbone.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape))

    def recording_resize(pos_embed, old_grid, new_grid, num_prefix):
        resized.append((tuple(old_grid), tuple(new_grid)))
        return resize(pos_embed, old_grid, new_grid, num_prefix)

    monkeypatch.setattr("vit.resize_pos_embed", recording_resize)
    images = [
        torch.randint(0, 256, (1, 30, 50), dtype=torch.uint8),
        torch.randint(0, 256, (1, 50, 20), dtype=torch.uint8),
    ]
    model(images)
    targets = [
        {
            "boxes": torch.tensor([[2.0, 2.0, 20.0, 20.0]]),
            "labels": torch.tensor([1]),
            "masks": torch.zeros(1, *im.shape[1:], dtype=torch.uint8),
        }
        for im in images
    ]
    model.train()(images, targets)
    assert seen == [(2, 1, 64, 64)] * 2  # both images on the fixed 64 x 64 canvas, in evaluation and in training
    assert resized == [((16, 16), (16, 16))] * 2  # so the position embeddings are used on their own grid, unresized


def test_part_row_uses_its_pretraining_statistics_and_scratch_can_match_its_inputs(part_checkpoint, coco, tmp_path):
    path, _ = part_checkpoint  # pretrained with mean 0.3, std 0.2 on one channel
    common = dict(
        img_size=64, preset="vit_test", patch_size=4, window=0, global_blocks=(), anchor_size=16, proposals=50
    )
    cfg, _, train_set, _ = detect.prepare(str(path), str(coco), **common)
    assert (cfg.mean, cfg.std, cfg.vit.in_chans, train_set.in_chans) == ((0.3,), (0.2,), 1, 1)
    rgb = tmp_path / "rgb"  # the same data in colour: scratch reads it in colour unless told otherwise
    write_coco(rgb)
    for split in ("train2017", "val2017"):
        for f in (rgb / split).glob("*.png"):
            Image.open(f).convert("RGB").save(f)
    cfg, _, train_set, _ = detect.prepare("scratch", str(rgb), **common)
    assert cfg.vit.in_chans == 3 and len(cfg.mean) == 3
    Image.open(rgb / "train2017" / "img0.png").convert("L").save(rgb / "train2017" / "img0.png")
    cfg, _, train_set, _ = detect.prepare("scratch", str(rgb), **common)  # a gray first image: still colour
    assert cfg.vit.in_chans == train_set.in_chans == 3 and train_set[0][0].shape[0] == 3
    cfg, _, train_set, _ = detect.prepare("scratch", str(rgb), **common, in_chans=1, mean=(0.3,), std=(0.2,))
    assert (cfg.mean, cfg.std, cfg.vit.in_chans, train_set.in_chans) == ((0.3,), (0.2,), 1, 1)
    assert train_set[0][0].shape[0] == 1
    result = run_cli("eval", "--init", path, "--data-dir", rgb, "--in-chans", 3, *common_flags(common))
    assert result.exit_code != 0 and "takes 1 channel(s)" in result.output and "Traceback" not in result.output


def common_flags(options):
    """prepare's keyword arguments as detect.py flags (a tuple as a comma list)."""
    return [
        a
        for k, v in options.items()
        for a in (f"--{k.replace('_', '-')}", ",".join(map(str, v)) if isinstance(v, tuple) else v)
    ]


@pytest.mark.slow
def test_compile_compiles_the_vit_alone_and_keeps_the_checkpoint_names(coco, tmp_path, monkeypatch):
    compiled = []
    monkeypatch.setattr(VisionTransformer, "compile", lambda self, *a, **k: compiled.append(type(self).__name__))
    args = ["--data-dir", coco, "--init", "scratch", "--preset", "vit_test", "--img-size", 64, "--epochs", 1, "--compile",
            "--out-dir", tmp_path / "run"]
    result = run_cli(*args)
    assert result.exit_code == 0 and compiled == ["VisionTransformer"], result.output
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert state["config"]["recipe"]["compile"] and not any("_orig_mod" in k for k in state["model"])


# ---------------------------------------------------------------- COCO annotations and channels (detect.py)


def edit_annotations(root, split, edit):
    """edit(the parsed json) of annotations/instances_{split}.json, written back -> its path."""
    path = root / "annotations" / f"instances_{split}.json"
    coco = json.loads(path.read_text())
    edit(coco)
    path.write_text(json.dumps(coco))
    return path


def first_annotation(**fields):
    """An edit that sets fields of the first annotation: in write_coco's train2017 annotation 1, a
    16 x 16 square at (4, 4) of a 64 x 48 image outlined by a polygon; in its val2017, the same."""
    return lambda coco: coco["annotations"][0].update(fields)


@pytest.mark.parametrize(
    "split, edit, needles",
    [
        ("train2017", first_annotation(bbox=["4", "4", "16", "16"]), ["annotation 1", "4 numbers"]),
        ("train2017", first_annotation(bbox=[4, 4, 16]), ["annotation 1", "4 numbers"]),
        ("val2017", first_annotation(bbox=[4, 4, -16, 16]), ["annotation 1", "negative"]),
        ("train2017", first_annotation(bbox=[50, 4, 16, 16]), ["annotation 1", "outside", "64 x 48"]),
        ("train2017", first_annotation(bbox=[4, -2, 16, 16]), ["annotation 1", "outside"]),
        ("train2017", first_annotation(segmentation=[[4, 4, 20, 4]]), ["annotation 1", "at least 3 points"]),
        ("val2017", first_annotation(segmentation=[[4, 4, 20, 4, 20, 20, 4]]), ["annotation 1", "at least 3 points"]),
        ("train2017", first_annotation(segmentation=[[4, 4, 20, 4, "20", 20]]), ["annotation 1", "at least 3 points"]),
        ("val2017", lambda coco: coco.update(annotations=[]), ["no annotations", "COCOeval"]),
        ("train2017", lambda coco: coco.update(annotations=[]), ["no annotations"]),
    ],
    ids=[
        "bbox of strings",
        "bbox of 3",
        "negative width",
        "right of the image",
        "above the image",
        "polygon of 2 points",
        "polygon of odd length",
        "polygon with a string",
        "val without annotations",
        "train without annotations",
    ],
)
def test_coco_annotations_outside_coco_s_format_are_refused_at_load(tmp_path, split, edit, needles):
    root = write_coco(tmp_path / "coco")
    path = edit_annotations(root, split, edit)
    refused(lambda: detect.CocoDetection(root, split), path, *needles)


def test_coco_boxes_may_reach_a_pixel_past_the_border_and_empty_ones_are_dropped(tmp_path):
    root = write_coco(tmp_path / "coco")
    edit_annotations(root, "train2017", first_annotation(bbox=[-0.5, 4, 65, 16]))  # 0.5 px past either side
    edit_annotations(root, "val2017", first_annotation(bbox=[4, 4, 16, 0]))  # COCO 2017 has two of height 0
    assert detect.CocoDetection(root, "train2017")[1][1]["boxes"][0].tolist() == [-0.5, 4, 64.5, 20]
    assert len(detect.CocoDetection(root, "val2017")[1][1]["boxes"]) == 1  # of 2 objects


def bad_val_box(root):
    edit_annotations(root, "val2017", first_annotation(bbox=[4, 4, 16]))


@pytest.mark.parametrize(
    "corrupt, flags, needles",
    [
        (None, ["--in-chans", 2], ["--in-chans 2", "1 (grayscale) or 3 (RGB)"]),
        (None, ["--mean", 0.5, "--std", 0], ["--std 0.0"]),
        (bad_val_box, [], ["instances_val2017.json", "annotation 1", "4 numbers"]),
    ],
)
def test_detect_stops_on_data_it_cannot_read_with_one_line_before_writing(tmp_path, corrupt, flags, needles):
    root = write_coco(tmp_path / "coco")
    if corrupt:
        corrupt(root)
    result = run_cli(
        "train", "--data-dir", root, "--init", "scratch", *flags, "--out-dir", tmp_path / "run", *TINY_RUN
    )
    assert one_line_error(result, *needles)
    assert not (tmp_path / "run").exists()
