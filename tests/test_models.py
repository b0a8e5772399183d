"""Segmentation models of the reference trainer: the official output list, gradients, weights
loading (our format, the official repository's, torchvision's MobileNetV2) and clear errors."""
from __future__ import annotations

import re

import pytest
import torch
import torch.nn as nn

from skd_train.models import (MODEL_NAMES, PAIR_FEATURES_INDEX, build_model, load_backbone_weights,
                              load_weights, output_size)
from skd_train.models.weights import imagenet_mobilenet_v2_path

WIDTH = 0.25
# name -> (pair-feature channels, stage channels 4..1 or None) at WIDTH; the paper's sizes times 0.25.
EXPECTED = {
    "pspnet_resnet101": (128, (512, 256, 128, 64)),
    "pspnet_resnet18": (32, (128, 64, 32, 16)),
    "mobilenetv2": (32, (1280, 24, 8, 8)),
    "espnet": (64, (None, 32, 35, 7)),
}


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {name: build_model(name, 5, width=WIDTH) for name in MODEL_NAMES}


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_output_list_has_official_order_and_stride_8_shapes(models, name):
    model = models[name].eval()
    h, w = 65, 90
    with torch.no_grad():
        out = model(torch.randn(2, 3, h, w))
    assert isinstance(out, list) and len(out) == 7
    oh, ow = output_size(h), output_size(w)
    assert out[0].shape == (2, 5, oh, ow)
    if name == "espnet":
        assert out[1] is None
    else:
        assert out[1].shape == (2, 5, oh, ow)
    pair_channels, stages = EXPECTED[name]
    assert out[PAIR_FEATURES_INDEX] is out[2]
    assert out[2].shape == (2, pair_channels, oh, ow)
    for tensor, channels in zip(out[3:], stages):
        if channels is None:
            assert tensor is None
        else:
            assert tensor.shape[:2] == (2, channels) and tensor.shape[2] >= oh


@pytest.mark.parametrize("size", [(512, 16), (64, 97), (33, 50)])
def test_every_model_has_the_teachers_output_grid(models, size):
    # 512 -> 65 as in the paper: students and teacher must compare position by position.
    grids = set()
    for name in MODEL_NAMES:
        with torch.no_grad():
            grids.add(tuple(models[name].eval()(torch.randn(1, 3, *size))[0].shape[-2:]))
    assert grids == {(output_size(size[0]), output_size(size[1]))}
    assert output_size(512) == 65 and output_size(64) == 9


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_gradient_reaches_every_parameter(models, name):
    model = models[name].train()
    model.zero_grad()
    out = model(torch.randn(2, 3, 48, 48))
    loss = out[0].square().mean() + out[2].square().mean() + (0 if out[1] is None else out[1].square().mean())
    loss.backward()
    for pname, param in model.named_parameters():
        assert param.grad is not None, f"{name}: no gradient for {pname}"
        assert torch.isfinite(param.grad).all(), f"{name}: non-finite gradient for {pname}"
    assert sum(p.grad.abs().sum() > 0 for p in model.parameters()) == len(list(model.parameters()))


def test_width_one_teacher_has_the_papers_channels():
    model = build_model("pspnet_resnet101", 19)
    assert model.head.in_channels == 512 and model.dsn[0].in_channels == 1024
    assert model.pspmodule.bottleneck[0].in_channels == 2048 + 4 * 512
    student = build_model("pspnet_resnet18", 19)
    assert student.head.in_channels == 128 and student.dsn[0].in_channels == 256
    assert [student.backbone.conv1.out_channels, student.backbone.conv3.out_channels] == [64, 128]


def test_batchnorms_convert_to_sync_batchnorm(models):
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(build_model("pspnet_resnet18", 3, width=WIDTH))
    kinds = {type(m) for m in converted.modules()}
    assert nn.SyncBatchNorm in kinds and nn.BatchNorm2d not in kinds


def _eval_outputs(model, x):
    with torch.no_grad():
        return model.eval()(x)


