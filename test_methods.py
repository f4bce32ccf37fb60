"""The pretraining methods beside PART (MAE, DropPos, MP3), PART's --pos-mask reading, the baselines' own
initialisation and finetuning protocols, and every method's checkpoints downstream."""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from click.testing import CliRunner

import baselines
import bench
import detect
import engine
import part
import sleep1d
import weights
from conftest import TINY_RUN, invoke, tiny_config, tiny_run, write_coco
from vit import Block, VisionTransformer, patchify, resize_pos_embed, sincos_embed, vit_config


def method_config(method, **overrides):
    """A tiny 2D config of `method`: vit_test / 4 on 16 x 16 grey images."""
    base = tiny_config()
    return baselines.pretext_config(
        method, vit=base.vit, img_size=(16, 16), mean=(0.5,), std=(0.25,), **{"num_pairs": 32, **overrides}
    )


def independent_patches(images, P):
    """(B, C, H, W) -> (B, N, C*P*P) in raster order, by slicing each patch out in a loop."""
    B, C, H, W = images.shape
    return torch.stack(
        [
            torch.stack([images[b, :, y : y + P, x : x + P].flatten() for y in range(0, H, P) for x in range(0, W, P)])
            for b in range(B)
        ]
    )


def spy(monkeypatch, module, name, seen):
    """Record every value `module.name` returns in seen[name], a list."""
    fn = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: seen.setdefault(name, []).append(fn(*a, **k)) or seen[name][-1])


# ---------------------------------------------------------------- MAE


@pytest.mark.parametrize("class_token", [False, True], ids=["ours", "official-class-token"])
def test_mae_masks_the_asked_share_and_regresses_the_normalised_pixels_of_exactly_those(monkeypatch, class_token):
    torch.manual_seed(0)
    model = baselines.MAE(method_config("mae", mask_ratio=0.75, class_token=class_token))
    seen = {}
    spy(monkeypatch, baselines, "random_split", seen)
    spy(monkeypatch, model.encoder, "forward_features", seen)
    decoded = []  # predicts 0 for every pixel of every token it is given
    monkeypatch.setattr(model.decoder, "forward", lambda x: decoded.append(x) or torch.zeros(*x.shape[:2], 16))
    images = torch.randint(0, 256, (3, 1, 16, 16), dtype=torch.uint8)
    loss, _ = model(images)
    kept, masked = seen["random_split"][0]
    assert kept.shape == (3, 4) and masked.shape == (3, 12)  # 75% of the 16 patches
    c = int(class_token)  # the official code's class token goes through the encoder and the decoder, then is dropped
    assert seen["forward_features"][0].shape == (3, c + 4, 32) and decoded[0].shape == (3, c + 16, 128)
    assert all(sorted(k + m) == list(range(16)) for k, m in zip(kept.tolist(), masked.tolist()))
    x = independent_patches((images.double() / 255 - 0.5) / 0.25, 4)  # (B, 16, 16)
    target = (x - x.mean(-1, keepdim=True)) / (x.var(-1, keepdim=True) + 1e-6).sqrt()
    expected = (
        torch.stack([target[b, masked[b]] for b in range(3)]).square().mean()
    )  # zero prediction: MSE = mean target^2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert expected.item() == pytest.approx(
        15 / 16, rel=1e-3
    )  # normalised with the unbiased variance, mean square (n-1)/n


def test_mae_loss_ignores_the_visible_patches(monkeypatch):
    torch.manual_seed(0)
    model = baselines.MAE(method_config("mae"))
    images = torch.randint(0, 256, (2, 1, 16, 16), dtype=torch.uint8)
    seen = {}
    spy(monkeypatch, baselines, "random_split", seen)
    x = independent_patches(model.normalize(images).double(), 4).float()
    target = (x - x.mean(-1, keepdim=True)) / (x.var(-1, keepdim=True) + 1e-6).sqrt()

    def predict(_):  # right on the masked patches, far off on the visible ones
        kept, _ = seen["random_split"][-1]
        return target + 100 * part.as_mask(kept, 16)[..., None]

    monkeypatch.setattr(model.decoder, "forward", predict)
    loss, _ = model(images)
    assert loss.item() < 1e-6


# ---------------------------------------------------------------- DropPos


