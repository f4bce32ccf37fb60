"""weights.py: reading any checkpoint, --init, and exports that timm rebuilds with our outputs."""

import dataclasses
import json

import pytest
import timm
import torch

import baselines
import engine
import part
import weights
from vit import patchify, vit_config

SIZE, MEAN, STD = (
    (12, 16),
    (0.4, 0.5, 0.6),
    (0.2, 0.25, 0.3),
)  # non-square RGB, so H, W and channel orders must all be right


def tiny_vit():
    return vit_config("vit_test", patch_size=4, in_chans=3)


def perturbed(model):
    """The model with every parameter moved off its init (LayerNorms not 1 and 0, biases not 0),
    so that a weight timm read in the wrong place would show."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def export_and_load(tmp_path, model, kind):
    """Export as `train.py export` has it (the config through JSON, as a checkpoint's config would be
    after encoder.json) and rebuild it in timm -> (timm's model in eval mode, timm's normalised images)."""
    model_config = json.loads(json.dumps(model.cfg.to_dict()))
    state = weights.encoder_state_dict({"model": model.state_dict()})
    out = tmp_path / kind
    message = weights.write_timm_export(out, state, model_config, kind, "cifar10")
    assert message.startswith("wrote") and sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "model.safetensors",
    ]  # no .tmp left
    theirs = timm.create_model(
        f"local-dir:{out}", pretrained=True
    ).eval()  # loads strictly: every key by name and shape
    data_config = timm.data.resolve_data_config({}, model=theirs)
    assert (
        data_config["input_size"] == (3, *SIZE)
        and tuple(data_config["mean"]) == MEAN
        and tuple(data_config["std"]) == STD
    )
    images = torch.rand(2, 3, *SIZE)
    normalised = (images - torch.tensor(data_config["mean"]).view(1, 3, 1, 1)) / torch.tensor(data_config["std"]).view(
        1, 3, 1, 1
    )
    return theirs, images, normalised


def test_every_layout_reads_as_the_encoder_and_a_missing_or_misshapen_weight_stops_loading():
    model = part.PART(part.PARTConfig(vit=tiny_vit(), img_size=SIZE, mean=MEAN, std=STD, num_pairs=32))
    own, encoder = model.state_dict(), model.encoder.state_dict()
    for layout in ({"model": own}, {"state_dict": own}, {f"module.{k}": v for k, v in own.items()}, encoder):
        state = weights.encoder_state_dict(layout)  # the relative head's weights dropped
        assert state.keys() == encoder.keys() and all(torch.equal(state[k], encoder[k]) for k in state)

    def classifier(vit):
        config = part.ClassifierConfig(vit=vit, img_size=SIZE, mean=MEAN, std=STD, num_classes=5)
        return part.Classifier(config).encoder

    fresh, unexpected = weights.load_encoder(classifier(tiny_vit()), state)
    assert sorted(fresh) == ["cls_token", "head.bias", "head.weight", "pos_embed"] and unexpected == []
    lacking = {k: v for k, v in state.items() if k != "blocks.0.attn.qkv.weight"}
    with pytest.raises(engine.UserError, match=r"lacks encoder weights \['blocks.0.attn.qkv.weight'\]"):
        weights.load_encoder(classifier(tiny_vit()), lacking)
    with pytest.raises(engine.UserError, match="of another size"):
        weights.load_encoder(classifier(vit_config("vit_test", patch_size=2, in_chans=3)), state)


PRETRAINING = [
    ("part", {"num_pairs": 32}),
    ("part", {"num_pairs": 32, "pos_mask": 0.25}),
    ("mae", {}),
    ("droppos", {}),
    ("mae", {"class_token": True}),
    ("droppos", {"class_token": True, "attentive": True}),
]


@pytest.mark.parametrize(
    "method, fields", PRETRAINING, ids=["part", "part-pos-mask", "mae", "droppos", "mae-cls", "droppos-cls"]
)
def test_pretrained_encoder_in_timm_gives_our_tokens_and_features(tmp_path, method, fields):
    config_class, model_class = baselines.METHODS[method]
    model = perturbed(model_class(config_class(vit=tiny_vit(), img_size=SIZE, mean=MEAN, std=STD, **fields)))
    theirs, images, normalised = export_and_load(tmp_path, model, method)
    pos = getattr(model, "fixed_pos_embed", None)  # the fixed sin-cos embeddings it was pretrained with, if any
    c = int(fields.get("class_token", False))
    if c:  # the class token's position slot: zero, first
        pos = torch.cat([torch.zeros_like(pos[:, :1]), pos], dim=1)
    with torch.no_grad():
        ours = model.encoder.forward_features(patchify(model.normalize(images), 4), pos=pos)  # (B, c + N, D)
        torch.testing.assert_close(theirs.forward_features(normalised), ours, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(theirs(normalised), ours[:, c:].mean(dim=1), atol=1e-5, rtol=1e-5)  # (B, D)
    assert (theirs.pos_embed is None) == (pos is None) and (theirs.cls_token is not None) == bool(c)


CLASSIFIERS = [
    dict(pool="cls"),
    dict(pool="avg"),
    dict(pool="avg", linear_probe=True),
    dict(pool="cls", linear_probe=True, pos_pretrained=True),
]


@pytest.mark.parametrize("fields", CLASSIFIERS, ids=["cls", "avg", "probe", "probe-with-positions"])
def test_classifier_in_timm_gives_our_logits(tmp_path, fields):
    model = perturbed(
        part.Classifier(
            part.ClassifierConfig(vit=tiny_vit(), img_size=SIZE, mean=MEAN, std=STD, num_classes=5, **fields)
        )
    )
    if model.cfg.linear_probe:  # running statistics away from (0, 1), so that folding them into the head matters
        norm = model.encoder.head[0]
        assert norm.eps == weights.PROBE_EPS
        norm.running_mean.copy_(torch.randn(norm.num_features))
        norm.running_var.copy_(torch.rand(norm.num_features) + 0.5)
    theirs, images, normalised = export_and_load(tmp_path, model, "classifier")
    with torch.no_grad():
        torch.testing.assert_close(theirs(normalised), model.logits(images), atol=1e-5, rtol=1e-5)  # (B, classes)
    assert theirs.num_classes == 5 and (theirs.pos_embed is None) == (model.encoder.pos_embed is None)


def test_folded_probe_head_is_the_norm_then_the_linear_head():
    torch.manual_seed(0)
    head = (
        torch.nn.Sequential(torch.nn.BatchNorm1d(8, affine=False, eps=weights.PROBE_EPS), torch.nn.Linear(8, 3))
        .double()
        .eval()
    )
    head[0].running_mean.copy_(torch.randn(8))
    head[0].running_var.copy_(torch.rand(8) * 1e-5)  # variances near eps, where leaving eps out would show
    state = weights.fold_probe_head({f"head.{k}": v for k, v in head.state_dict().items()})
    assert sorted(state) == ["head.bias", "head.weight"]
    x = torch.randn(4, 8, dtype=torch.double)
    torch.testing.assert_close(torch.nn.functional.linear(x, state["head.weight"], state["head.bias"]), head(x))


def test_pretrained_cfg_holds_only_what_timm_accepts(tmp_path):
    model = part.PART(part.PARTConfig(vit=tiny_vit(), img_size=SIZE, mean=MEAN, std=STD, num_pairs=32))
    config = weights.timm_config(model.cfg.to_dict(), "part", "cifar10", positions=False)
    accepted = {f.name for f in dataclasses.fields(timm.models.PretrainedCfg)}
    assert set(config["pretrained_cfg"]) <= accepted
    # that matters: timm's resolve_pretrained_cfg builds PretrainedCfg(**pretrained_cfg), which refuses other keys
    state = weights.encoder_state_dict(model.state_dict())
    weights.write_timm_export(tmp_path, state, model.cfg.to_dict(), "part", "cifar10")
    config["pretrained_cfg"]["epochs"] = 100
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(TypeError, match="epochs"):
        timm.create_model(f"local-dir:{tmp_path}", pretrained=True)


def test_architecture_names_the_timm_vit_of_the_same_size():
    assert weights.timm_architecture(dataclasses.asdict(vit_config("vit_s"))) == "vit_small_patch16_224"
    assert weights.timm_architecture(dataclasses.asdict(vit_config("vit_l"))) == "vit_large_patch16_224"
    assert (
        weights.timm_architecture(dataclasses.asdict(vit_config("vit_mini"))) == "vit_base_patch16_224"
    )  # none in timm
    assert all(timm.is_model(name) for name in weights.TIMM_ARCHITECTURES.values())


def test_one_dimensional_model_is_refused_with_the_reason(tmp_path):
    vit = vit_config("vit_test", patch_size=4, in_chans=1, patch_ndim=1)
    model = part.PART(part.PARTConfig(vit=vit, img_size=(64,), mean=(0.0,), std=(1.0,), num_pairs=32))
    state = weights.encoder_state_dict(model.state_dict())
    assert (
        weights.write_timm_export(tmp_path / "out", state, model.cfg.to_dict(), "part1d", None)
        == "no timm export: timm has no 1D ViT (its vision_transformer takes images)"
    )
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="timm has no 1D ViT"):
        weights.timm_config(model.cfg.to_dict(), "part1d", None, positions=False)


def test_a_file_that_holds_no_dict_is_named_in_one_line(tmp_path):
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(engine.UserError, match=f"{tmp_path / 'list.pt'} holds a list, not a checkpoint or a state dict"):
        weights.read_checkpoint(tmp_path / "list.pt", weights.ENCODER_KINDS[2], foreign=True)