@pytest.mark.parametrize("name", ["pspnet_resnet18", "mobilenetv2", "espnet"])  # the teacher is a PSPNet too
def test_weights_round_trip_through_our_state_dict(tmp_path, models, name):
    source = models[name]
    path = tmp_path / "w.pth"
    torch.save(source.state_dict(), path)
    torch.manual_seed(1)
    target = build_model(name, 5, width=WIDTH)
    load_weights(target, path)
    x = torch.randn(1, 3, 40, 40)
    for a, b in zip(_eval_outputs(source, x), _eval_outputs(target, x)):
        assert (a is None and b is None) or torch.equal(a, b)


def _to_official(state: dict, layout: str) -> dict:
    """Our PSPNet state_dict written the way the official code saves it: DataParallel's 'module.',
    the ResNet at the top level, InPlace-ABN norms (no num_batches_tracked), the DSN's classifier at
    index 3; `layout` picks the head names of master ('pspmodule', 'head'), the segmentation toolbox
    ('head.0', 'head.1') or the CVPR student ('layer5', 'layer6')."""
    heads = {"master": ("pspmodule.", "head."), "toolbox": ("head.0.", "head.1."),
             "cvpr": ("layer5.", "layer6.")}[layout]
    official = {}
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        key = key.removeprefix("backbone.")
        key = re.sub(r"^dsn\.4\.", "dsn.3.", key)
        key = re.sub(r"^(pspmodule|head)\.", lambda m: heads[m.group(1) == "head"], key)
        official["module." + key] = value.clone()
    return official


@pytest.mark.parametrize("layout", ["master", "toolbox", "cvpr"])
def test_official_checkpoint_maps_onto_pspnet(tmp_path, models, layout):
    source = models["pspnet_resnet18"]
    official = _to_official(source.state_dict(), layout)
    # Spot-check that the constructed file really uses the official names.
    assert {"module.conv1.weight", "module.bn3.running_var", "module.layer4.1.bn2.weight",
            "module.dsn.3.bias", "module.dsn.1.running_mean"} <= set(official)
    assert not any(k.endswith("num_batches_tracked") for k in official)
    path = tmp_path / "official.pth"
    torch.save({"state_dict": official, "epoch": 3}, path)
    torch.manual_seed(2)
    target = build_model("pspnet_resnet18", 5, width=WIDTH)
    load_weights(target, path)
    x = torch.randn(1, 3, 40, 40)
    for a, b in zip(_eval_outputs(source, x), _eval_outputs(target, x)):
        assert torch.equal(a, b)


def test_resnet_backbone_loads_from_an_official_imagenet_layout(tmp_path, models):
    source = models["pspnet_resnet18"]
    backbone = {k.removeprefix("backbone."): v for k, v in source.state_dict().items() if k.startswith("backbone.")}
    backbone["fc.weight"] = torch.zeros(1000, 128)  # the ImageNet classifier is skipped
    torch.save(backbone, tmp_path / "resnet18-deepstem.pth")
    torch.manual_seed(3)
    target = build_model("pspnet_resnet18", 5, width=WIDTH, pretrained_backbone=tmp_path / "resnet18-deepstem.pth")
    for key, value in target.state_dict().items():
        if key.startswith("backbone."):
            assert torch.equal(value, source.state_dict()[key]), key


def test_missing_weights_file_is_named(tmp_path, models):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_weights(models["espnet"], tmp_path / "nope.pth")


def test_non_checkpoint_file_is_named(tmp_path, models):
    path = tmp_path / "notes.txt"
    path.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="notes.txt.*not a readable PyTorch checkpoint"):
        load_weights(models["espnet"], path)
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="list.pth holds no state_dict"):
        load_weights(models["espnet"], tmp_path / "list.pth")


def test_mismatched_shapes_name_the_keys(tmp_path, models):
    torch.save(build_model("pspnet_resnet18", 5, width=0.5).state_dict(), tmp_path / "wide.pth")
    with pytest.raises(ValueError, match=r"wide.pth.*mismatched shapes.*backbone\.conv1\.weight"):
        load_weights(models["pspnet_resnet18"], tmp_path / "wide.pth")


