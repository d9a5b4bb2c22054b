"""Models: architecture, authors' state-dict layout, gates, combination rules, MC dropout, safety."""

import math
import pickle
import warnings
import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from shiftbench.errors import ShiftbenchError
from shiftbench.models import (DeepLabV3Plus, KeyedDropout, MixtureOfExperts, MoEHead, build_gate, load_strict,
                               read_checkpoint, save_checkpoint)
from shiftbench.models.backbones import backbone_spec, dilate_last_stage, feature_grid
from shiftbench.models.checkpoints import check_classes
from shiftbench.models.gates import grid_from_state
from shiftbench.models.moe import combine_logits, combine_probs, logsumexp0
from shiftbench.models.training import confusion_matrix, loss_window, miou
from shiftbench.seeding import key

K = 11


pytestmark = pytest.mark.usefixtures("one_thread")


def _features_shapes(backbone: str, h: int, w: int):
    with torch.device("meta"):
        model = DeepLabV3Plus(backbone, K).eval()
        feats = model.encode(torch.empty(1, 3, h, w))
        aspp, logits = model.forward_features(torch.empty(1, 3, h, w))
    return feats, aspp, logits


@pytest.mark.parametrize("backbone", ["tiny", "resnet18", "resnet50", "resnet101"])
def test_output_strides_and_the_authors_912_feature_map(backbone):
    feats, aspp, logits = _features_shapes(backbone, 912, 912)
    spec = backbone_spec(backbone)
    assert feats["low_level"].shape[1:] == (spec.low_level, 228, 228)       # stride 4
    assert feats["out"].shape[1:] == (spec.out, 57, 57)                     # stride 16
    assert aspp.shape[1:] == (spec.aspp, 57, 57)
    assert logits.shape == (1, K, 912, 912)
    # the authors' gate: FC input hard-coded to 3249 = 57 * 57 (train_deeplab.py, linear_feat = 3249)
    assert 57 * 57 == 3249 and (backbone == "tiny" or spec.gate_grid == (57, 57))


@pytest.mark.parametrize("backbone", ["tiny", "resnet18"])
@pytest.mark.parametrize("size", [(912, 912), (128, 256), (100, 150), (33, 47)])
def test_feature_grid_is_the_stride_16_map(backbone, size):
    _, aspp, _ = _features_shapes(backbone, *size)
    assert tuple(aspp.shape[-2:]) == feature_grid(size)


def test_tiny_gate_grid_is_the_demo_feature_map():
    _, aspp, _ = _features_shapes("tiny", 128, 256)
    assert tuple(aspp.shape[-2:]) == backbone_spec("tiny").gate_grid == (8, 16)


def test_dilated_resnet50_equals_torchvision_replace_stride_with_dilation():
    torch.manual_seed(0)
    ours = torchvision.models.resnet50(weights=None)
    dilate_last_stage(ours.layer4)
    ref = torchvision.models.resnet50(weights=None, replace_stride_with_dilation=[False, False, True])
    ref.load_state_dict(ours.state_dict())
    ours.eval(), ref.eval()
    x = torch.rand(1, 3, 64, 64)
    body = lambda m: m.layer4(m.layer3(m.layer2(m.layer1(m.maxpool(m.relu(m.bn1(m.conv1(x))))))))  # noqa: E731
    with torch.no_grad():
        a, b = body(ours), body(ref)
    assert a.shape == (1, 2048, 4, 4)
    torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------- the authors' layout

def _bn(prefix: str, c: int) -> dict:
    return {f"{prefix}.weight": [c], f"{prefix}.bias": [c], f"{prefix}.running_mean": [c],
            f"{prefix}.running_var": [c], f"{prefix}.num_batches_tracked": []}


def authors_head_shapes(low: int, out: int, classes: int) -> dict:
    """Key -> shape of VainF's / the authors' DeepLabHeadV3Plus (models/deeplab.py), written from
    their code: project 1x1 -> 48, ASPP (1x1, three 3x3, pooling) -> 256, 1x1 over 5*256,
    classifier 3x3 over 48+256 -> 256, 1x1 -> classes."""
    shapes = {"classifier.project.0.weight": [48, low, 1, 1], **_bn("classifier.project.1", 48),
              "classifier.aspp.convs.0.0.weight": [256, out, 1, 1], **_bn("classifier.aspp.convs.0.1", 256)}
    for i in (1, 2, 3):
        shapes.update({f"classifier.aspp.convs.{i}.0.weight": [256, out, 3, 3],
                       **_bn(f"classifier.aspp.convs.{i}.1", 256)})
    shapes.update({"classifier.aspp.convs.4.1.weight": [256, out, 1, 1], **_bn("classifier.aspp.convs.4.2", 256),
                   "classifier.aspp.project.0.weight": [256, 1280, 1, 1], **_bn("classifier.aspp.project.1", 256),
                   "classifier.classifier.0.weight": [256, 304, 3, 3], **_bn("classifier.classifier.1", 256),
                   "classifier.classifier.3.weight": [classes, 256, 1, 1], "classifier.classifier.3.bias": [classes]})
    return shapes