def test_droppos_targets_are_the_true_grid_indices_of_the_dropped_tokens_only():
    torch.manual_seed(0)
    model = baselines.DropPos(method_config("droppos", sigma=0.0))
    images = torch.randint(0, 256, (3, 1, 16, 16), dtype=torch.uint8)
    visible, kept, dropped = model.sample(patchify(model.normalize(images), 4))
    assert (
        visible.shape == (3, 4, 1, 4, 4) and (dropped.sum(dim=1) == 3).all()
    )  # 25% of 16 visible, 75% of those dropped
    grid = patchify(model.normalize(images), 4)
    for b in range(3):  # each visible patch is the on-grid patch whose index is its target
        torch.testing.assert_close(visible[b], grid[b, kept[b]])
    logits = torch.randn(3, 4, 16)
    right = logits.scatter(2, kept[..., None], 100.0)  # every token's true index far ahead
    loss, metrics = model.loss(torch.where(dropped[..., None], right, logits), kept, dropped)
    assert loss.item() < 1e-6 and metrics["pos_acc"].item() == 1.0
    loss_other, _ = model.loss(
        torch.where(dropped[..., None], right, logits + 5 * torch.randn(3, 4, 16)), kept, dropped
    )
    assert loss_other.item() == loss.item()  # the tokens that kept their position embedding do not count
    one = dropped & (torch.arange(4) == dropped.float().argmax(dim=1, keepdim=True))  # one dropped token per item
    loss_wrong, _ = model.loss(torch.where(one[..., None], logits, right), kept, dropped)
    assert loss_wrong.item() > 1


def test_droppos_attentive_weights_are_its_class_token_similarity_over_the_dropped_visible_tokens(monkeypatch):
    """--attentive, DropPos' attn_guide (models_DropPos_mae.py get_feature_similarity, forward_encoder and
    forward_drop_pos_loss), written out here from its code."""
    torch.manual_seed(0)
    model = baselines.DropPos(method_config("droppos", class_token=True, attentive=True))
    with torch.no_grad():
        model.encoder.cls_token.normal_()  # a class token far from its init, so that similarities spread
    images = torch.randint(0, 256, (3, 1, 16, 16), dtype=torch.uint8)
    patches = patchify(model.normalize(images), 4)  # (3, 16, 1, 4, 4)
    encoder = model.encoder
    with torch.no_grad():  # every patch with its sin-cos, the class token first at position slot zero
        x = torch.cat([encoder.cls_token.expand(3, -1, -1), encoder.patch_embed(patches) + model.fixed_pos_embed], 1)
        for block in encoder.blocks:
            x = block(x)
        x = encoder.norm(x)
        attention = F.softmax(F.cosine_similarity(x[:, :1], x[:, 1:], dim=-1) / 0.1, dim=-1)  # (3, 16)
    torch.testing.assert_close(model.patch_attention(patches), attention)
    seen, loss = {}, model.loss
    spy(monkeypatch, model, "sample", seen)
    monkeypatch.setattr(model, "loss", lambda *args: seen.setdefault("loss", args) and loss(*args))
    model(images)
    _, kept, dropped = seen["sample"][0]  # (3, 4) visible grid indices, (3, 4) bool: position dropped
    expected = torch.stack([dropped[b] * attention[b, kept[b]] / attention[b, kept[b]].sum() for b in range(3)])
    torch.testing.assert_close(seen["loss"][2], expected)
    assert expected[dropped].std() > 0  # not the plain mean over the dropped tokens


def test_droppos_position_smoothing_and_its_one_hot_limit():
    positions = part.grid_positions(method_config("droppos"))  # (16, 2) patch centres
    smooth = baselines.smoothed_positions(positions, 1.0)
    torch.testing.assert_close(smooth.sum(dim=0), torch.ones(16))  # each column normalised, as DropPos' code
    d2 = ((positions[0] - positions[1]) ** 2).sum()
    assert (smooth[1, 0] / smooth[0, 0]).item() == pytest.approx(math.exp(-d2.item()))  # exp(-|p_i - p_j|^2 / sigma^2)
    torch.testing.assert_close(baselines.smoothed_positions(positions, 0.0), torch.eye(16))
    model = baselines.DropPos(method_config("droppos", sigma=0.0))  # no smoothing: one-hot targets
    logits = torch.randn(1, 4, 16)
    kept, dropped = torch.tensor([[0, 5, 10, 15]]), torch.ones(1, 4, dtype=torch.bool)
    loss, _ = model.loss(logits, kept, dropped)
    assert loss.item() == pytest.approx(torch.nn.functional.cross_entropy(logits[0], kept[0]).item(), rel=1e-5)


