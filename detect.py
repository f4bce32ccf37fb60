"""COCO detection and instance segmentation with a PART ViT: torchvision's Mask R-CNN on
the ViTDet simple feature pyramid (paper section 5.2, Table 2; details in 8.1).

    python train.py pretrain                    # a PART checkpoint, out/pretrain/checkpoint.pt
    python detect.py                            # finetune it on the embedded nuclei tiles
    python detect.py --init scratch --out-dir out/detect_scratch
    python detect.py eval --ckpt out/detect/checkpoint.pt
    torchrun --nproc_per_node=8 detect.py --data-dir coco/ --init part_vitb16.pt --img-size 1024 ...  # README

Training is engine.fit, the loop of pretraining; evaluation is pycocotools' COCOeval on the held-out split.
"""

import contextlib
import importlib.util
import io
import json
import math
from collections import OrderedDict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import click
import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.ops import box_convert
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads
from torchvision.models.detection.rpn import RPNHead
from torchvision.transforms import v2

import cli
import data
import engine
import part
import weights
from vit import PRESETS, ViTConfig, VisionTransformer, feature_map, patchify, set_grad_checkpointing, vit_config

# ---------------------------------------------------------------- the backbone

STRIDES = (4, 8, 16, 32)  # the pyramid's levels "0".."3"; "pool" adds 64 (ViTDet, Li et al. 2022)
PYRAMID_DIM = 256  # out_channels of ViTDet's pyramid and torchvision's FPN alike


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels at every position of a (B, C, H, W) map: ViTDet's "LN" (not GroupNorm(1, C))."""

    def __init__(self, C, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(C))
        self.bias = nn.Parameter(torch.zeros(C))
        self.eps = eps

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)  # (B, H, W, C)
        x = F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