def authors_expert_state(arch: str, low: int, out: int, classes: int) -> dict:
    """A state dict with the authors' names and shapes: their backbone is torchvision's ResNet
    (models/backbone/resnet.py) behind IntermediateLayerGetter, so it keeps every key but fc.*."""
    gen = torch.Generator().manual_seed(1)
    backbone = {f"backbone.{k}": v for k, v in getattr(torchvision.models, arch)(weights=None).state_dict().items()
                if not k.startswith("fc.")}
    head = {k: (torch.randint(0, 5, s, generator=gen) if k.endswith("num_batches_tracked")
                else torch.rand(s, generator=gen)) for k, s in authors_head_shapes(low, out, classes).items()}
    return {**backbone, **head}


def authors_gate_state(kind: str, experts: int, classes: int, in_features: int = 3249) -> dict:
    """The authors' models/gate.py: conv1 (E*256 -> 1, 3x3, bias), fc1 (in_features -> 128), fc2 (128 -> E);
    classwise = gates.{k}.* for every class."""
    simple = {"conv1.weight": [1, 256 * experts, 3, 3], "conv1.bias": [1], "fc1.weight": [128, in_features],
              "fc1.bias": [128], "fc2.weight": [experts, 128], "fc2.bias": [experts]}
    if kind == "simple":
        return {f"gate.{k}": torch.randn(s) * 0.01 for k, s in simple.items()}
    return {f"gate.gates.{c}.{k}": torch.randn(s) * 0.01 for c in range(classes) for k, s in simple.items()}


def test_authors_resnet101_expert_checkpoint_loads(tmp_path):
    state = authors_expert_state("resnet101", 256, 2048, 38)
    model = DeepLabV3Plus("resnet101", 38)
    load_strict(model, state, "authors")
    assert torch.equal(model.state_dict()["classifier.classifier.3.bias"], state["classifier.classifier.3.bias"])
    assert set(model.state_dict()) == set(state)


def test_authors_checkpoint_file_with_numpy_scalar_loads_safely(tmp_path):
    state = authors_expert_state("resnet18", 64, 512, K)
    path = tmp_path / "model_best.pth.tar"
    torch.save({"epoch": 50, "state_dict": state, "best_pred": np.float64(0.71)}, path)  # as their Saver writes
    loaded = read_checkpoint(path)["state_dict"]
    model = DeepLabV3Plus("resnet18", K)
    load_strict(model, loaded, str(path))
    assert torch.equal(model.backbone.layer4[1].conv2.weight, state["backbone.layer4.1.conv2.weight"])



@pytest.mark.parametrize("layout", ["model_state", "data_parallel", "bare"])
def test_checkpoint_layouts_of_other_trainers_load(tmp_path, layout):
    """{'model_state': ...} (VainF's DeepLabV3Plus-Pytorch), 'module.'-prefixed keys (DataParallel) and a bare
    state dict give the same weights."""
    state = authors_expert_state("resnet18", 64, 512, K)
    obj = {"model_state": state, "best_score": np.float64(0.7), "cur_itrs": 3}
    if layout == "data_parallel":
        obj = {"state_dict": {f"module.{k}": v for k, v in state.items()}}
    elif layout == "bare":
        obj = state
    torch.save(obj, tmp_path / "c.pth")
    loaded = read_checkpoint(tmp_path / "c.pth")["state_dict"]
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], v) for k, v in state.items())
    load_strict(DeepLabV3Plus("resnet18", K), loaded, layout)