def test_droppos_default_target_on_a_3x3_grid_is_its_codes_column_normalised_map():
    vit = vit_config("vit_test", patch_size=4, in_chans=1)
    model = baselines.DropPos(
        baselines.pretext_config("droppos", vit=vit, img_size=(12, 12), mean=(0.5,), std=(0.25,))
    )  # 3 x 3 patches
    sigma = 1.5
    w = [[math.exp(-((i // 3 - j // 3) ** 2 + (i % 3 - j % 3) ** 2) / sigma**2) for j in range(9)] for i in range(9)]
    column = [sum(w[i][j] for i in range(9)) for j in range(9)]
    by_columns = torch.tensor([[w[i][j] / column[j] for j in range(9)] for i in range(9)])
    assert (by_columns.sum(dim=1) - 1).abs().max() > 0.05  # the two differ: a corner's row does not sum to 1
    model.sigma = sigma
    logits = torch.randn(1, 9, 9)
    loss, _ = model.loss(
        logits, torch.arange(9)[None], torch.ones(1, 9, dtype=torch.bool)
    )  # every token dropped, in raster order
    assert loss.item() == pytest.approx(
        -(by_columns * logits[0].log_softmax(dim=-1)).sum(dim=1).mean().item(), rel=1e-5
    )
    torch.testing.assert_close(baselines.smoothed_positions(model.positions, sigma), by_columns)


# ---------------------------------------------------------------- MP3


def hand_masked_attention(block, x, allowed):
    """A pre-norm block whose attention, written out, takes softmax over the allowed keys (B, N) only."""
    B, N, D = x.shape
    nh = block.attn.num_heads
    q, k, v = (block.norm1(x) @ block.attn.qkv.weight.T + block.attn.qkv.bias).split(D, dim=-1)
    heads = lambda t: t.reshape(B, N, nh, D // nh).transpose(1, 2)  # noqa: E731 (B, nh, N, hs)
    scores = heads(q) @ heads(k).transpose(-1, -2) / math.sqrt(D // nh)  # (B, nh, N, N)
    scores = scores.masked_fill(~allowed[:, None, None, :], float("-inf"))
    y = x + block.attn.proj((scores.softmax(dim=-1) @ heads(v)).transpose(1, 2).reshape(B, N, D))
    return y + block.mlp(block.norm2(y))


def test_mp3_attention_over_the_context_equals_a_hand_written_masked_attention():
    torch.manual_seed(0)
    block = Block(32, 4, 4.0, 0.0)
    x = torch.randn(3, 16, 32)
    context = part.random_split(3, 16, 0.75)[0]  # (3, 4): the tokens that give keys and values
    allowed = torch.zeros(3, 16, dtype=torch.bool)
    for b in range(3):
        for j in context[b].tolist():
            allowed[b, j] = True
    expected = hand_masked_attention(block, x, allowed)
    torch.testing.assert_close(block(x, context=context), expected)
    torch.testing.assert_close(block(x), hand_masked_attention(block, x, torch.ones(3, 16, dtype=torch.bool)))
    assert not torch.allclose(block(x), expected, atol=1e-3)


def test_mp3_tokens_outside_the_context_reach_no_other_token_in_any_block():
    torch.manual_seed(0)
    encoder = VisionTransformer(vit_config("vit_test", patch_size=4, in_chans=1))
    patches = torch.randn(2, 16, 1, 4, 4)
    context = part.random_split(2, 16, 0.75)[0]  # (2, 4)
    out = encoder.forward_features(patches, context=context)
    outside, inside = (next(j for j in range(16) if (j in context[0].tolist()) == flag) for flag in (False, True))
    for j, reaches_others in ((outside, False), (inside, True)):
        changed = patches.clone()
        changed[0, j] += 1.0
        moved = (encoder.forward_features(changed, context=context) - out).abs().amax(dim=-1)  # (2, 16)
        others = [i for i in range(16) if i != j]
        assert moved[0, j] > 1e-3 and (moved[1] == 0).all()  # the token itself moves; the other image not at all
        if reaches_others:  # a context token is a key and value of every token
            assert (moved[0, others] > 1e-4).all()
        else:
            assert moved[0, others].max() < 1e-6


def test_mp3_classifies_each_patch_by_its_raster_grid_index_with_keys_from_a_quarter(monkeypatch):
    model = baselines.MP3(method_config("mp3"))  # 16 x 16 images, 4 x 4 patches of 4 px
    index = torch.arange(16, dtype=torch.uint8).view(4, 4)  # patch (row r, column c) filled with r * 4 + c
    images = index.repeat_interleave(4, dim=0).repeat_interleave(4, dim=1)[None, None].expand(2, 1, 16, 16)
    contexts = []

    def encode(patches, context):  # each token: its normalised pixels
        contexts.append(context)
        return patches.flatten(2)

    def classify(tokens):  # certain of the index written in the patch
        written = ((tokens[..., 0] * 0.25 + 0.5) * 255).round().long()
        return 100.0 * F.one_hot(written, 16).float()

    monkeypatch.setattr(model.encoder, "forward_features", encode)
    monkeypatch.setattr(model.head, "forward", classify)
    loss, metrics = model(images)
    assert loss.item() < 1e-6 and metrics["pos_acc"].item() == 1.0  # the targets are the raster indices
    assert contexts[0].shape == (2, 4)  # 75% of the 16 patches give no keys and values
    _, metrics = model(
        index.T.repeat_interleave(4, dim=0).repeat_interleave(4, dim=1)[None, None]
    )  # column-major indices
    assert metrics["pos_acc"].item() == 4 / 16  # right on the diagonal only


def test_mp3_pretrains_from_the_cli_and_its_loss_falls(fake_fmnist, tmp_path):
    result = invoke(
        "pretrain", "--method", "mp3", "--data-dir", fake_fmnist, *tiny_run("mp3"), "--epochs", 4, "--blr", 1e-2,
        "--out-dir", tmp_path,
    )
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r and "pos_acc" in r]
    assert steps[0]["loss"] == pytest.approx(math.log(49), rel=0.01)  # chance among the 7 x 7 grid positions
    assert steps[-1]["loss"] < steps[0]["loss"] - 0.2
    assert [r for r in rows if "val_pos_acc" in r][-1]["val_pos_acc"] > 3 / 49  # held-out position accuracy, 3 x chance


# ---------------------------------------------------------------- initialisation as each method's own code


@pytest.mark.parametrize("xavier", [False, True])
@pytest.mark.parametrize("method", baselines.METHODS)
def test_each_method_initialises_its_linear_layers_as_its_own_code(method, xavier):
    torch.manual_seed(0)
    cfg = method_config(method)
    cfg = dataclasses.replace(cfg, vit=dataclasses.replace(cfg.vit, xavier_init=xavier))
    model = baselines.pretext_model(method, cfg)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) >= 9  # the encoder's 2 blocks x 4, and the pretext's own
    for m in linears:
        w = m.weight.detach()
        if xavier or method in ("mae", "droppos"):  # xavier_uniform: U(-a, a), a = sqrt(6 / (fan_in + fan_out)),
            # std a / sqrt(3); MAE's and DropPos' own, the others' with --xavier-init
            bound = math.sqrt(6 / sum(w.shape))
            assert w.abs().max() <= bound
            expected = bound / math.sqrt(3)
        else:  # DeiT's trunc_normal(0.02)
            expected = 0.02
        if w.numel() >= 512:  # enough weights for their std to be within 10%
            assert w.std().item() == pytest.approx(expected, rel=0.1)
        assert (m.bias == 0).all()
    for m in model.modules():
        if isinstance(m, nn.LayerNorm):
            assert (m.weight == 1).all() and (m.bias == 0).all()


# ---------------------------------------------------------------- every method learns, in 2D and 1D


@pytest.mark.parametrize("method", baselines.METHODS)
def test_each_method_lowers_its_loss_in_a_few_steps(method):
    torch.manual_seed(0)
    smoothing = {"sigma": 0.0} if method == "droppos" else {}  # one-hot positions: the loss can approach 0
    model = baselines.pretext_model(method, method_config(method, **smoothing))
    images = torch.zeros(8, 1, 16, 16)
    images[:, :, 4:12, 2:10] = torch.rand(8, 1, 1, 1)  # a bright square on black
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        torch.manual_seed(len(losses) % 3)  # a few fixed draws, so the loss can fall within 30 steps
        loss, _ = model(images)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])


@pytest.mark.parametrize("method", baselines.METHODS)
def test_each_method_runs_on_1d_signals(method):
    vit = sleep1d.eeg_vit("eeg_test", 100, 6)
    official = {"class_token": True, "attentive": True} if method == "droppos" else {"class_token": True}
    for fields in ({}, official) if method in ("mae", "droppos") else ({},):
        cfg = baselines.pretext_config(
            method, vit=vit, img_size=(3000,), **sleep1d.signal_stats(vit), num_patches=40, num_pairs=64, **fields
        )
        loss, metrics = baselines.pretext_model(method, cfg)(torch.randn(2, 6, 3000))
        assert loss.ndim == 0 and math.isfinite(loss.item()) and "loss" in metrics


# ---------------------------------------------------------------- PART --pos-mask (sleep1d's second reading of 8.1)


def pos_mask_part(**overrides):
    vit = sleep1d.eeg_vit("eeg_test", 100, 6)
    cfg = baselines.pretext_config(
        "part", vit=vit, **sleep1d.signal_stats(vit),
        **{"img_size": (3000,), "num_patches": 40, "num_pairs": 256, "pos_mask": 0.2, **overrides},
    )
    return part.PART(cfg)


def test_pos_mask_gives_masked_windows_no_position_and_the_others_their_start_time():
    model = pos_mask_part()
    boxes = part.sample_boxes(4, (3000,), 100, 40, "offgrid")  # (B, N, 2)
    masked = part.as_mask(part.random_split(4, 40, 0.2)[1], 40)  # (B, N)
    assert (masked.sum(dim=1) == 8).all()  # 20% of 40
    pos = model.positions(boxes, masked)  # (B, N, D)
    moved = boxes + torch.rand(4, 40, 1) * 500 * masked[..., None]  # shift only the masked windows
    torch.testing.assert_close(model.positions(moved, masked), pos)  # their input does not depend on where they are
    assert (pos[masked] == 0).all()
    t0 = boxes[..., 0][
        ~masked
    ]  # the unmasked: the sin-cos embedding of the window's centre, a function of its start alone
    torch.testing.assert_close(pos[~masked], sincos_embed((t0[:, None] + 50) / 100, 32))
    other = boxes.clone()
    other[~masked] += 1.0
    assert not torch.allclose(model.positions(other, masked)[~masked], pos[~masked])


def test_pos_mask_share_is_fresh_per_sample_and_twenty_percent():
    torch.manual_seed(0)
    masks = torch.stack([part.as_mask(part.random_split(1, 40, 0.2)[1], 40)[0] for _ in range(500)]).float()
    assert (masks.sum(dim=1) == 8).all()
    assert masks.mean(dim=0).sub(0.2).abs().max() < 0.08  # every window is masked about 20% of the time


def test_pos_mask_loss_covers_exactly_the_pairs_with_a_masked_window(monkeypatch):
    torch.manual_seed(0)
    seen = {}
    for name in ("random_split", "sample_pairs", "relative_targets"):
        spy(monkeypatch, part, name, seen)
    model = pos_mask_part(num_pairs=256)
    model(torch.randn(3, 6, 3000))
    masked = part.as_mask(seen["random_split"][0][1], 40)  # (B, N)
    pairs = seen["sample_pairs"][0]  # (B, K, 2)
    involved = torch.gather(masked, 1, pairs[..., 0]) | torch.gather(masked, 1, pairs[..., 1])
    assert involved.all() and pairs.shape == (3, 256, 2)
    with pytest.raises(engine.UserError, match="more than the 576 ordered pairs of 40 patches with one of the 8 masked"):
        pos_mask_part(num_pairs=577)


def test_context_spans_consecutive_epochs_of_one_night_and_targets_are_window_shifts(monkeypatch):
    n, L = 7, 3000
    epochs = torch.arange(n, dtype=torch.float16)[:, None, None].expand(n, 6, L).clone()  # epoch i is constant i
    nights = torch.tensor([0, 0, 0, 0, 1, 1, 1])
    starts = torch.tensor([0, 1, 2, 4, 0, 1, 2]) * L  # night 0 has a gap after its third epoch
    ds = sleep1d.ContextEpochs(
        sleep1d.SleepEpochs(epochs, torch.zeros(n, dtype=torch.long), nights, starts), 2
    )
    assert ds.first.tolist() == [0, 1, 4, 5]  # no run across the gap or across nights
    x, _ = ds[2]
    assert x.shape == (6, 2 * L) and x[0, 0] == 4 and x[0, -1] == 5
    seen = {}
    for name in ("sample_boxes", "sample_pairs"):
        spy(monkeypatch, part, name, seen)
    spy(monkeypatch, part, "relative_targets", seen)
    model = pos_mask_part(img_size=(2 * L,), num_patches=80, num_pairs=512)
    model(torch.stack([ds[i][0] for i in range(4)]).float())
    boxes, pairs, target = seen["sample_boxes"][0], seen["sample_pairs"][0], seen["relative_targets"][0]
    assert (
        (boxes[..., 0] >= 0).all() and (boxes[..., 1] <= 2 * L).all() and boxes[..., 0].max() > L
    )  # windows over the whole span
    t0 = boxes[..., 0].double().numpy()
    expected = np.stack([(t0[b, pairs[b, :, 1]] - t0[b, pairs[b, :, 0]]) / 100 for b in range(4)])[..., None]
    np.testing.assert_allclose(target.numpy(), expected, rtol=1e-5, atol=1e-3)


# ---------------------------------------------------------------- every method's checkpoints downstream


@pytest.mark.slow
@pytest.mark.parametrize("method", baselines.METHODS)
def test_checkpoints_load_into_finetune_knn_and_detect(method, fake_fmnist, tmp_path):
    pre = tmp_path / "pre"
    assert (
        invoke(
            "pretrain", "--method", method, "--data-dir", fake_fmnist, *tiny_run(method), "--epochs", 1, "--out-dir",
            pre,
        ).exit_code
        == 0
    )
    ckpt = pre / "checkpoint.pt"
    pretrained = torch.load(ckpt, weights_only=True)["model"]
    positions = "fixed_pos_embed" in pretrained  # MAE's and DropPos' sin-cos; PART and MP3 pretrain without
    assert positions == (method in ("mae", "droppos"))
    result = invoke(
        "finetune", "--init", ckpt, "--data-dir", fake_fmnist, *TINY_RUN[:2], "--batch-size", 32, "--epochs", 1,
        "--out-dir", tmp_path / "ft",
    )
    expected = (
        "pos_embed kept, class token's slot new" if positions else "new: cls_token, pos_embed, head.weight, head.bias"
    )
    assert result.exit_code == 0 and expected in result.output, result.output
    ft = torch.load(tmp_path / "ft" / "checkpoint.pt", weights_only=True)["model"]
    assert ft["encoder.pos_embed"].shape == (1, 50, 32)
    result = invoke(
        "finetune", "--init", ckpt, "--linear-probe", "--data-dir", fake_fmnist, *TINY_RUN[:2], "--batch-size", 32,
        "--epochs", 1, "--out-dir", tmp_path / "probe",
    )
    assert result.exit_code == 0, result.output
    probe = torch.load(tmp_path / "probe" / "checkpoint.pt", weights_only=True)["model"]
    torch.testing.assert_close(probe["encoder.blocks.1.mlp.fc2.weight"], pretrained["encoder.blocks.1.mlp.fc2.weight"])
    if positions:  # probed with its pretraining positions; the others with none, as pretrained
        torch.testing.assert_close(probe["encoder.pos_embed"][:, 1:], pretrained["fixed_pos_embed"])
    else:
        assert "encoder.pos_embed" not in probe
    result = invoke("knn", "--ckpt", ckpt, "--data-dir", fake_fmnist)
    assert result.exit_code == 0 and "kNN top-1" in result.output, result.output
    frozen, _, _ = weights.frozen_encoder(str(ckpt), random_init=False)
    if positions:  # kNN reads the tokens as pretrained, with positions
        torch.testing.assert_close(frozen.pos_embed, pretrained["fixed_pos_embed"])
    else:
        assert frozen.pos_embed is None
    coco = write_coco(tmp_path / "coco")
    cfg, start, _, _ = detect.prepare(
        str(ckpt), str(coco), img_size=64, preset="vit_mini", patch_size=16, window=0, global_blocks=(), anchor_size=16,
        proposals=50,
    )
    encoder = detect.build_detector(cfg, start, str(ckpt), main=False).rcnn.backbone.encoder
    torch.testing.assert_close(
        encoder.state_dict()["blocks.1.mlp.fc2.weight"], pretrained["encoder.blocks.1.mlp.fc2.weight"]
    )
    if positions:
        pos = resize_pos_embed(
            pretrained["fixed_pos_embed"], (7, 7), (16, 16), 0
        )  # the 7 x 7 sin-cos, interpolated to the 16 x 16 canvas
        torch.testing.assert_close(encoder.state_dict()["pos_embed"], pos)


@pytest.mark.slow
@pytest.mark.parametrize("method, flags", [("mae", ["--class-token"]), ("droppos", ["--class-token", "--attentive"])])
def test_a_class_token_pretrained_as_the_official_code_carries_into_finetune_knn_and_detect(
    method, flags, fake_fmnist, tmp_path
):
    pre = tmp_path / "pre"
    result = invoke(
        "pretrain", "--method", method, *flags, "--data-dir", fake_fmnist, *tiny_run(method), "--epochs", 3, "--blr",
        1e-2, "--out-dir", pre,
    )
    assert result.exit_code == 0, result.output
    losses = [json.loads(line)["loss"] for line in (pre / "log.jsonl").read_text().splitlines() if '"lr"' in line]
    assert losses[-1] < losses[0]
    pretrained = torch.load(pre / "checkpoint.pt", weights_only=True)["model"]
    assert pretrained["encoder.cls_token"].shape == (1, 1, 32)
    result = invoke(
        "finetune", "--init", pre / "checkpoint.pt", "--data-dir", fake_fmnist, *TINY_RUN[:2], "--batch-size", 32,
        "--epochs", 1, "--freeze-pos-embed", "--out-dir", tmp_path / "ft",
    )  # the class token and its zero position slot come from pretraining, as in the official finetuning
    assert result.exit_code == 0 and "pos_embed kept; new: head.weight, head.bias;" in result.output, result.output
    ft = torch.load(tmp_path / "ft" / "checkpoint.pt", weights_only=True)["model"]
    torch.testing.assert_close(ft["encoder.pos_embed"][:, 0], torch.zeros(1, 32))
    torch.testing.assert_close(ft["encoder.pos_embed"][:, 1:], pretrained["fixed_pos_embed"])
    frozen, _, _ = weights.frozen_encoder(str(pre / "checkpoint.pt"), random_init=False)
    torch.testing.assert_close(frozen.cls_token, pretrained["encoder.cls_token"])
    coco = write_coco(tmp_path / "coco")
    cfg, start, _, _ = detect.prepare(
        str(pre / "checkpoint.pt"), str(coco), img_size=64, preset="vit_mini", patch_size=16, window=0,
        global_blocks=(), anchor_size=16, proposals=50,
    )
    encoder = detect.build_detector(cfg, start, str(pre / "checkpoint.pt"), main=False).rcnn.backbone.encoder
    pos = resize_pos_embed(pretrained["fixed_pos_embed"], (7, 7), (16, 16), 0)  # the detector has no class token
    torch.testing.assert_close(encoder.state_dict()["pos_embed"], pos)


@pytest.mark.parametrize("method", baselines.METHODS)
def test_1d_checkpoints_load_into_sleep_finetune(method, tmp_path):
    tiny = [
        "--synthetic-subjects",
        6,
        "--synthetic-epochs",
        20,
        "--finetune-subjects",
        2,
        "--test-subjects",
        2,
        "--preset",
        "eeg_test",
        "--batch-size",
        16,
        "--epochs",
        1,
    ]
    runner = lambda *a: CliRunner().invoke(sleep1d.main, [str(x) for x in a])  # noqa: E731
    result = runner("pretrain", "--method", method, *tiny, "--out-dir", tmp_path / "pre")
    assert result.exit_code == 0, result.output
    assert torch.load(tmp_path / "pre" / "checkpoint.pt", weights_only=True)["config"]["kind"] == f"{method}1d"
    result = runner(
        "finetune", "--init", tmp_path / "pre" / "checkpoint.pt", *tiny[:-6], "--batch-size", 16, "--epochs", 1,
        "--out-dir", tmp_path / "ft",
    )
    expected = "pos_embed kept" if method in ("mae", "droppos") else "new: cls_token, pos_embed, head.weight, head.bias"
    assert result.exit_code == 0 and expected in result.output, result.output
    ckpt = torch.load(tmp_path / "ft" / "checkpoint.pt", weights_only=True)
    assert ckpt["config"]["kind"] == "sleep-stager" and "kappa" in ckpt["metrics"]


# ---------------------------------------------------------------- the baselines' own finetuning protocols


def finetune_run(init, data, out, *flags):
    return invoke(
        "finetune", "--init", init, *flags, "--data-dir", data, *TINY_RUN[:2], "--batch-size", 32, "--epochs", 1,
        "--out-dir", out,
    )


def shuffle_patches(images, order, P=4):
    """uint8 images (B, C, H, W) with their P x P patches moved: raster slot i takes patch order[i]."""
    B, C, H, W = images.shape
    tiles = images.reshape(B, C, H // P, P, W // P, P).permute(0, 1, 2, 4, 3, 5).reshape(B, C, -1, P, P)[:, :, order]
    return tiles.reshape(B, C, H // P, W // P, P, P).permute(0, 1, 2, 4, 3, 5).reshape(B, C, H, W)


def test_finetune_without_position_embeddings_is_blind_to_the_order_of_the_patches(fake_fmnist, tmp_path):
    pre = tmp_path / "pre" / "checkpoint.pt"
    assert (
        invoke(
            "pretrain", "--method", "mp3", "--data-dir", fake_fmnist, *tiny_run("mp3"), "--epochs", 1, "--out-dir",
            pre.parent,
        ).exit_code
        == 0
    )
    result = finetune_run(pre, fake_fmnist, tmp_path / "ft", "--no-pos-embed")
    assert result.exit_code == 0 and "new: cls_token, head.weight, head.bias" in result.output, result.output
    ckpt = torch.load(tmp_path / "ft" / "checkpoint.pt", weights_only=True)
    assert "encoder.pos_embed" not in ckpt["model"]
    cfg = part.ClassifierConfig(**ckpt["config"]["model"])
    model = part.Classifier(cfg).eval()
    model.load_state_dict(ckpt["model"])
    torch.manual_seed(0)
    images, order = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8), torch.randperm(49)
    torch.testing.assert_close(model.logits(shuffle_patches(images, order)), model.logits(images))
    with_positions = part.Classifier(
        dataclasses.replace(cfg, pos_embed=True)
    ).eval()  # the paper's row: positions added
    with_positions.load_state_dict(ckpt["model"], strict=False)
    assert not torch.allclose(
        with_positions.logits(shuffle_patches(images, order)), with_positions.logits(images), atol=1e-4
    )
    result = finetune_run(pre, fake_fmnist, tmp_path / "frozen", "--freeze-pos-embed")
    assert result.exit_code != 0 and "--freeze-pos-embed keeps pretrained position embeddings" in result.output


def test_droppos_protocol_keeps_its_sin_cos_fixed_and_pools_through_fc_norm(fake_fmnist, tmp_path):
    pre = tmp_path / "pre" / "checkpoint.pt"
    assert (
        invoke(
            "pretrain", "--method", "droppos", "--data-dir", fake_fmnist, *tiny_run("droppos"), "--epochs", 1,
            "--out-dir", pre.parent,
        ).exit_code
        == 0
    )
    result = finetune_run(pre, fake_fmnist, tmp_path / "ft", "--pool", "avg", "--fc-norm", "--freeze-pos-embed")
    assert (
        result.exit_code == 0
        and "fc_norm.weight, fc_norm.bias" in result.output
        and "ignored: norm.weight, norm.bias" in result.output
    )
    ckpt = torch.load(tmp_path / "ft" / "checkpoint.pt", weights_only=True)
    pretrained = torch.load(pre, weights_only=True)["model"]
    torch.testing.assert_close(
        ckpt["model"]["encoder.pos_embed"][:, 1:], pretrained["fixed_pos_embed"]
    )  # unchanged by training
    assert (
        ckpt["model"]["encoder.blocks.0.attn.qkv.weight"].ne(pretrained["encoder.blocks.0.attn.qkv.weight"]).any()
    )  # while the rest learnt
    model = part.Classifier(part.ClassifierConfig(**ckpt["config"]["model"])).eval()
    model.load_state_dict(ckpt["model"])
    images = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8)
    enc = model.encoder
    x = (
        torch.cat([enc.cls_token.expand(2, -1, -1), enc.patch_embed(patchify(model.normalize(images), 4))], dim=1)
        + enc.pos_embed
    )
    for block in enc.blocks:
        x = block(x)
    expected = F.layer_norm(
        x[:, 1:].mean(dim=1), (32,), enc.fc_norm.weight, enc.fc_norm.bias, 1e-6
    )  # MAE: fc_norm(mean), no final norm
    torch.testing.assert_close(enc.pool(part.encode_grid(enc, model.normalize, images)), expected)
    result = finetune_run(pre, fake_fmnist, tmp_path / "cls", "--fc-norm")
    assert (
        result.exit_code != 0
        and "--fc-norm normalises the mean of the patch tokens: it needs --pool avg" in result.output
    )


def test_bench_times_each_method_beside_part():
    result = invoke("bench", "--preset", "vit_test", "--img-size", 16, "--batch-size", 4, "--steps", 1, "--methods")
    assert result.exit_code == 0, result.output
    lines = {
        line.split()[0]: line
        for line in result.output.splitlines()
        if line.split() and line.split()[0] in baselines.METHODS
    }
    assert sorted(lines) == sorted(baselines.METHODS) and "1.00 x PART's" in lines["part"]
    flops = {m: float(line.rsplit(" ", 1)[1]) for m, line in lines.items()}
    assert 0 < flops["droppos"] < flops["mae"]  # DropPos decodes the 4 visible tokens, MAE all 16


def test_droppos_sigma_is_constant_within_an_epoch_and_steps_per_epoch_as_its_code(fake_fmnist, tmp_path, monkeypatch):
    seen = []
    loss = baselines.DropPos.loss
    monkeypatch.setattr(baselines.DropPos, "loss", lambda self, *a: seen.append(self.sigma) or loss(self, *a))
    result = invoke(
        "pretrain", "--method", "droppos", "--sigma", 2.0, "--data-dir", fake_fmnist, *tiny_run("droppos"), "--epochs",
        4, "--out-dir", tmp_path,
    )
    assert result.exit_code == 0, result.output
    per_epoch = len(seen) // 4  # training steps and evaluation batches of one epoch
    assert [sorted(set(seen[e * per_epoch : (e + 1) * per_epoch])) for e in range(4)] == [
        [2.0],
        [1.5],
        [1.0],
        [0.5],
    ]  # (1 - e/E) 2


@pytest.mark.slow
def test_preflight_compiles_every_method_without_graph_breaks_or_recompiles():
    result = invoke(
        "bench", "--preflight", "--preset", "vit_test", "--img-size", 16, "--batch-size", 4, "--steps", 20, "--pairs",
        64,
    )
    assert result.exit_code == 0, result.output
    compiled = [line for line in result.output.splitlines() if " compiled " in line]
    assert len(compiled) == len(bench.preflight_variants()) and any("--pos-mask" in line for line in compiled)
    for line in compiled:  # 20 steps (and 2 warm-ups) each: one graph, traced once
        assert "graphs 1, breaks 0, recompiles 0" in line, line


@pytest.mark.parametrize(
    "method, flags, message",
    [
        ("mae", ["--mask-ratio", 0.999], "--mask-ratio 0.999 leaves no patch of the 49 for the encoder to see"),
        ("mae", ["--mask-ratio", 0.0], "--mask-ratio 0.0 leaves no patch of the 49 to reconstruct"),
        (
            "droppos",
            ["--pos-mask-ratio", 0.0],
            "--pos-mask-ratio 0.0 leaves no patch of the 12 visible to lose its position",
        ),
        ("mp3", ["--mask-ratio", 0.99], "--mask-ratio 0.99 leaves no patch of the 49 to give keys and values"),
        ("droppos", ["--attentive"], "--attentive weighs patches by their similarity to the class token: add --class"),
        ("part", ["--class-token"], "--class-token is not a flag of --method part: it is for mae, droppos"),
    ],
)
def test_ratios_that_leave_nothing_to_learn_stop_before_training(fake_fmnist, tmp_path, method, flags, message):
    result = invoke(
        "pretrain", "--method", method, *flags, "--data-dir", fake_fmnist, *tiny_run(method), "--out-dir",
        tmp_path / "run",
    )
    assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output, result.output
    assert not (tmp_path / "run").exists()