def test_missing_and_unexpected_keys_are_named(tmp_path, models):
    state = dict(models["pspnet_resnet18"].state_dict())
    del state["head.bias"]
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match=r"partial.pth.*missing head\.bias.*unexpected extra\.weight"):
        load_weights(models["pspnet_resnet18"], tmp_path / "partial.pth")


def test_bad_arguments_have_clear_errors():
    with pytest.raises(ValueError, match="unknown model 'resnet50'.*pspnet_resnet18"):
        build_model("resnet50", 19)
    with pytest.raises(ValueError, match="num_classes"):
        build_model("espnet", 0)
    with pytest.raises(ValueError, match="width"):
        build_model("espnet", 3, width=0)


def _imagenet_weights_present() -> bool:
    try:
        return imagenet_mobilenet_v2_path(download=False).is_file()
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not _imagenet_weights_present(),
                    reason="torchvision's mobilenet_v2-b0353104.pth is not in torch's hub cache (no download in tests)")
def test_imagenet_mobilenet_v2_fills_every_backbone_tensor():
    reference = torch.load(imagenet_mobilenet_v2_path(), map_location="cpu", weights_only=True)
    model = build_model("mobilenetv2", 19)
    loaded = load_backbone_weights(model, "imagenet")
    own = {k: v for k, v in model.state_dict().items() if k.startswith("backbone.")}
    assert sorted(loaded) == sorted(own)  # every backbone tensor, num_batches_tracked included
    for key, value in own.items():
        theirs = reference[key.removeprefix("backbone.")]
        assert value.shape == theirs.shape and torch.equal(value, theirs), key
    with pytest.raises(ValueError, match="mismatched shapes"):
        build_model("mobilenetv2", 19, width=0.5, pretrained_backbone="imagenet")


@pytest.mark.parametrize("student_name", ["pspnet_resnet18", "mobilenetv2", "espnet"])
def test_student_and_teacher_outputs_feed_the_distillation_losses(models, student_name):
    from skd_kernels import CriterionPixelWise
    from skd_kernels.reference import pairwise_distill_reference

    x = torch.randn(2, 3, 64, 64)
    teacher, student = models["pspnet_resnet101"].eval(), models[student_name].train()
    with torch.no_grad():
        preds_t = teacher(x)
    preds_s = student(x)
    pixel = CriterionPixelWise(backend="torch")(preds_s, preds_t)
    pair = pairwise_distill_reference(preds_s[PAIR_FEATURES_INDEX], preds_t[PAIR_FEATURES_INDEX], scale=0.5)
    (10 * pixel + 0.5 * pair).backward()
    assert torch.isfinite(pixel) and pixel > 0 and torch.isfinite(pair) and pair > 0
    # Both losses reach every student parameter but the auxiliary head's, which neither reads.
    assert all(p.grad is not None for n, p in student.named_parameters() if not n.startswith("dsn."))