def test_checkpoint_pickled_under_numpy_1_loads_under_numpy_2(tmp_path):
    # numpy 1 names the scalar constructor numpy.core.multiarray.scalar, numpy 2 numpy._core...; the
    # authors' files (numpy 1.17) hold their best mIoU as such a scalar. Rewrite a file as numpy 1 writes it.
    state = {"classifier.weight": torch.arange(6.0)}
    new, old = tmp_path / "np2.pth", tmp_path / "np1.pth"
    torch.save({"state_dict": state, "best_pred": np.float64(0.71)}, new)
    with zipfile.ZipFile(new) as src, zipfile.ZipFile(old, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("data.pkl"):
                here = np.float64.__reduce__(np.float64(0))[0].__module__.encode()  # where numpy pickles it from
                data = data.replace(here + b"\nscalar", b"numpy.core.multiarray\nscalar")
                assert b"numpy.core.multiarray\nscalar" in data
            dst.writestr(info, data)
    assert torch.equal(read_checkpoint(old)["state_dict"]["classifier.weight"], state["classifier.weight"])


@pytest.mark.parametrize("gate", ["simple", "classwise"])
def test_authors_moe_state_dict_loads(gate):
    experts = authors_expert_state("resnet18", 64, 512, K)
    state = {**{f"expert1.{k}": v for k, v in experts.items()}, **{f"expert2.{k}": v for k, v in experts.items()},
             **authors_gate_state(gate, 2, K), "final_conv.weight": torch.randn(K, K, 3, 3)}
    assert grid_from_state(state, "authors") == (57, 57)
    moe = MixtureOfExperts([DeepLabV3Plus("resnet18", K), DeepLabV3Plus("resnet18", K)], gate, K, (57, 57),
                           final_conv=True, channels=256)
    load_strict(moe, state, "authors")
    assert torch.equal(moe.final_conv.weight, state["final_conv.weight"])


# --------------------------------------------------------------------------- gates

def authors_gate_forward(features, conv_w, conv_b, w1, b1, w2, b2):
    """Their GateLayerSimple.forward: conv -> relu -> view(B,-1) -> fc1 -> relu -> fc2 -> softmax."""
    h = F.relu(F.conv2d(features, conv_w, conv_b, padding=1)).view(features.shape[0], -1)
    return torch.softmax(F.relu(h @ w1.T + b1) @ w2.T + b2, dim=1)


def adaptive_pool_brute(x, grid):
    """PyTorch's adaptive average pooling bins: rows floor(i*h/gh) .. ceil((i+1)*h/gh)."""
    h, w = x.shape[-2:]
    out = torch.empty(*x.shape[:-2], *grid)
    for i in range(grid[0]):
        for j in range(grid[1]):
            r0, r1 = (i * h) // grid[0], math.ceil((i + 1) * h / grid[0])
            c0, c1 = (j * w) // grid[1], math.ceil((j + 1) * w / grid[1])
            out[..., i, j] = x[..., r0:r1, c0:c1].mean((-2, -1))
    return out


@pytest.mark.parametrize("kind", ["simple", "classwise"])
def test_gate_at_its_grid_equals_the_authors_gate(kind):
    torch.manual_seed(0)
    gate = build_gate(kind, 2 * 8, 2, 3, (5, 7))
    feats = torch.randn(4, 16, 5, 7)
    with torch.no_grad():
        w = gate(feats)
    heads = [gate] if kind == "simple" else list(gate.gates)
    ref = torch.stack([authors_gate_forward(feats, h.conv1.weight, h.conv1.bias, h.fc1.weight, h.fc1.bias,
                                            h.fc2.weight, h.fc2.bias) for h in heads], -1)
    assert w.shape == ((4, 2) if kind == "simple" else (4, 2, 3))
    torch.testing.assert_close(w, ref[..., 0] if kind == "simple" else ref)


@pytest.mark.parametrize("kind", ["simple", "classwise"])
def test_gate_works_at_any_size_by_pooling_to_its_grid(kind):
    torch.manual_seed(0)
    gate = build_gate(kind, 16, 3, 4, (5, 7))
    feats = torch.randn(2, 16, 11, 23)
    with torch.no_grad():
        w = gate(feats)
        heads = [gate] if kind == "simple" else list(gate.gates)
        ref = []
        for h in heads:
            m = adaptive_pool_brute(F.relu(F.conv2d(feats, h.conv1.weight, h.conv1.bias, padding=1)), (5, 7))
            ref.append(torch.softmax(F.relu(m.flatten(1) @ h.fc1.weight.T + h.fc1.bias) @ h.fc2.weight.T
                                     + h.fc2.bias, 1))
    torch.testing.assert_close(w, ref[0] if kind == "simple" else torch.stack(ref, -1))
    torch.testing.assert_close(w.sum(1), torch.ones_like(w.sum(1)))


# --------------------------------------------------------------------------- combination rules

def _expert_outputs(E=3, B=2, H=5, W=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(E, B, K, H, W, generator=g) * 3


@pytest.mark.parametrize("classwise", [False, True])
@pytest.mark.parametrize("with_conv", [False, True])
def test_combine_probs_is_eq1(classwise, with_conv):
    z = _expert_outputs()
    E, B = z.shape[:2]
    w = torch.softmax(torch.randn(B, E, K) if classwise else torch.randn(B, E), dim=1)
    conv = nn.Conv2d(K, K, 3, 1, 1, bias=False) if with_conv else None
    p = torch.zeros(B, K, *z.shape[-2:])
    for i in range(E):  # P_k = sum_i w_ik P_ik
        wi = w[:, i, :, None, None] if classwise else w[:, i, None, None, None]
        p += wi * torch.softmax(z[i], dim=1)
    p = p / p.sum(1, keepdim=True)  # a classwise gate's mixture is renormalised over classes
    if with_conv:
        p = torch.softmax(conv(torch.log(p)), dim=1)
    with torch.no_grad():
        torch.testing.assert_close(combine_probs(z, w, conv).exp(), p, atol=1e-5, rtol=1e-4)
        # the experts' log-softmaxes passed in (shared by the MoEs of a zoo): bitwise the same
        assert torch.equal(combine_probs(z, w, conv, torch.log_softmax(z, dim=2)), combine_probs(z, w, conv))


@pytest.mark.parametrize("experts", [2, 3, 10])
def test_logsumexp0_is_torch_logsumexp_bitwise(experts):
    torch.manual_seed(experts)
    x = torch.log_softmax(torch.randn(experts, 2, K, 33, 47) * 8, dim=2) + torch.rand(experts, 2, 1, 1, 1).log()
    x[0, 0, 0, 0, :3] = torch.tensor(torch.finfo(torch.float32).tiny).log()  # a weight clamped at the tiniest float
    assert torch.equal(logsumexp0(x), torch.logsumexp(x, dim=0))
    assert logsumexp0(torch.tensor([[float("inf")], [0.0]])).isfinite().logical_not().all()  # never finite


@pytest.mark.parametrize("with_conv", [False, True])
def test_combine_logits_is_the_authors_rule(with_conv):
    z = _expert_outputs()
    w = torch.softmax(torch.randn(2, 3, K), dim=1)
    conv = nn.Conv2d(K, K, 3, 1, 1, bias=False) if with_conv else None
    mixed = sum(w[:, i, :, None, None] * z[i] for i in range(3))  # out_i *= weight_i; out_1 + out_2
    ref = torch.softmax(conv(mixed) if with_conv else mixed, dim=1)
    with torch.no_grad():
        torch.testing.assert_close(combine_logits(z, w, conv).exp(), ref, atol=1e-5, rtol=1e-4)


def test_any_number_of_experts():
    torch.manual_seed(0)
    experts = [DeepLabV3Plus("tiny", K).eval() for _ in range(5)]
    moe = MixtureOfExperts(experts, "classwise", K, (2, 4), final_conv=True)
    log_p, w, logits = moe(torch.rand(2, 3, 32, 64))
    assert log_p.shape == (2, K, 32, 64) and w.shape == (2, 5, K) and logits.shape == (5, 2, K, 32, 64)
    torch.testing.assert_close(log_p.exp().sum(1), torch.ones(2, 32, 64))
    assert [k for k in moe.state_dict() if k.startswith("expert5.")]
    moe.train()
    assert moe.gate.training and not any(m.training for e in moe.experts for m in e.modules())
    assert not any(p.requires_grad for e in moe.experts for p in e.parameters())


# --------------------------------------------------------------------------- MC dropout

def test_keyed_dropout_masks_follow_their_keys():
    drop = KeyedDropout(0.25, seeds=[11, 22], passes=2)
    x = torch.ones(4, 3, 5, 5)
    y = drop(x, 2)
    for t in range(2):
        for b, s in enumerate([11, 22]):
            g = torch.Generator().manual_seed(key(s, "mc_dropout", t, 2))
            keep = (torch.rand(3, 5, 5, generator=g) >= 0.25).float()
            torch.testing.assert_close(y[t * 2 + b], keep / 0.75)


def test_keyed_dropout_rate():
    drop = KeyedDropout(0.1, seeds=[5], passes=1)
    m = drop.mask((200, 50, 50), 0, torch.device("cpu"), torch.float32)
    assert abs(float((m == 0).float().mean()) - 0.1) < 0.005
    assert abs(float(m.mean()) - 1.0) < 0.01


def test_mc_passes_do_not_depend_on_batch_size_or_position():
    torch.manual_seed(0)
    model = DeepLabV3Plus("tiny", K, dropout=0.3, mc_dropout=True).eval()
    x = torch.rand(3, 3, 64, 96)
    seeds = [101, 202, 303]
    with torch.no_grad():
        full = model.mc_logits(x, seeds, passes=3)
        alone = model.mc_logits(x[1:2], seeds[1:2], passes=3)
        perm = model.mc_logits(x[[2, 1, 0]], [303, 202, 101], passes=3)
        other_seed = model.mc_logits(x[1:2], [999], passes=3)
    assert full.shape == (3, 3, K, 64, 96)
    torch.testing.assert_close(full[:, 1], alone[:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(full[:, 1], perm[:, 1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(full[:, 0], perm[:, 2], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(full[0, 1], full[1, 1])          # passes differ
    assert not torch.allclose(full[:, 1], other_seed[:, 0])    # seeds matter
    with torch.no_grad():
        assert torch.equal(model(x), model(x))                 # eval forward is deterministic


def test_mc_dropout_reaches_every_site():
    seen = set()

    class Spy(KeyedDropout):
        def __call__(self, x, site):
            seen.add(site)
            return super().__call__(x, site)

    model = DeepLabV3Plus("tiny", K, mc_dropout=True).eval()
    feats = model.encode(torch.rand(1, 3, 32, 64))
    with torch.no_grad():
        model.classifier(feats, Spy(0.1, [0], 1))
    assert seen == {0, 1, 2, 3, 4, 5, 6}


# --------------------------------------------------------------------------- checkpoints and errors

class Opaque:
    def __init__(self):
        self.x = 1


def test_checkpoint_needing_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "extra": Opaque()}, path)
    with pytest.raises(ShiftbenchError) as exc:
        read_checkpoint(path)
    msg = str(exc.value)
    assert "refused" in msg and "arbitrary pickled code" in msg and "Opaque" in msg and "\n" not in msg


@pytest.mark.parametrize("content, expected", [
    (b"not a torch file", r"is not a torch checkpoint \(neither a torch.save zip archive nor a pickle; it begins "
                          r"with bytes 6e 6f 74 20\)"),
    (b"", "is empty"),
    ("cut", r"is cut short \(a zip archive without its directory at the end"),
    (b"\x80hello\n", r"is not a readable torch file \(IndexError\)"),  # looks like a pickle: the unpickler decides
    (pickle.dumps({"x": 1}, protocol=4), r"is not a readable torch file \(Unsupported operand 149\)"),
    (None, "not found"),
    ("folder", "is a folder, not a file"),
    ("none", "checkpoint path must be a str or os.PathLike; got NoneType"),
])
def test_unreadable_checkpoints(tmp_path, content, expected):
    path = tmp_path / "x.pt"
    if content == "none":
        path = None
    elif content == "folder":
        path.mkdir()
    elif content == "cut":  # the first half of a real checkpoint: an interrupted download
        torch.save({"state_dict": {"w": torch.zeros(1000)}}, path)
        path.write_bytes(path.read_bytes()[:2000])
    elif content is not None:
        path.write_bytes(content)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's "Detected pickle protocol 4" warning is not passed on
        with pytest.raises(ShiftbenchError, match=expected):
            read_checkpoint(path)


def test_key_and_shape_mismatches_are_listed_in_one_error():
    model = DeepLabV3Plus("tiny", K)
    state = dict(model.state_dict())
    for k in list(state)[:7]:
        del state[k]
    state["extra.weight"] = torch.zeros(1)
    state["classifier.classifier.0.weight"] = torch.zeros(3, 3, 3, 3)
    with pytest.raises(ShiftbenchError) as exc:
        load_strict(model, state, "ckpt.pt")
    msg = str(exc.value)
    assert "\n" not in msg and "ckpt.pt does not fit the model" in msg
    assert "missing keys (7): backbone.stem.0.weight" in msg and ", ..." in msg
    assert "unexpected keys (1): extra.weight" in msg
    assert "classifier.classifier.0.weight [3, 3, 3, 3] != [48, 80, 3, 3]" in msg


def test_wrong_number_of_classes_unknown_backbone_and_gate():
    state = DeepLabV3Plus("tiny", 19).state_dict()
    with pytest.raises(ShiftbenchError, match=r"^x.pt predicts 19 classes, the suite's dataset has 11"):
        check_classes(state, 11, "x.pt")
    gate_file = {"gate.fc.weight": torch.zeros(2, 8), "final_conv.weight": torch.zeros(19, 19, 3, 3)}  # a MoE's own
    with pytest.raises(ShiftbenchError, match=r"^g.pt predicts 19 classes, the suite's dataset has 11"):
        check_classes(gate_file, 11, "g.pt")
    check_classes(gate_file, 19, "g.pt")
    with pytest.raises(ShiftbenchError, match=r"unknown backbone 'resnet34'; allowed: resnet18, resnet50, resnet1"):
        DeepLabV3Plus("resnet34", K)
    with pytest.raises(ShiftbenchError, match=r"unknown gate type 'topk'; allowed: simple, classwise"):
        MoEHead("topk", 2, 64, K, (2, 2))
    with pytest.raises(ShiftbenchError, match=r"unknown combine rule 'max'; allowed: probs, logits"):
        MoEHead("simple", 2, 64, K, (2, 2), combine="max")


def test_saved_checkpoint_round_trips_with_plain_meta(tmp_path):
    model = DeepLabV3Plus("tiny", K)
    save_checkpoint(tmp_path / "m.pt", model.state_dict(), {"kind": "expert", "val_miou": [0.5]})
    ckpt = read_checkpoint(tmp_path / "m.pt")
    assert ckpt["meta"]["kind"] == "expert" and set(ckpt["meta"]["versions"]) == {"shiftbench", "torch", "torchvision"}
    load_strict(DeepLabV3Plus("tiny", K), ckpt["state_dict"], "m.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]


# --------------------------------------------------------------------------- metrics used in training

def test_miou_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    label = torch.randint(0, 5, (2, 9, 13), generator=g)
    label[0, :3] = 255
    pred = torch.randint(0, 4, (2, 9, 13), generator=g)  # class 4 never predicted
    conf = confusion_matrix(pred, label, 6)              # class 5 absent everywhere
    ious = []
    for c in range(6):
        valid = label != 255
        tp = ((pred == c) & (label == c) & valid).sum().item()
        union = (((pred == c) | (label == c)) & valid).sum().item()
        if union:
            ious.append(tp / union)
    assert conf.sum() == (label != 255).sum()
    assert miou(conf) == pytest.approx(sum(ious) / len(ious))


@pytest.mark.parametrize("combine", ["probs", "logits"])
def test_final_conv_starts_as_the_identity(combine):
    torch.manual_seed(0)
    with_conv = MoEHead("classwise", 3, 8, K, (2, 3), final_conv=True, combine=combine)
    without = MoEHead("classwise", 3, 8, K, (2, 3), final_conv=False, combine=combine)
    without.gate.load_state_dict(with_conv.gate.state_dict())
    feats, z = [torch.randn(2, 8, 4, 6) for _ in range(3)], _expert_outputs()
    with torch.no_grad():
        torch.testing.assert_close(with_conv(feats, z)[0], without(feats, z)[0], atol=1e-5, rtol=1e-5)


def test_gate_loss_window_is_exact_inside():
    torch.manual_seed(0)
    head = MoEHead("simple", 3, 8, K, (2, 3), final_conv=True)
    torch.nn.init.normal_(head.final_conv.weight)
    feats, z = [torch.randn(2, 8, 4, 6) for _ in range(3)], _expert_outputs(H=20, W=30)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        full = head(feats, z)[0]
        for _ in range(10):
            outer, inner = loss_window((20, 30), g)
            part = head(feats, z[(..., *outer)])[0][(..., *inner)]
            rows = slice(outer[0].start + inner[0].start, outer[0].start + inner[0].stop)
            cols = slice(outer[1].start + inner[1].start, outer[1].start + inner[1].stop)
            assert part.shape[-2:] == (10, 15)
            torch.testing.assert_close(part, full[..., rows, cols])


def test_imagenet_weights_load_into_the_backbone():
    from shiftbench.models.backbones import load_imagenet

    imagenet = torchvision.models.resnet18(weights=None).state_dict()  # what a local ImageNet file holds, fc included
    model = DeepLabV3Plus("resnet18", K)
    load_imagenet(model.backbone, imagenet, "resnet18", "resnet18.pth")
    assert torch.equal(model.backbone.layer3[0].conv1.weight, imagenet["layer3.0.conv1.weight"])
    with pytest.raises(ShiftbenchError, match="the tiny backbone has no ImageNet weights; they exist for resnet18"):
        load_imagenet(DeepLabV3Plus("tiny", K).backbone, imagenet, "tiny", "x.pth")


# --------------------------------------------------------------------------- bad inputs

def _refused(match, fn, *args, **kwargs):
    with pytest.raises(ShiftbenchError, match=match) as exc:
        fn(*args, **kwargs)
    assert "\n" not in str(exc.value)


X = torch.rand(2, 3, 32, 64, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("x, match", [
    ((X * 255).to(torch.uint8), r"^x must be a floating tensor of images in \[0,1\], got torch.uint8 \(convert uint8"),
    (X.double(), r"^x is torch.float64; the model runs in torch.float32: cast with x.to\(torch.float32\)"),
    (X.half(), r"^x is torch.float16; the model runs in torch.float32"),
    (X[:, :1], r"^x must have shape \[B,3,H,W\] \(RGB images in \[0,1\]\), got \[2, 1, 32, 64\]"),
    (torch.rand(2, 4, 32, 64), r"^x must have shape \[B,3,H,W\] .*got \[2, 4, 32, 64\]"),
    (X[0], r"^x must have shape \[B,3,H,W\] .*got \[3, 32, 64\]"),
    (X[:0], r"^x is an empty batch \[0, 3, 32, 64\]; give at least one image"),
    (X.numpy(), r"^x must be a torch.Tensor \[B,3,H,W\] of images in \[0,1\], got ndarray"),
])
@pytest.mark.parametrize("call", ["forward", "mc_logits", "moe"])
def test_bad_images_are_refused(x, match, call):
    model = DeepLabV3Plus("tiny", K, mc_dropout=True).eval()
    fn = {"forward": model, "mc_logits": lambda x: model.mc_logits(x, [1, 2], 2),
          "moe": MixtureOfExperts([model], "simple", K, (2, 4))}[call]
    _refused(match, fn, x)


def test_other_dtypes_run_under_autocast_or_in_a_model_of_that_dtype():
    model = DeepLabV3Plus("tiny", K).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(X.bfloat16()).shape == (2, K, 32, 64)
    with torch.no_grad():
        assert model.double()(X.double()).dtype == torch.float64


@pytest.mark.parametrize("build, match", [
    (lambda: DeepLabV3Plus("tiny", -1), r"^classes must be an int >= 1, got -1$"),
    (lambda: DeepLabV3Plus("tiny", 0), r"^classes must be an int >= 1, got 0$"),
    (lambda: DeepLabV3Plus("tiny", 2.5), r"^classes must be an int >= 1, got 2.5$"),
    (lambda: DeepLabV3Plus("tiny", True), r"^classes must be an int >= 1, got True$"),
    (lambda: DeepLabV3Plus("tiny", K, dropout=1.0), r"^dropout must be a number in \[0, 1\), got 1.0$"),
    (lambda: DeepLabV3Plus("tiny", K, dropout=-0.1), r"^dropout must be a number in \[0, 1\), got -0.1$"),
    (lambda: KeyedDropout(1.5, [1], 1), r"^dropout p must be a number in \[0, 1\), got 1.5$"),
    (lambda: KeyedDropout(0.1, [1], 0), r"^passes must be an int >= 1, got 0$"),
    (lambda: KeyedDropout(0.1, [1.5], 1), r"^seeds must be ints .*, got a float \(1.5\)$"),
    (lambda: build_gate("simple", 16, 2, 3, 8), r"^gate grid must be a pair of ints >= 1 \(h, w\), got 8$"),
    (lambda: build_gate("simple", 16, 2, 3, (0, 16)), r"^gate grid must be a pair .*got \(0, 16\)$"),
    (lambda: build_gate("simple", 16, 0, 3, (2, 4)), r"^experts must be an int >= 1, got 0$"),
    (lambda: build_gate("simple", 0, 2, 3, (2, 4)), r"^gate channels must be an int >= 1, got 0$"),
    (lambda: build_gate("classwise", 16, 2, 0, (2, 4)), r"^classes must be an int >= 1, got 0$"),
    (lambda: MoEHead("simple", 2, 64, K, 8), r"^gate grid must be a pair of ints >= 1 \(h, w\), got 8$"),
    (lambda: MoEHead("simple", 2, 0, K, (2, 4)), r"^channels must be an int >= 1, got 0$"),
])
def test_bad_constructor_arguments_are_refused(build, match):
    _refused(match, build)


@pytest.mark.parametrize("seeds, passes, match", [
    ([1, 2], 0, r"^passes must be an int >= 1, got 0$"),
    ([1, 2], 2.0, r"^passes must be an int >= 1, got 2.0$"),
    ([1], 2, r"^got 1 seeds for a batch of 2 images; give one per image$"),
    (torch.tensor([1.0, 2.0]), 2, r"^seeds must be an int64 tensor \[B\] or a list of B ints, "
                                  r"got torch.float32 \[2\]$"),
    (7, 2, r"^seeds must be an int64 tensor \[B\] or a list of B ints, got int$"),
])
def test_bad_mc_arguments_are_refused(seeds, passes, match):
    _refused(match, DeepLabV3Plus("tiny", K, mc_dropout=True).mc_logits, X, seeds, passes)


@pytest.mark.parametrize("feats, z, match", [
    ([torch.randn(1, 8, 4, 6)] * 3, _expert_outputs(), r"^feature map 0 is \[1, 8, 4, 6\]; each must be \[B,C,h,w\] "
                                                       r"with the logits' B = 2, C = 8 channels"),
    ([torch.randn(2, 8, 4, 6)] * 2 + [torch.randn(2, 8, 4, 5)], _expert_outputs(), r"^feature map 2 is \[2, 8, 4, 5\]"),
    ([torch.randn(2, 16, 4, 6)] * 3, _expert_outputs(), r"^feature map 0 is \[2, 16, 4, 6\]"),
    ([torch.randn(2, 8, 4, 6)] * 2, _expert_outputs(), r"^this MoE has 3 experts, got 2 feature maps; give one per"),
    ([torch.randn(2, 8, 4, 6)] * 3, _expert_outputs()[:, 0], r"^logits must be \[E,B,K,H,W\] with E = 3 experts and "
                                                            r"K = 11 classes, got \[3, 11, 5, 6\]$"),
    ([torch.randn(2, 8, 4, 6)] * 3, _expert_outputs()[:, :, :10], r"^logits must be .*got \[3, 2, 10, 5, 6\]$"),
    ([torch.randn(2, 8, 4, 6)] * 3, _expert_outputs(E=2), r"^logits must be .*got \[2, 2, 11, 5, 6\]$"),
])
def test_moe_head_refuses_wrong_shapes(feats, z, match):
    _refused(match, MoEHead("simple", 3, 8, K, (2, 3)), feats, z)


def test_moe_head_refuses_log_probs_of_another_shape_and_inputs_on_another_device():
    head, feats, z = MoEHead("simple", 3, 8, K, (2, 3)), [torch.randn(2, 8, 4, 6)] * 3, _expert_outputs()
    _refused(r"^log_probs is \[3, 2, 11, 5, 5\]; it must be log_softmax\(logits, dim=2\), of the logits' shape "
             r"\[3, 2, 11, 5, 6\]$", head, feats, z, z[..., :5].log_softmax(2))
    _refused(r"^the MoE head is on cpu, its inputs on meta; move them with .to\(cpu\)$", head, feats, z.to("meta"))
    _refused(r"^the MoE head is on cpu, its inputs on meta", head, [f.to("meta") for f in feats], z)
    assert torch.equal(head(feats, z, z.log_softmax(2))[0], head(feats, z)[0])


@pytest.mark.parametrize("experts, channels, match", [
    ([], None, r"^experts: empty; a MixtureOfExperts needs at least one expert$"),
    (["tiny", "resnet18"], None, r"^the experts' ASPP maps differ in width \(\[64, 256\] channels\)"),
    (["tiny", ("tiny", 5)], None, r"^the experts predict \[5, 11\] classes, the MoE classes=11"),
    (["tiny"], 256, r"^channels=256, but the experts' ASPP maps have 64"),
])
def test_mixture_of_experts_refuses_experts_that_do_not_fit(experts, channels, match):
    built = [DeepLabV3Plus(*(e if isinstance(e, tuple) else (e, K))) for e in experts]
    _refused(match, MixtureOfExperts, built, "simple", K, (2, 4), channels=channels)