def pyramid_level(dim, patch_size, stride):
    """One pyramid level: the stride-P map (B, dim, h, w) rescaled to `stride`, then 1x1 conv -> LN -> 3x3 conv
    -> LN to 256 channels (ViTDet, no biases). ViTDet's scales 4, 2, 1, 1/2 of a stride-16 map generalise to
    P / stride: 2x2 transposed convs (LN + GELU between) to go up, max-pooling to go down."""
    layers = []
    if stride < patch_size:
        for i in range(int(math.log2(patch_size // stride))):
            if i:
                layers += [LayerNorm2d(dim), nn.GELU()]
            layers.append(nn.ConvTranspose2d(dim, dim // 2, 2, stride=2))
            dim //= 2
    elif stride > patch_size:
        layers.append(nn.MaxPool2d(stride // patch_size))
    layers += [nn.Conv2d(dim, PYRAMID_DIM, 1, bias=False), LayerNorm2d(PYRAMID_DIM)]
    layers += [nn.Conv2d(PYRAMID_DIM, PYRAMID_DIM, 3, padding=1, bias=False), LayerNorm2d(PYRAMID_DIM)]
    return nn.Sequential(*layers)


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's pyramid from one stride-P map: (B, D, h, w) -> {"0".."3": strides 4..32, "pool": 64}."""

    def __init__(self, dim, patch_size):
        super().__init__()
        if patch_size & (patch_size - 1):
            raise engine.UserError(f"the feature pyramid needs a power-of-two patch size, not {patch_size}")
        self.levels = nn.ModuleList(pyramid_level(dim, patch_size, s) for s in STRIDES)

    def forward(self, x):
        maps = OrderedDict((str(i), level(x)) for i, level in enumerate(self.levels))
        maps["pool"] = F.max_pool2d(maps["3"], kernel_size=1, stride=2)  # stride 64 for the RPN (LastLevelMaxPool)
        return maps


class ViTBackbone(nn.Module):
    """The PART encoder as a detection backbone: normalised images (B, C, H, W) -> OrderedDict of five
    (B, 256, H/s, W/s) maps, s = 4, 8, 16, 32, 64. The token grid goes to the encoder for its window
    attention and its position embeddings (resized where the grid is not vit_cfg.pos_grid)."""

    out_channels = PYRAMID_DIM  # what torchvision's MaskRCNN reads

    def __init__(self, vit_cfg):
        super().__init__()
        self.encoder = VisionTransformer(vit_cfg)
        self.pyramid = SimpleFeaturePyramid(vit_cfg.embed_dim, vit_cfg.patch_size)

    def forward(self, images):
        P = self.encoder.cfg.patch_size
        images = F.pad(images, (0, -images.shape[-1] % P, 0, -images.shape[-2] % P))  # to multiples of P
        grid = (images.shape[-2] // P, images.shape[-1] // P)
        with engine.autocast(images.device):  # bf16 on CUDA; the heads stay fp32 (see train_cmd)
            x = self.encoder.forward_features(patchify(images, P), grid=grid)  # (B, N, D)
            maps = self.pyramid(feature_map(x, grid))  # from (B, D, h, w)
        return {k: v.float() for k, v in maps.items()}


# ---------------------------------------------------------------- the detector


@dataclass
class DetectConfig:
    vit: ViTConfig = field(default_factory=ViTConfig)  # the encoder; pos_grid: the token grid of img_size
    num_classes: int = 80  # object categories, background not counted
    masks: bool = True  # Mask R-CNN; False: Faster R-CNN, for box-only data
    img_size: int = 1024  # longest side the images are resized to, and the square canvas's side (ViTDet: 1024)
    rois: int = 512  # RoIs sampled per image for the box head in training (ViTDet: 512)
    anchor_size: int = 32  # the stride-4 level's anchor side, doubling per level (COCO: 32 ... 512)
    proposals: int = 1000  # RPN proposals kept per image after NMS (ViTDet: 1000)
    mean: tuple = data.IMAGENET_MEAN  # input normalisation, per channel
    std: tuple = data.IMAGENET_STD

    def __post_init__(self):
        if isinstance(self.vit, dict):
            self.vit = ViTConfig(**self.vit)
        grids = dict(pos_grid=tuple(self.vit.pos_grid), global_blocks=tuple(self.vit.global_blocks))
        self.vit = vit = replace(self.vit, class_token=False, num_classes=0, **grids)
        self.mean, self.std = part.check_stats(self.mean, self.std, vit.in_chans)
        if self.img_size % 64 or self.img_size % vit.patch_size:
            raise engine.UserError(
                f"--img-size {self.img_size}: the canvas side must be a multiple of 64 (the pyramid's coarsest stride) "
                f"and of the patch size {vit.patch_size}"
            )
        if any(not 0 <= i < vit.depth for i in vit.global_blocks):
            raise engine.UserError(f"--global-blocks {list(vit.global_blocks)}: the ViT has blocks 0..{vit.depth - 1}")


class Detector(nn.Module):
    """torchvision's Mask R-CNN (Faster R-CNN without masks) on ViTBackbone with ViTDet's heads: a two-conv RPN
    head, a 4conv1fc box head and a four-conv mask head, both with LN. forward(a list of uint8 (C, H, W), target
    dicts) -> (loss, the five losses) in training mode, torchvision's detections in eval mode."""

    def __init__(self, cfg: DetectConfig):
        super().__init__()
        self.cfg = cfg
        C = PYRAMID_DIM
        sizes = tuple((cfg.anchor_size * 2**i,) for i in range(len(STRIDES) + 1))  # one per level, as torchvision's FPN
        anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
        heads = dict(
            rpn_anchor_generator=anchors,
            rpn_head=RPNHead(C, 3, conv_depth=2),
            box_head=FastRCNNConvFCHead((C, 7, 7), [C] * 4, [1024], norm_layer=LayerNorm2d),
        )
        if cfg.masks:
            heads["mask_head"] = MaskRCNNHeads(C, [C] * 4, 1, norm_layer=LayerNorm2d)
        rcnn = MaskRCNN if cfg.masks else FasterRCNN
        # the longest side becomes img_size, and every batch is padded to the img_size^2 canvas (ViTDet's 1024^2):
        # the token grid is always the position embeddings' own, and no image's layout depends on its batch
        self.rcnn = rcnn(
            ViTBackbone(cfg.vit), cfg.num_classes + 1, min_size=cfg.img_size, max_size=cfg.img_size,
            image_mean=list(cfg.mean), image_std=list(cfg.std), size_divisible=cfg.img_size,
            box_batch_size_per_image=cfg.rois, rpn_post_nms_top_n_train=cfg.proposals,
            rpn_post_nms_top_n_test=cfg.proposals, **heads,
        )

    def forward(self, images, targets=None):
        images = [x.float() / 255 for x in images]
        if not self.training:
            return self.rcnn(images)
        losses = self.rcnn(images, targets)
        loss = sum(losses.values())
        return loss, {"loss": loss.detach(), **{k: v.detach() for k, v in losses.items()}}


# ---------------------------------------------------------------- COCO data


def read_coco(path):
    """A COCO instances JSON as a pycocotools COCO index; engine.UserError naming the file when it is not one."""
    try:
        with open(path) as f:
            dataset = json.load(f)
    except FileNotFoundError:
        raise engine.UserError(
            f"{path} not found: --data-dir must hold annotations/instances_{{train2017,val2017}}.json "
            "and the image folders train2017/, val2017/ (COCO's layout)"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise engine.UserError(f"{path} is not valid JSON ({e})") from None
    needs = {
        "images": ("id", "file_name", "height", "width"),
        "annotations": ("id", "image_id", "category_id", "bbox"),
        "categories": ("id",),
    }
    for key, fields in needs.items():
        if not isinstance(dataset, dict) or not isinstance(dataset.get(key), list):
            raise engine.UserError(f"{path} has no list {key!r}: not a COCO instances file")
        for entry in dataset[key]:
            if not isinstance(entry, dict) or any(k not in entry for k in fields):
                raise engine.UserError(
                    f"{path}: every entry of {key!r} needs {list(fields)}, this one does not: {str(entry)[:200]}"
                )
    if not dataset["annotations"]:  # COCOeval scores a split without objects as AP -100
        raise engine.UserError(f"{path} has no annotations: COCOeval and training need objects in both splits")
    categories, images = {c["id"] for c in dataset["categories"]}, {i["id"]: i for i in dataset["images"]}
    for ann in dataset["annotations"]:
        for key, known in (("category_id", categories), ("image_id", images)):
            if ann[key] not in known:
                raise engine.UserError(
                    f"{path}: annotation {ann['id']} has {key} {ann[key]}, which is not in its {key[:-3]}s list"
                )
        check_annotation(path, ann, images[ann["image_id"]])
        ann.setdefault("iscrowd", 0)  # what COCOeval reads, as COCO defines it where a file leaves it out
        ann.setdefault("area", ann["bbox"][2] * ann["bbox"][3])
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco.createIndex()
    return coco


BOX_TOLERANCE = 1  # pixels a box may reach past its image's border, for annotation tools that round outwards


def is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_annotation(path, ann, image):
    """One annotation against COCO's format and its image: a bbox [x, y, width, height] inside the image, polygons
    of at least 3 x, y points; engine.UserError naming it. Empty boxes pass (COCO 2017 has two): training drops them."""
    where, box = f"{path}: annotation {ann['id']}", ann["bbox"]
    if not (isinstance(box, list) and len(box) == 4 and all(map(is_number, box))):
        raise engine.UserError(f"{where} has bbox {box!r}, expected 4 numbers [x, y, width, height]")
    x, y, w, h = box
    if w < 0 or h < 0:
        raise engine.UserError(f"{where} has bbox {box} of negative width or height, expected [x, y, width, height]")
    W, H = image["width"], image["height"]
    if not (is_number(W) and is_number(H)):
        raise engine.UserError(f"{path}: image {image['id']} has width {W!r} and height {H!r}, expected numbers")
    if x < -BOX_TOLERANCE or y < -BOX_TOLERANCE or x + w > W + BOX_TOLERANCE or y + h > H + BOX_TOLERANCE:
        raise engine.UserError(f"{where} has bbox {box} outside its image {image['id']} of {W} x {H} pixels")
    polygons = ann.get("segmentation") if isinstance(ann.get("segmentation"), list) else []  # a dict is RLE
    for polygon in polygons:
        if not (
            isinstance(polygon, list) and len(polygon) >= 6 and len(polygon) % 2 == 0 and all(map(is_number, polygon))
        ):
            raise engine.UserError(
                f"{where} has polygon {str(polygon)[:80]}, expected x, y numbers of at least 3 points "
                "(an even count >= 6)"
            )


def is_colour(path):
    """From the file's header alone: one colour image makes a split colour (the first image would not do)."""
    with Image.open(path) as img:
        return img.mode not in ("L", "I", "I;16", "F", "1")


class CocoDetection(Dataset):
    """One split of a COCO-format folder: annotations/instances_{split}.json and {split}/ images.

    Items: a uint8 image (C, H, W) and {boxes (n, 4) x0 y0 x1 y1, labels (n,) in 1..K, masks (n, H, W) when the
    split has any segmentation, image_id}; crowd regions are left to COCOeval. in_chans None: 3 if any image is
    colour, else 1.
    """

    def __init__(self, root, split, in_chans=None, transform=None):
        self.coco = read_coco(Path(root) / "annotations" / f"instances_{split}.json")
        self.image_dir, self.transform = Path(root) / split, transform
        self.ids = sorted(self.coco.imgs)
        self.cat_ids = sorted(self.coco.cats)  # label i + 1 is category cat_ids[i]; 0 is background
        self.label = {c: i + 1 for i, c in enumerate(self.cat_ids)}
        self.masks = any("segmentation" in a for a in self.coco.anns.values())
        files = [self.image_dir / self.coco.imgs[i]["file_name"] for i in self.ids]
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise engine.UserError(f"{len(missing)} images of instances_{split}.json are missing, e.g. {missing[0]}")
        self.in_chans = in_chans or (3 if any(map(is_colour, files)) else 1)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        info = self.coco.imgs[self.ids[i]]
        image = data.read_image(self.image_dir / info["file_name"], data.FILE_MODES[self.in_chans])  # (C, H, W)
        objects = self.coco.imgToAnns[info["id"]]
        anns = [a for a in objects if not a["iscrowd"] and a["bbox"][2] > 0 and a["bbox"][3] > 0]  # crowds: COCOeval's
        boxes = box_convert(torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4), "xywh", "xyxy")
        target = {
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=image.shape[-2:]),
            "labels": torch.tensor([self.label[a["category_id"]] for a in anns], dtype=torch.int64),
        }
        if self.masks:  # an object without segmentation in a set with masks gets an empty mask
            masks = [
                self.coco.annToMask(a) if "segmentation" in a else np.zeros(image.shape[-2:], np.uint8) for a in anns
            ]
            target["masks"] = tv_tensors.Mask(np.stack(masks) if masks else np.zeros((0, *image.shape[-2:]), np.uint8))
        if self.transform:
            image, target = self.transform(image, target)
        target = {k: v.as_subclass(torch.Tensor) for k, v in target.items()}
        return image.as_subclass(torch.Tensor), {**target, "image_id": torch.tensor(info["id"])}


def train_transform(img_size, scale_range):
    """ViTDet's large-scale jitter: resize by a random factor of the img_size square, crop or
    pad to it, flip; boxes and masks follow, objects cropped away are dropped."""
    return v2.Compose([
        v2.ScaleJitter((img_size, img_size), scale_range=scale_range),
        v2.RandomCrop(img_size, pad_if_needed=True),
        v2.RandomHorizontalFlip(),
        v2.SanitizeBoundingBoxes(),
    ])


def collate(batch):
    """Detection batches are lists: images differ in size, targets in object count."""
    images, targets = zip(*batch)
    return list(images), list(targets)


# ---------------------------------------------------------------- the embedded default: nuclei tiles

NUCLEI_TILE, NUCLEI_STRIDE = 128, 32  # pixels; 125 nuclei of ~22 px in a 512 x 512 image
MIN_FRAGMENT = 20  # pixels: slivers of nuclei cut by a tile border are dropped (the smallest whole nucleus has 25)


def stardist_images():
    """The data folder of the stardist package (pip install --no-deps stardist==0.9.2), found without importing it."""
    spec = importlib.util.find_spec("stardist")
    folder = Path(next(iter(spec.submodule_search_locations))) / "data" / "images" if spec else None
    if folder is None or not (folder / "img2d.tif").is_file():
        raise engine.UserError(
            "the default data set is the nuclei image of the stardist package: pip install --no-deps "
            "stardist==0.9.2, or pass --data-dir with a COCO-format folder"
        )
    return folder


def write_nuclei(root):
    """The 2018 Data Science Bowl nuclei image that ships with stardist (512 x 512, 16-bit, 125 instance masks) as
    COCO-format tiles: the bottom-right 256 x 256 quadrant, 4 tiles, is held out (val2017); the 105 overlapping
    tiles that do not touch it train (train2017). Intensities: the 1st..99.8th percentile scaled to uint8."""
    root = Path(root)
    if (root / "annotations" / "instances_val2017.json").is_file():
        return
    folder = stardist_images()
    image = np.asarray(Image.open(folder / "img2d.tif"), dtype=np.float32)
    labels = np.asarray(Image.open(folder / "mask2d.tif"))
    lo, hi = np.percentile(image, (1, 99.8))
    image = ((image - lo) / (hi - lo)).clip(0, 1) * 255
    T, S, H = NUCLEI_TILE, NUCLEI_STRIDE, image.shape[0]
    corners = [(y, x) for y in range(0, H - T + 1, S) for x in range(0, H - T + 1, S)]
    splits = {
        "train2017": [(y, x) for y, x in corners if y + T <= H // 2 or x + T <= H // 2],
        "val2017": [(y, x) for y in range(H // 2, H, T) for x in range(H // 2, H, T)],
    }
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split, tiles in splits.items():
        (root / split).mkdir(exist_ok=True)
        images, anns = [], []
        for y, x in tiles:
            name = f"nuclei_y{y:03d}_x{x:03d}.png"
            Image.fromarray(image[y : y + T, x : x + T].round().astype(np.uint8)).save(root / split / name)
            images.append({"id": len(images) + 1, "file_name": name, "height": T, "width": T})
            tile = labels[y : y + T, x : x + T]
            for k in np.unique(tile[tile > 0]):
                rle = mask_utils.encode(np.asfortranarray((tile == k).astype(np.uint8)))
                if mask_utils.area(rle) >= MIN_FRAGMENT:
                    anns.append({
                        "id": len(anns) + 1, "image_id": len(images), "category_id": 1, "iscrowd": 0,
                        "bbox": mask_utils.toBbox(rle).tolist(), "area": int(mask_utils.area(rle)),
                        "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
                    })
        coco = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "nucleus"}]}
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))


def data_root(data_dir, out_dir, dd):
    """--data-dir, or the nuclei tiles, written by rank 0 to OUT_DIR/nuclei on first use."""
    if data_dir:
        return data_dir
    root = Path(out_dir) / "nuclei"
    if dd.main:
        write_nuclei(root)
    if dd.world > 1:
        dist.barrier()
    return str(root)


# ---------------------------------------------------------------- evaluation


def image_results(out, image_id, cat_ids):
    """One image's torchvision detections -> COCO result entries for boxes and, where predicted, masks."""
    common = [
        {"image_id": image_id, "category_id": cat_ids[int(label) - 1], "score": float(score)}
        for label, score in zip(out["labels"], out["scores"])
    ]
    xywh = box_convert(out["boxes"].float().cpu(), "xyxy", "xywh")
    boxes = [{**c, "bbox": [round(float(v), 2) for v in box]} for c, box in zip(common, xywh)]
    if "masks" not in out or not common:
        return boxes, []
    binary = (out["masks"][:, 0] > 0.5).to(torch.uint8).cpu().numpy()  # (n, H, W)
    rles = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0)))
    return boxes, [{**c, "segmentation": rle} for c, rle in zip(common, rles)]


def coco_metrics(coco, results, iou_type):
    """COCOeval's AP, AP50, AP75 in percent; 0 for a model that detects nothing."""
    if not results:
        return dict.fromkeys(("AP", "AP50", "AP75"), 0.0)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        evaluator = COCOeval(coco, coco.loadRes(results), iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    # python floats: numpy's would make the checkpoint unreadable with torch.load(weights_only=True)
    return {name: 100 * float(v) for name, v in zip(("AP", "AP50", "AP75"), evaluator.stats)}


@torch.no_grad()
def evaluate(model, loader, dd, seed):
    """COCOeval on the held-out split -> {AP_box, AP50_box, AP75_box (, AP_mask, ...)} on rank 0, {} elsewhere.
    Each process detects on its shard (each image once) and rank 0 scores them all."""
    model.eval()
    dataset = loader.dataset
    per_image = {}  # image_id -> (box results, mask results)
    for images, targets in engine.progress(loader, dd, desc="eval"):
        outputs = model(engine.to_device(images, dd.device))
        for out, target in zip(outputs, targets):
            per_image[int(target["image_id"])] = image_results(out, int(target["image_id"]), dataset.cat_ids)
    model.train()
    if dd.world > 1:
        shards = [None] * dd.world if dd.main else None
        dist.gather_object(per_image, shards, dst=0)
        if not dd.main:
            return {}
        per_image = {k: v for shard in shards for k, v in shard.items()}
    boxes = [r for b, _ in per_image.values() for r in b]
    metrics = {f"{k}_box": v for k, v in coco_metrics(dataset.coco, boxes, "bbox").items()}
    if dataset.masks:
        masks = [r for _, m in per_image.values() for r in m]
        metrics.update({f"{k}_mask": v for k, v in coco_metrics(dataset.coco, masks, "segm").items()})
    return metrics


def table(metrics):
    """The COCO numbers as a small fixed-width table."""
    rows = [f"{'':6}{'AP':>8}{'AP50':>8}{'AP75':>8}"]
    for kind in ("box", "mask"):
        if f"AP_{kind}" in metrics:
            rows.append(f"{kind:6}" + "".join(f"{metrics[f'{m}_{kind}']:8.1f}" for m in ("AP", "AP50", "AP75")))
    return "\n".join(rows)


# ---------------------------------------------------------------- building a run


def encoder_init(init, preset, patch_size, in_chans):
    """--init -> (ViTConfig, (encoder state, the checkpoint's model config) or None, (mean, std) or None): a
    checkpoint of ours brings its encoder config and input statistics; a bare state dict and scratch take the flags."""
    fallback = vit_config(preset, patch_size=patch_size, in_chans=in_chans or 3)
    vit, state, config = weights.encoder_from_init(init, fallback)
    if state is None:
        return vit, None, None
    source = config.get("model", {})
    stats = (tuple(source["mean"]), tuple(source["std"])) if "mean" in source else None
    if in_chans and in_chans != vit.in_chans:
        engine.fail(f"--in-chans {in_chans}: the encoder of {init} takes {vit.in_chans} channel(s); leave it out")
    return vit, (state, source), stats


def build_detector(cfg, pretrained, path, main=True):
    """The Detector with the encoder weights of `pretrained` (state, its model config; None: scratch) loaded."""
    model = Detector(cfg)
    if pretrained is not None:
        weights.load_encoder(model.rcnn.backbone.encoder, *pretrained, path, main)
    elif main:
        print("encoder: random weights (--init scratch)")
    return model


def prepare(
    init, root, img_size, preset, patch_size, window, global_blocks, anchor_size, proposals, in_chans=None, mean=(),
    std=(), xavier_init=False, drop_path=0.0, rois=512, scale_range=(0.1, 2.0), main=True,
):
    """The DetectConfig, the encoder weights (None for scratch) and the splits of `root`.

    Images are read with the encoder's channels and normalised with --mean / --std, else the encoder's pretraining
    statistics, else ImageNet's: a scratch row given a PART row's flags sees the same inputs.
    """
    train_set = CocoDetection(root, "train2017", transform=train_transform(img_size, scale_range))
    val_set = CocoDetection(root, "val2017")
    data_chans = max(train_set.in_chans, val_set.in_chans) if init == "scratch" else None
    vit, pretrained, stats = encoder_init(init, preset, patch_size, in_chans or data_chans)
    if vit.in_chans not in (1, 3):
        given = f"--in-chans {in_chans}" if in_chans else f"{init}: its encoder takes {vit.in_chans} channels"
        raise engine.UserError(f"{given}, but detect.py reads images as 1 (grayscale) or 3 (RGB) channels")
    train_set.in_chans = val_set.in_chans = vit.in_chans
    info = data.data_info("images", in_chans=vit.in_chans, mean=mean, std=std)  # which checks --mean and --std
    if mean or std:
        stats = (tuple(mean), tuple(std))
    mean, std = stats or (info.mean, info.std)
    grid = (img_size // vit.patch_size,) * 2
    vit = replace(
        vit, pos_grid=grid, drop_path=drop_path, window=window, global_blocks=global_blocks, xavier_init=xavier_init
    )
    cfg = DetectConfig(
        vit=vit, num_classes=len(train_set.cat_ids), masks=train_set.masks, img_size=img_size, rois=rois,
        anchor_size=anchor_size, proposals=proposals, mean=mean, std=std,
    )
    if main:
        origin = "--mean / --std or the encoder's pretraining" if stats else "ImageNet's"
        values = f"mean {', '.join(f'{m:.3f}' for m in mean)}, std {', '.join(f'{s:.3f}' for s in std)}"
        print(f"input: {vit.in_chans} channel(s), {values} ({origin}), padded to a {img_size}x{img_size} canvas")
    return cfg, pretrained, train_set, val_set


# ---------------------------------------------------------------- CLI


class DefaultGroup(cli.Cli):
    """`python detect.py [flags]` means `python detect.py train [flags]`."""

    def parse_args(self, ctx, args):
        if not args or (args[0] not in self.commands and args[0].startswith("-") and args[0] not in ("--help", "-h")):
            args = ["train", *args]
        return super().parse_args(ctx, args)


@click.group(cls=DefaultGroup)
def main():
    """Detection and instance segmentation transfer (section 5.2). A bare `python detect.py [flags]` runs
    `train` on the embedded nuclei data (or --data-dir, COCO layout). See README.md."""


data_options = cli.options(
    click.option(
        "--data-dir", help="COCO layout: annotations/instances_{train,val}2017.json, train2017/, val2017/; default: "
        "the nuclei tiles, written to OUT_DIR/nuclei",
    ),
    click.option(
        "--out-dir", default="out/detect", show_default=True, help=cli.OUT_DIR_HELP + "; nuclei/ the default data"
    ),
    section="data",
)


# the detector's flags; their defaults are the embedded default's (the paper's in the help)
model_options = cli.options(
    click.option(
        "--img-size", type=cli.POSITIVE, default=NUCLEI_TILE, show_default=True,
        help="longest side, and the square canvas every image is padded to; ViTDet: 1024",
    ),
    click.option(
        "--preset", type=click.Choice(list(PRESETS)), default="vit_mini", show_default=True,
        help="for scratch or a bare state dict; a PART checkpoint brings its own",
    ),
    click.option("--patch-size", type=cli.POSITIVE, default=4, show_default=True, help="as --preset"),
    click.option(
        "--in-chans", type=cli.POSITIVE, help="channels the images are read with: default the encoder's; for scratch 3 "
        "if any image is colour, else 1 (1 reads colour as grey)",
    ),
    click.option(
        "--mean", type=cli.Finite(), multiple=True, help="input mean per channel (repeat the flag); default: the "
        "statistics the encoder was pretrained with, else ImageNet's (averaged for grayscale)",
    ),
    click.option("--std", type=cli.Finite(), multiple=True, help="input std per channel, as --mean"),
    click.option(
        "--xavier-init", is_flag=True, help=cli.XAVIER_HELP + "; for the encoder: the weights --init brings are kept"
    ),
    click.option(
        "--window", type=cli.COUNT, default=0, show_default=True,
        help="window attention in tokens, 0: global (ViTDet: 14)",
    ),
    click.option(
        "--global-blocks", type=cli.CommaList(int), default=(),
        help="blocks that stay global with --window, e.g. 2,5,8,11 (ViTDet)",
    ),
    click.option(
        "--anchor-size", type=cli.POSITIVE, default=16, show_default=True,
        help="anchor side at stride 4, doubling per level (COCO: 32)",
    ),
    click.option(
        "--proposals", type=cli.POSITIVE, default=300, show_default=True,
        help="RPN proposals per image after NMS (ViTDet: 1000)",
    ),
    section="model",
)


@main.command("train")
@click.option(
    "--init", default=weights.DEFAULT_INIT, show_default=True,
    help="a PART checkpoint (train.py pretrain), an encoder state dict (train.py export), or scratch",
)
@data_options
@model_options
@click.option(
    "--drop-path", type=cli.Finite(0, 1, max_open=True), default=0.0, show_default=True,
    help="stochastic depth; ViTDet, ViT-B: 0.1",
)
@click.option(
    "--rois", type=cli.POSITIVE, default=64, show_default=True, help="RoIs per image for the box head (ViTDet: 512)"
)
@click.option(
    "--scale-range", type=cli.Finite(min=0, min_open=True), nargs=2, default=(0.5, 2.0), show_default=True,
    help="large-scale jitter of training images (ViTDet: 0.1 2.0)",
)
@cli.recipe_options(
    epochs=6, batch_size=4, blr=1e-2, warmup_epochs=0.5, weight_decay=0.1, layer_decay=0.7, beta2=0.999,
    lr_drops="4,5.5", log_every=5,
)
def train_cmd(init, data_dir, out_dir, **kwargs):
    """Finetune Mask R-CNN end to end: AdamW, layer decay 0.7, warmup, x0.1 at 2/3 and 11/12 of the run (ViTDet's
    1x: epochs 8 and 11 of 12). The defaults are the embedded default's; see README.md for COCO's.
    --init scratch trains with the same recipe, layer decay included (the paper follows ViTDet)."""
    recipe = cli.recipe_from(kwargs)

    def command(dd):
        root = data_root(data_dir, out_dir, dd)
        cfg, pretrained, train_set, val_set = prepare(init, root, **kwargs, main=dd.main)
        torch.manual_seed(recipe.seed)  # the same initial heads on every process
        model = build_detector(cfg, pretrained, init, dd.main)
        config = {"kind": "detect", "data": root, "init": init, "model": asdict(cfg), "recipe": asdict(recipe)}
        set_grad_checkpointing(model, recipe.grad_ckpt)
        if recipe.compile:  # the ViT alone: torchvision's heads break the graph and recompile with every image count
            model.rcnn.backbone.encoder.compile()
        # torchvision decodes boxes in the dtype of the regression outputs, and bf16 would round coordinates by up to
        # 4 px at 1024: the heads run in fp32 and only the backbone under autocast (ViTBackbone), so fit adds none
        metrics = engine.fit(
            model, train_set, val_set, replace(recipe, compile=False), out_dir, config, dd, best_key="AP_box",
            evaluate_fn=evaluate,
            precision=lambda device: contextlib.nullcontext(), collate_fn=collate,
        )
        if dd.main and metrics:
            print(f"held-out COCO metrics, {len(val_set)} images of {root}/val2017:\n{table(metrics)}")

    engine.run(command)


def trained_detector(ckpt, data_dir):
    """A detect.py checkpoint's Detector and held-out split (its own data unless --data-dir)."""
    state, config = weights.read_checkpoint(ckpt, ("detect",))
    cfg = DetectConfig(**config["model"])
    val_set = CocoDetection(data_dir or config["data"], "val2017", cfg.vit.in_chans)
    model = Detector(cfg)
    model.load_state_dict(state["model"])
    return model, val_set


@main.command("eval")
@click.option("--ckpt", help="a detect.py checkpoint (out/detect/checkpoint.pt)")
@click.option("--init", help="instead of --ckpt: the untrained detector on this encoder (PATH or scratch)")
@data_options
@model_options
@click.option("--batch-size", type=cli.POSITIVE, default=4, show_default=True, help="images per evaluation batch")
@click.option("--seed", type=int, default=0, show_default=True, help="the untrained heads' initialisation, with --init")
def eval_cmd(ckpt, init, data_dir, out_dir, batch_size, seed, **model):
    """COCOeval on the held-out split (val2017) of a trained detector, or of an untrained one with --init."""
    if (ckpt is None) == (init is None):
        engine.fail("pass --ckpt (a trained detector) or --init (an untrained one), one of them")

    def command(dd):
        if ckpt:
            detector, val_set = trained_detector(ckpt, data_dir)
        else:
            cfg, pretrained, _, val_set = prepare(init, data_root(data_dir, out_dir, dd), **model, main=dd.main)
            torch.manual_seed(seed)
            detector = build_detector(cfg, pretrained, init, dd.main)
        loader = engine.make_loader(val_set, batch_size, dd, 0, 0, False, collate)
        metrics = evaluate(detector.to(dd.device), loader, dd, 0)
        if dd.main:
            name = ckpt or f"the untrained detector on --init {init}"
            print(f"{name}, {len(val_set)} held-out images of {val_set.image_dir}:\n{table(metrics)}")

    engine.run(command)


if __name__ == "__main__":
    main()