def _official_espnet_c(sd: dict, x: torch.Tensor, p: int = 2, q: int = 8):
    """The official ESPNet_Encoder forward (network/ESPnet.py) written functionally over a state_dict
    with its key names, eval mode: our ESPNet-C must reproduce it after the key mapping."""
    import torch.nn.functional as F

    def bn(y, name):
        return F.batch_norm(y, sd[f"{name}.running_mean"], sd[f"{name}.running_var"], sd[f"{name}.weight"],
                            sd[f"{name}.bias"], False, 0.0, 1e-3)

    def br(y, name, bn_name=None, act_name=None):
        return F.prelu(bn(y, bn_name or f"{name}.bn"), sd[f"{act_name or name + '.act'}.weight"])

    def esp(y, name, down):
        reduced = F.conv2d(y, sd[f"{name}.c1.conv.weight"], stride=2 if down else 1, padding=1 if down else 0)
        d = [F.conv2d(reduced, sd[f"{name}.d{k}.conv.weight"], padding=k, dilation=k) for k in (1, 2, 4, 8, 16)]
        combine = torch.cat([d[0], d[1], d[1] + d[2], d[1] + d[2] + d[3], d[1] + d[2] + d[3] + d[4]], 1)
        return br(combine, name) if down else br(y + combine, name, f"{name}.bn.bn", f"{name}.bn.act")

    output0 = F.prelu(bn(F.conv2d(x, sd["level1.conv.weight"], stride=2, padding=1), "level1.bn"),
                      sd["level1.act.weight"])
    inp1 = F.avg_pool2d(x, 3, 2, 1)
    inp2 = F.avg_pool2d(inp1, 3, 2, 1)
    output1_0 = esp(br(torch.cat([output0, inp1], 1), "b1"), "level2_0", True)
    output1 = output1_0
    for i in range(p):
        output1 = esp(output1, f"level2.{i}", False)
    output2_0 = esp(br(torch.cat([output1, output1_0, inp2], 1), "b2"), "level3_0", True)
    output2 = output2_0
    for i in range(q):
        output2 = esp(output2, f"level3.{i}", False)
    output2_cat = br(torch.cat([output2_0, output2], 1), "b3")
    return F.conv2d(output2_cat, sd["classifier.conv.weight"]), output2_cat


def _to_official_espnet(state: dict) -> dict:
    """Our ESPNet-C state_dict under the official module names (the inverse of the loader's mapping)."""
    official = {}
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        key = re.sub(r"^level1\.(\d)\.", lambda m: f"level1.{('conv', 'bn', 'act')[int(m[1])]}.", key)
        key = re.sub(r"^(b\d)\.(\d)\.", lambda m: f"{m[1]}.{('bn', 'act')[int(m[2])]}.", key)
        key = re.sub(r"\.reduce\.", ".c1.conv.", key)
        key = re.sub(r"\.branches\.(\d)\.", lambda m: f".d{2 ** int(m[1])}.conv.", key)
        key = re.sub(r"^(level\d_0)\.out\.(\d)\.", lambda m: f"{m[1]}.{('bn', 'act')[int(m[2])]}.", key)
        key = re.sub(r"^(level\d\.\d+)\.out\.(\d)\.", lambda m: f"{m[1]}.bn.{('bn', 'act')[int(m[2])]}.", key)
        key = re.sub(r"^classifier\.weight", "classifier.conv.weight", key)
        official[key] = value.clone()
    return official


def test_official_espnet_c_checkpoint_loads_and_matches_its_forward(tmp_path):
    torch.manual_seed(4)
    source = build_model("espnet", 19)
    for m in source.modules():  # non-trivial statistics and slopes, so the test sees every tensor
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
        elif isinstance(m, nn.PReLU):
            m.weight.data.uniform_(0.0, 0.5)
    official = _to_official_espnet(source.state_dict())
    assert {"level1.act.weight", "level2_0.d16.conv.weight", "level3.7.bn.act.weight", "b2.bn.running_var",
            "classifier.conv.weight"} <= set(official)
    torch.save(official, tmp_path / "ESPNet_C_official.pth")
    torch.manual_seed(5)
    target = load_weights(build_model("espnet", 19), tmp_path / "ESPNet_C_official.pth").eval()
    target.ceil_mode = False  # the official grid, to compare every position
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        ours = target(x)
        logits, features = _official_espnet_c(official, x)
    assert ours[0].shape == logits.shape == (2, 19, 8, 10)
    torch.testing.assert_close(ours[0], logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours[2], features, rtol=1e-4, atol=1e-4)


def test_imagenet_request_without_the_weights_says_how_to_provide_them(monkeypatch, tmp_path):
    def offline(url, dst, hash_prefix=None, progress=True):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    expected = str(tmp_path / "hub" / "checkpoints" / "mobilenet_v2-b0353104.pth")
    with pytest.raises(FileNotFoundError) as info:
        build_model("mobilenetv2", 19, width=WIDTH, pretrained_backbone="imagenet")
    message = str(info.value)
    assert expected in message and "network is unreachable" in message
    assert "download.pytorch.org/models/mobilenet_v2-b0353104.pth" in message and "--pretrained-backbone" in message


def test_imagenet_backbone_is_refused_for_other_models(models):
    with pytest.raises(ValueError, match="'imagenet' backbone weights exist for mobilenetv2 only"):
        build_model("espnet", 19, width=WIDTH, pretrained_backbone="imagenet")


def _official_pspnet_resnet18(sd: dict, x: torch.Tensor):
    """The official PSPNet forward (networks/pspnet_combine.py, BasicBlock [2, 2, 2, 2]) written
    functionally over a state_dict with its key names, eval mode: InPlace-ABN 'none' + ReLU in the
    backbone, InPlace-ABN's leaky ReLU (0.01) in the heads, ceil-mode max-pool, layer3/4 dilated 2/4."""
    import torch.nn.functional as F

    def bn(y, name):
        return F.batch_norm(y, sd[f"{name}.running_mean"], sd[f"{name}.running_var"], sd[f"{name}.weight"],
                            sd[f"{name}.bias"], False, 0.0, 1e-5)

    def conv(y, name, stride=1, dilation=1):
        w = sd[f"{name}.weight"]
        pad = dilation * (w.shape[-1] // 2)
        return F.conv2d(y, w, sd.get(f"{name}.bias"), stride=stride, padding=pad, dilation=dilation)

    y = x
    for i, stride in ((1, 2), (2, 1), (3, 1)):
        y = F.relu(bn(conv(y, f"conv{i}", stride), f"bn{i}"))
    y = F.max_pool2d(y, 3, 2, 1, ceil_mode=True)
    feats = []
    for layer, (stride, dilation) in enumerate(((1, 1), (2, 1), (1, 2), (1, 4)), start=1):
        for block in range(2):
            name = f"layer{layer}.{block}"
            s = stride if block == 0 else 1
            out = F.relu(bn(conv(y, f"{name}.conv1", s, dilation), f"{name}.bn1"))
            out = bn(conv(out, f"{name}.conv2", 1, dilation), f"{name}.bn2")
            residual = bn(conv(y, f"{name}.downsample.0", s), f"{name}.downsample.1") \
                if f"{name}.downsample.0.weight" in sd else y
            y = F.relu(out + residual)
        feats.append(y)
    x1, x2, x3, x4 = feats
    dsn = conv(F.leaky_relu(bn(conv(x3, "dsn.0"), "dsn.1"), 0.01), "dsn.3")
    priors = [F.interpolate(F.leaky_relu(bn(conv(F.adaptive_avg_pool2d(x4, size), f"pspmodule.stages.{i}.1"),
                                            f"pspmodule.stages.{i}.2"), 0.01),
                            size=x4.shape[-2:], mode="bilinear", align_corners=True)
              for i, size in enumerate((1, 2, 3, 6))]
    psp = F.leaky_relu(bn(conv(torch.cat(priors + [x4], 1), "pspmodule.bottleneck.0"), "pspmodule.bottleneck.1"), 0.01)
    return [conv(psp, "head"), dsn, psp, x4, x3, x2, x1]


def test_official_pspnet_checkpoint_reproduces_the_official_forward(tmp_path):
    torch.manual_seed(6)
    source = build_model("pspnet_resnet18", 7, width=WIDTH)
    for m in source.modules():  # non-trivial statistics, so every tensor matters
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.bias.data.uniform_(-0.2, 0.2)
    official = {k.removeprefix("module."): v for k, v in _to_official(source.state_dict(), "master").items()}
    torch.save({f"module.{k}": v for k, v in official.items()}, tmp_path / "CS_scenes_40000.pth")
    torch.manual_seed(7)
    target = load_weights(build_model("pspnet_resnet18", 7, width=WIDTH), tmp_path / "CS_scenes_40000.pth").eval()
    x = torch.randn(2, 3, 72, 56)
    with torch.no_grad():
        ours, expected = target(x), _official_pspnet_resnet18(official, x)
    assert ours[0].shape == (2, 7, 10, 8)
    for index, (a, b) in enumerate(zip(ours, expected)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=f"output {index}")
