"""ModelZoo: every model of a suite from one pass through each expert."""

import textwrap

import pytest
import torch
import yaml

from shiftbench.errors import ShiftbenchError
from shiftbench.models import DeepLabV3Plus, MixtureOfExperts, ModelZoo, MoEHead, save_checkpoint
from shiftbench.suite import load_suite

K = 11


pytestmark = pytest.mark.usefixtures("one_thread")
GRID = [2, 4]  # the tiny backbone's stride-16 map of a 32x64 image

MODELS = [
    {"name": "baseline", "kind": "mc_dropout", "backbone": "tiny", "checkpoint": "baseline.pt", "passes": 3},
    {"name": "ensemble", "kind": "ensemble", "experts": ["highway", "urban"]},
    {"name": "highway_only", "kind": "expert", "experts": ["highway"]},
    {"name": "moe_simple", "kind": "moe", "experts": ["highway", "urban"], "gate": "simple",
     "checkpoint": "moe_simple.pt"},
    {"name": "moe_simple_conv", "kind": "moe", "experts": ["highway", "urban"], "gate": "simple",
     "final_conv": True, "checkpoint": "moe_simple_conv.pt"},
    {"name": "moe_classwise", "kind": "moe", "experts": ["highway", "urban"], "gate": "classwise",
     "checkpoint": "moe_classwise.pt"},
    {"name": "moe_classwise_logits", "kind": "moe", "experts": ["highway", "urban"], "gate": "classwise",
     "final_conv": True, "combine": "logits", "checkpoint": "moe_classwise_logits.pt"},
    {"name": "mine", "kind": "custom", "factory": "zoo_custom_models:build", "kwargs": {"width": 4},
     "checkpoint": "mine.pt"},
]

CUSTOM = textwrap.dedent("""
    from torch import nn

    def build(width=8):
        return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, 11, 1))
""")


def write_suite(folder, models=MODELS, experts=None) -> object:
    experts = experts or {n: {"backbone": "tiny", "checkpoint": f"expert_{n}.pt"} for n in ("highway", "urban")}
    data = {"name": "zoo_test", "dataset": {"name": "synthetic", "size": [32, 64], "classes": K,
                                            "eval": {"id": ["highway_test"]}},
            "experts": experts, "models": models, "corruptions": {"names": "none"}}
    path = folder / "suite.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return load_suite(path)


@pytest.fixture()
def suite(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "zoo_custom_models.py").write_text(CUSTOM)
    torch.manual_seed(0)
    for n in ("highway", "urban"):
        save_checkpoint(tmp_path / f"expert_{n}.pt", _trained_like(DeepLabV3Plus("tiny", K)).state_dict(),
                        {"kind": "expert"})
    save_checkpoint(tmp_path / "baseline.pt", _trained_like(DeepLabV3Plus("tiny", K, mc_dropout=True)).state_dict(),
                    {"kind": "mc_dropout"})
    for m in MODELS:
        if m["kind"] == "moe":
            head = MoEHead(m["gate"], 2, 64, K, GRID, m.get("final_conv", False), m.get("combine", "probs"))
            save_checkpoint(tmp_path / m["checkpoint"], head.state_dict(), {"kind": "moe", "gate": m["gate"],
                                                                           "gate_grid": GRID})
    import zoo_custom_models

    save_checkpoint(tmp_path / "mine.pt", zoo_custom_models.build(4).state_dict(), {"kind": "custom"})
    return write_suite(tmp_path)


def _trained_like(model):
    """Random BN statistics, so eval-mode outputs are not trivially equal across models."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model


def test_every_model_from_one_pass_per_expert(suite):
    zoo = ModelZoo.from_suite(suite)
    calls = {n: 0 for n in zoo.experts}
    for n, e in zoo.experts.items():
        e.backbone.register_forward_hook(lambda *a, n=n: calls.__setitem__(n, calls[n] + 1))
    x = torch.rand(2, 3, 32, 64)
    out = zoo(x, torch.tensor([3, 4]))
    assert calls == {"highway": 1, "urban": 1}
    assert list(out) == [m["name"] for m in MODELS]
    for name, p in out.items():
        assert p.probs.shape == (2, K, 32, 64) and p.probs.dtype == torch.float32, name
        torch.testing.assert_close(p.probs.sum(1), torch.ones(2, 32, 64))
    ens = out["ensemble"]
    assert ens.members.shape == (2, 2, K, 32, 64) and ens.gate is None
    torch.testing.assert_close(ens.probs, ens.members.mean(0))
    for name in ("moe_simple", "moe_simple_conv", "moe_classwise", "moe_classwise_logits"):
        assert out[name].members is ens.members  # shared, not recomputed
    w = out["moe_simple"].gate
    assert w.shape == (2, 2)
    torch.testing.assert_close(out["moe_simple"].probs, (w.T[:, :, None, None, None] * ens.members).sum(0))
    assert out["moe_classwise"].gate.shape == (2, 2, K)
    torch.testing.assert_close(out["highway_only"].probs, ens.members[0])
    assert out["baseline"].members.shape == (3, 2, K, 32, 64)
    torch.testing.assert_close(out["baseline"].probs, out["baseline"].members.mean(0))
    assert out["mine"].members is None and out["mine"].gate is None


def test_only_the_experts_a_subset_needs_run(suite):
    zoo = ModelZoo.from_suite(suite, names=["baseline", "highway_only"])
    calls = []
    for e in zoo.experts.values():
        e.backbone.register_forward_hook(lambda *a: calls.append(1))
    out = zoo(torch.rand(1, 3, 32, 64), [0])
    assert list(out) == ["baseline", "highway_only"] and len(calls) == 1 and list(zoo.experts) == ["highway"]


def test_mc_passes_of_a_sample_do_not_depend_on_its_batch(suite):
    zoo = ModelZoo.from_suite(suite, names=["baseline"])
    x = torch.rand(3, 3, 32, 64)
    full = zoo(x, [7, 8, 9])["baseline"].members
    alone = zoo(x[2:], [9])["baseline"].members
    torch.testing.assert_close(full[:, 2], alone[:, 0], atol=1e-5, rtol=1e-5)


def test_autocast_returns_float32_probabilities(suite):
    zoo = ModelZoo.from_suite(suite, names=["moe_classwise", "baseline"], amp=True)
    out = zoo(torch.rand(1, 3, 32, 64), [1])
    assert all(p.probs.dtype == torch.float32 and p.members.dtype == torch.float32 for p in out.values())
    ref = ModelZoo.from_suite(suite, names=["moe_classwise"], amp=False)(torch.rand(1, 3, 32, 64), [1])
    assert ref["moe_classwise"].probs.dtype == torch.float32


def test_zoo_stays_in_eval_mode_without_gradients(suite):
    zoo = ModelZoo.from_suite(suite).train()
    assert not any(m.training for m in zoo.modules())
    assert not any(p.requires_grad for p in zoo.parameters())


def test_authors_moe_file_supplies_its_experts(tmp_path):
    torch.manual_seed(1)
    experts = [_trained_like(DeepLabV3Plus("tiny", K)) for _ in range(2)]
    head = MoEHead("simple", 2, 64, K, (4, 4))
    state = {**{f"expert{i}.{k}": v for i, e in enumerate(experts, 1) for k, v in e.state_dict().items()},
             **head.state_dict()}
    torch.save({"epoch": 3, "state_dict": state}, tmp_path / "authors_moe.pth.tar")  # no meta: grid from fc1 (16 = 4x4)
    models = [{"name": "moe", "kind": "moe", "experts": ["highway", "urban"], "gate": "simple", "combine": "logits",
               "checkpoint": "authors_moe.pth.tar"}]
    s = write_suite(tmp_path, models, experts={n: {"backbone": "tiny"} for n in ("highway", "urban")})
    zoo = ModelZoo.from_suite(s)
    assert torch.equal(zoo.experts["urban"].classifier.classifier[3].weight, experts[1].classifier.classifier[3].weight)
    assert zoo.heads["moe"].grid == (4, 4)
    assert zoo(torch.rand(1, 3, 64, 64), [0])["moe"].gate.shape == (1, 2)
    # an expert checkpoint that disagrees with the weights inside the MoE file is refused
    save_checkpoint(tmp_path / "other.pt", DeepLabV3Plus("tiny", K).state_dict(), {})
    s = write_suite(tmp_path, models, experts={"highway": {"backbone": "tiny", "checkpoint": "other.pt"},
                                               "urban": {"backbone": "tiny"}})
    with pytest.raises(ShiftbenchError, match=r"carries weights for expert 'highway' that differ from .*other.pt"):
        ModelZoo.from_suite(s)


def _gate_trained_as_the_authors_do(expert: DeepLabV3Plus, seed: int) -> DeepLabV3Plus:
    """A copy of a frozen expert after the authors' gate training: their loop calls train() on the whole
    MoE, so forwards without gradients still move the experts' BatchNorm statistics."""
    import copy

    moved = copy.deepcopy(expert).train()
    with torch.no_grad():
        moved(torch.rand(2, 3, 32, 64, generator=torch.Generator().manual_seed(seed)))
    return moved.eval()


def test_moe_files_with_their_own_batchnorm_statistics_run_their_own_expert_copies(tmp_path):
    torch.manual_seed(2)
    bank = {n: _trained_like(DeepLabV3Plus("tiny", K)) for n in ("highway", "urban")}
    for n, e in bank.items():
        save_checkpoint(tmp_path / f"expert_{n}.pt", e.state_dict(), {"kind": "expert"})
    moved = {n: _gate_trained_as_the_authors_do(e, seed) for seed, (n, e) in enumerate(bank.items())}
    head = MoEHead("simple", 2, 64, K, (4, 4))
    models, references = [], {}
    for name, experts in (("moe_a", moved), ("moe_b", bank), ("moe_c", moved)):  # moe_c: the same copies as moe_a
        reference = MixtureOfExperts([experts["highway"], experts["urban"]], "simple", K, (4, 4), combine="logits")
        reference.gate.load_state_dict(head.gate.state_dict())
        torch.save({"epoch": 3, "state_dict": reference.state_dict()}, tmp_path / f"{name}.pth.tar")
        models.append({"name": name, "kind": "moe", "experts": ["highway", "urban"], "gate": "simple",
                       "combine": "logits", "checkpoint": f"{name}.pth.tar"})
        references[name] = reference
    counted = {k: v + 7 if k.endswith("num_batches_tracked") else v for k, v in references["moe_b"].state_dict().items()}
    torch.save({"state_dict": counted}, tmp_path / "moe_d.pth.tar")  # only the batch counts differ: no copy
    models.append(dict(models[1], name="moe_d", checkpoint="moe_d.pth.tar"))
    models.append({"name": "ensemble", "kind": "ensemble", "experts": ["highway", "urban"]})
    zoo = ModelZoo.from_suite(write_suite(tmp_path, models))
    assert zoo.members["moe_a"] == zoo.members["moe_c"] == ("highway@moe_a", "urban@moe_a")
    assert zoo.members["moe_b"] == zoo.members["moe_d"] == zoo.members["ensemble"] == ("highway", "urban")
    assert sorted(zoo.experts) == ["highway", "highway@moe_a", "urban", "urban@moe_a"]
    assert len(zoo.notes) == 2 and "moe_a.pth.tar carries expert 'highway' with its own BatchNorm" in zoo.notes[0]
    x = torch.rand(2, 3, 32, 64)
    out = zoo(x, [0, 1])
    for name, reference in references.items():  # each MoE as its file was trained
        log_p, weights, _ = reference(x)
        torch.testing.assert_close(out[name].probs, log_p.exp(), atol=1e-6, rtol=0)
        torch.testing.assert_close(out[name].gate, weights, atol=1e-6, rtol=0)
    assert not torch.allclose(out["moe_a"].probs, out["moe_b"].probs, atol=1e-4)
    ensemble = torch.stack([torch.softmax(bank[n](x), 1) for n in ("highway", "urban")]).mean(0)
    torch.testing.assert_close(out["ensemble"].probs, ensemble, atol=1e-6, rtol=0)  # the expert checkpoints'
    # weights (not statistics) that differ are still refused
    conv = next(k for k in moved["highway"].state_dict() if k.endswith("weight") and "bn" not in k)
    state = {k: v.clone() for k, v in references["moe_a"].state_dict().items()}
    state[f"expert1.{conv}"] += 1
    torch.save({"state_dict": state}, tmp_path / "moe_a.pth.tar")
    with pytest.raises(ShiftbenchError, match=rf"carries weights for expert 'highway' that differ .*\(e\.g\. {conv}\)"):
        ModelZoo.from_suite(write_suite(tmp_path, models))


def _error(suite_obj) -> str:
    with pytest.raises(ShiftbenchError) as exc:
        ModelZoo.from_suite(suite_obj)
    assert "\n" not in str(exc.value)
    return str(exc.value)


def test_bad_models_give_one_line_errors(suite, tmp_path):
    bad = [dict(MODELS[-1], factory="no_such_pkg.models:build")]
    assert "factory 'no_such_pkg.models:build': cannot import 'no_such_pkg.models' (ModuleNotFoundError" in _error(
        write_suite(tmp_path, bad))
    bad = [dict(MODELS[-1], factory="zoo_custom_models:missing")]
    assert "module 'zoo_custom_models' has no function 'missing'" in _error(write_suite(tmp_path, bad))
    bad = [dict(MODELS[-1], kwargs={"depth": 3})]
    assert "models.mine.kwargs: got an unexpected keyword argument 'depth' (factory 'zoo_custom_models:build')" in _error(
        write_suite(tmp_path, bad))
    bad = [dict(MODELS[-1], kwargs={"width": -1})]
    assert "factory 'zoo_custom_models:build' raised RuntimeError: " in _error(write_suite(tmp_path, bad))
    bad = [dict(MODELS[3], gate="classwise")]
    assert ("moe_simple.pt was trained with gate: simple, the suite says models.moe_simple.gate: classwise; "
            "set it as trained") in _error(write_suite(tmp_path, bad))
    bad = [dict(MODELS[0], checkpoint=None)]
    assert "models.baseline.checkpoint: missing" in _error(write_suite(tmp_path, bad))
    save_checkpoint(tmp_path / "k19.pt", DeepLabV3Plus("tiny", 19).state_dict(), {})
    bad = [dict(MODELS[0], checkpoint="k19.pt")]
    assert "k19.pt predicts 19 classes, the suite's dataset has 11" in _error(write_suite(tmp_path, bad))
    bad = [dict(MODELS[0], backbone="resnet18")]
    assert _error(write_suite(tmp_path, bad)).startswith(  # the suite entry first, as for a missing file
        f"models.baseline: {tmp_path / 'baseline.pt'} does not fit the model: missing keys")
    experts = {n: {"backbone": "resnet18", "checkpoint": f"expert_{n}.pt"} for n in ("highway", "urban")}
    assert _error(write_suite(tmp_path, [MODELS[1]], experts)).startswith(
        f"experts.highway: {tmp_path / 'expert_highway.pt'} does not fit the model: missing keys")


def test_missing_checkpoints_are_named_together_with_the_variable_they_came_from(suite, tmp_path, monkeypatch):
    """A checkpoint folder variable set to a wrong folder: one line with how many files are missing, the first
    ones in suite order (experts before models) and the variable's value, not the first MoE file read."""
    monkeypatch.setenv("ZOO_CK", str(tmp_path / "nowhere"))
    experts = {n: {"backbone": "tiny", "checkpoint": f"${{ZOO_CK}}/expert_{n}.pt"} for n in ("highway", "urban")}
    models = [dict(m, checkpoint="${ZOO_CK}/" + m["checkpoint"]) if "checkpoint" in m else m for m in MODELS[:4]]
    message = _error(write_suite(tmp_path, models, experts))
    nowhere = tmp_path / "nowhere"
    assert message == (f"4 of 4 checkpoint files cannot be read: experts.highway.checkpoint "
                       f"({nowhere / 'expert_highway.pt'}: not found), experts.urban.checkpoint "
                       f"({nowhere / 'expert_urban.pt'}: not found), models.baseline.checkpoint "
                       f"({nowhere / 'baseline.pt'}: not found) and 1 more (the paths come from ZOO_CK={nowhere}: "
                       "is it the checkpoints' folder?)")
    monkeypatch.setenv("ZOO_CK", str(tmp_path))
    (tmp_path / "moe_simple.pt").unlink()
    assert _error(write_suite(tmp_path, models, experts)) == (
        f"models.moe_simple.checkpoint: checkpoint {tmp_path / 'moe_simple.pt'} not found (the paths come from "
        f"ZOO_CK={tmp_path}: is it the checkpoints' folder?)")


def test_files_that_are_no_checkpoints_are_named_together_in_suite_order(suite, tmp_path):
    """Garbage, an empty file and a checkpoint cut short: one line naming them all, experts before models, before
    any file is unpickled (so not just the first MoE file read)."""
    write_suite(tmp_path, MODELS[:4])
    (tmp_path / "moe_simple.pt").write_bytes((tmp_path / "moe_simple.pt").read_bytes()[:3000])
    (tmp_path / "baseline.pt").write_bytes(b"")
    (tmp_path / "expert_urban.pt").write_bytes(b"garbage")
    assert _error(write_suite(tmp_path, MODELS[:4])) == (
        f"3 of 4 checkpoint files cannot be read: experts.urban.checkpoint ({tmp_path / 'expert_urban.pt'}: is not "
        "a torch checkpoint (neither a torch.save zip archive nor a pickle; it begins with bytes 67 61 72 62)), "
        f"models.baseline.checkpoint ({tmp_path / 'baseline.pt'}: is empty), models.moe_simple.checkpoint "
        f"({tmp_path / 'moe_simple.pt'}: is cut short (a zip archive without its directory at the end: an "
        "interrupted download or copy?))")


def test_custom_model_with_wrong_output_is_refused(suite, tmp_path):
    (tmp_path / "zoo_bad_models.py").write_text("from torch import nn\ndef build():\n    return nn.Conv2d(3, 5, 1)\n")
    s = write_suite(tmp_path, [{"name": "bad", "kind": "custom", "factory": "zoo_bad_models:build"}])
    with pytest.raises(ShiftbenchError, match=r"model 'bad' returned \[1, 5, 32, 64\]; a custom model must map"):
        ModelZoo.from_suite(s)(torch.rand(1, 3, 32, 64), [0])


DICT_MODELS = textwrap.dedent("""
    import torch
    from torch import nn

    class Dict(nn.Module):  # torchvision's segmentation models return {"out": ..., "aux": ...}
        def __init__(self, key):
            super().__init__()
            self.conv, self.key = nn.Conv2d(3, 11, 1), key

        def forward(self, x):
            z = self.conv(x)
            return {self.key: z, "aux": z * 0}

    def build(key="out", seed=0):
        torch.manual_seed(seed)
        return Dict(key)

    class Extra(nn.Module):  # a module with extra state, which state_dict() holds as any object
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 11, 1)

        def forward(self, x):
            return {"out": self.conv(x)}

        def get_extra_state(self):
            return {"calibrated": True}

        def set_extra_state(self, state):
            pass

    def build_extra():
        return Extra()

    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 11, 1)

        def forward(self, x):
            return self.conv(x), None

    def build_tuple():
        return Pair()

    def build_lazy():
        return nn.Sequential(nn.LazyConv2d(11, 1))

    def build_meta():
        return nn.Conv2d(3, 11, 1, device="meta")
""")


def test_custom_models_may_return_torchvision_s_dict_and_nothing_else(tmp_path, monkeypatch):
    """{"out": logits} is torchvision's segmentation output; another dict or a tuple is one line naming it. The
    factory's module sits beside the suite file, not in the current folder or on sys.path."""
    (tmp_path / "zoo_dict_models.py").write_text(DICT_MODELS)
    monkeypatch.chdir(tmp_path.parent)
    models = [{"name": "out", "kind": "custom", "factory": "zoo_dict_models:build"},
              {"name": "logits", "kind": "custom", "factory": "zoo_dict_models:build", "kwargs": {"key": "logits"}},
              {"name": "pair", "kind": "custom", "factory": "zoo_dict_models:build_tuple"},
              {"name": "extra", "kind": "custom", "factory": "zoo_dict_models:build_extra"}]
    zoo = ModelZoo.from_suite(write_suite(tmp_path, models))
    x = torch.rand(1, 3, 32, 64)
    out = zoo(x, [0], names=["out"])["out"].probs
    assert torch.equal(out, torch.softmax(zoo.singles["out"].conv(x), dim=1))
    with pytest.raises(ShiftbenchError, match=r"^model 'logits' returned a dict with keys 'logits', 'aux'; a custom "
                                              r"model must return logits \[B,11,H,W\] \(or a dict holding them "
                                              r"under 'out', as torchvision's do\)$"):
        zoo(x, [0], names=["logits"])
    with pytest.raises(ShiftbenchError, match=r"^model 'pair' returned a tuple; a custom model must return logits"):
        zoo(x, [0], names=["pair"])
    assert zoo(x, [0], names=["extra"])["extra"].probs.shape == (1, 11, 32, 64)
    assert len(zoo.factory_digests["extra"]) == 64  # its weights recorded, its extra state left out


@pytest.mark.parametrize("factory, match", [
    ("build_meta", r"^models\.mine: cannot take a digest of the weights its factory made \(.*\); give it a "
                   r"checkpoint$"),
    ("build_lazy", r"^models\.mine: factory 'zoo_dict_models:build_lazy' returned a model with uninitialized "
                   r"\(lazy\) weights \(0\.weight, 0\.bias\); initialize them in the factory"),
])
def test_factory_weights_that_cannot_be_recorded_are_one_line(tmp_path, monkeypatch, factory, match):
    """Weights with no bytes (meta) cannot be digested, lazy ones would be drawn at the first forward."""
    (tmp_path / "zoo_dict_models.py").write_text(DICT_MODELS)
    monkeypatch.chdir(tmp_path)
    models = [{"name": "mine", "kind": "custom", "factory": f"zoo_dict_models:{factory}"}]
    with pytest.raises(ShiftbenchError, match=match):
        ModelZoo.from_suite(write_suite(tmp_path, models))


def test_weights_digest_reads_sparse_tensors():
    from shiftbench.models.checkpoints import weights_digest

    dense = torch.tensor([[0.0, 1.5], [0.0, -2.0]])
    digests = [weights_digest({"w": w}) for w in (dense, dense.to_sparse(), dense * 2, (dense * 2).to_sparse())]
    assert digests[0] == digests[1] and digests[2] == digests[3] and digests[0] != digests[2]


@pytest.mark.parametrize("x, seeds, names, match", [
    (torch.rand(2, 3, 32, 64) * 255, [1, 2], None, r"^x holds values in \[.*\]; images must lie in \[0,1\] \(convert"),
    (torch.rand(2, 3, 32, 64) - 0.5, [1, 2], None, r"^x holds values in \[-0.*\]; images must lie in \[0,1\]"),
    (torch.full((2, 3, 32, 64), float("nan")), [1, 2], None, r"^x holds NaN or Inf; images must lie in \[0,1\]"),
    (torch.rand(0, 3, 32, 64), [], None, r"^x is an empty batch \[0, 3, 32, 64\]; give at least one image$"),
    (torch.randint(0, 256, (2, 3, 32, 64), dtype=torch.uint8), [1, 2], None, r"^x must be a floating tensor"),
    (torch.rand(2, 1, 32, 64), [1, 2], None, r"^x must have shape \[B,3,H,W\]"),
    (torch.rand(2, 3, 32, 64), [1, 2, 3], None, r"^got 3 seeds for a batch of 2 images; give one per image$"),
    (torch.rand(2, 3, 32, 64), [1.7, 2.2], None, r"^seeds must be ints \(an int64 tensor \[B\] or a list of B ints\), "
                                                 r"got a float \(1.7\)$"),
    (torch.rand(2, 3, 32, 64), torch.tensor([1.0, 2.0]), None, r"^seeds must be an int64 tensor \[B\] or a list of B "
                                                               r"ints, got torch.float32 \[2\]$"),
    (torch.rand(2, 3, 32, 64), [1, 2], "baseline", r"^names must be a list of model names, got the string 'baseline'"),
])
def test_bad_batches_are_refused(suite, x, seeds, names, match):
    zoo = ModelZoo.from_suite(suite, names=["baseline", "mine"])
    with pytest.raises(ShiftbenchError, match=match) as exc:
        zoo(x, seeds, names=names)
    assert "\n" not in str(exc.value)


def test_a_gate_file_must_match_its_expert_order_and_combination(suite, tmp_path):
    """The gate's i-th weight belongs to the i-th expert it was trained with: a swapped ``experts:`` list, or
    another combination rule or final conv than the file records, is refused instead of mixing silently."""
    head = MoEHead("simple", 2, 64, K, GRID, False, "probs")
    save_checkpoint(tmp_path / "ours.pt", head.state_dict(), {"kind": "moe", "gate": "simple", "gate_grid": GRID,
                                                              "experts": ["highway", "urban"], "combine": "probs",
                                                              "final_conv": False})
    moe = {"name": "m", "kind": "moe", "experts": ["highway", "urban"], "gate": "simple", "checkpoint": "ours.pt"}
    assert ModelZoo.from_suite(write_suite(tmp_path, [moe])).kinds == {"m": "moe"}
    renamed = {n: {"backbone": "tiny", "checkpoint": f"expert_{old}.pt"} for n, old in (("hw", "highway"), ("ur", "urban"))}
    assert ModelZoo.from_suite(write_suite(tmp_path, [{**moe, "experts": ["hw", "ur"]}], renamed)).kinds == {"m": "moe"}
    partly = {**renamed, "urban": {"backbone": "tiny", "checkpoint": "expert_urban.pt"}}
    assert "models.m.experts: [urban, ur]; set it as trained" in _error(
        write_suite(tmp_path, [{**moe, "experts": ["urban", "ur"]}], partly))  # urban moved to the gate's slot 0
    for change, said in ((dict(experts=["urban", "highway"]), "experts: [highway, urban], the suite says "
                          "models.m.experts: [urban, highway]"),
                         (dict(combine="logits"), "combine: probs, the suite says models.m.combine: logits"),
                         (dict(final_conv=True), "final_conv: false, the suite says models.m.final_conv: true")):
        assert f"ours.pt was trained with {said}; set it as trained" in _error(write_suite(tmp_path, [{**moe, **change}]))


@pytest.mark.parametrize("normalize, seen", [("imagenet", (-2.2, 2.7)), ("none", (0.0, 1.0))])
def test_normalize_sets_what_the_backbone_sees(normalize, seen):
    """``normalize: none`` feeds the [0,1] images as they are (the authors' A2D2 checkpoints were trained so);
    ``imagenet`` subtracts torchvision's ImageNet mean and divides by its std."""
    model = DeepLabV3Plus("tiny", K, normalize=normalize).eval()
    got = []
    model.backbone.register_forward_pre_hook(lambda module, args: got.append(args[0]))
    x = torch.rand(2, 3, 32, 64)
    x[0, :, 0, 0], x[1, :, 0, 0] = 0.0, 1.0
    model(x)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    want = x if normalize == "none" else (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    torch.testing.assert_close(got[0], want, rtol=0, atol=1e-6)
    assert seen[0] <= float(got[0].min()) and float(got[0].max()) <= seen[1]
    with pytest.raises(ShiftbenchError, match=r"^normalize must be one of imagenet, none, got 'auto'$"):
        DeepLabV3Plus("tiny", K, normalize="auto")


def test_normalize_comes_from_the_suite_and_must_match_the_checkpoint(suite, tmp_path):
    """Files without meta (the authors') take the suite's ``normalize``; ours record theirs, and a suite
    that says otherwise is refused."""
    experts = {n: {"backbone": "tiny", "checkpoint": f"expert_{n}.pt", "normalize": "none"}
               for n in ("highway", "urban")}
    zoo = ModelZoo.from_suite(write_suite(tmp_path, [dict(MODELS[0], normalize="none"), MODELS[1]], experts))
    assert {m.normalize for m in (*zoo.experts.values(), zoo.singles["baseline"])} == {"none"}
    x = torch.rand(1, 3, 32, 64)
    plain = DeepLabV3Plus("tiny", K, normalize="none").eval()
    plain.load_state_dict(zoo.experts["highway"].state_dict())
    torch.testing.assert_close(zoo(x, [0], ["ensemble"])["ensemble"].members[0],
                               torch.softmax(plain(x), 1), rtol=0, atol=1e-6)
    save_checkpoint(tmp_path / "expert_highway.pt", DeepLabV3Plus("tiny", K).state_dict(),
                    {"kind": "expert", "normalize": "imagenet"})
    assert (f"expert_highway.pt was trained with normalize: imagenet, the suite says experts.highway.normalize: "
            f"none; set it as trained") in _error(write_suite(tmp_path, [MODELS[1]], experts))
    save_checkpoint(tmp_path / "baseline.pt", DeepLabV3Plus("tiny", K, mc_dropout=True).state_dict(),
                    {"kind": "mc_dropout", "normalize": "none"})
    assert "baseline.pt was trained with normalize: none, the suite says models.baseline.normalize: imagenet" in _error(
        write_suite(tmp_path, [MODELS[0]]))


def test_a_gate_trained_on_other_expert_weights_is_refused(suite, tmp_path):
    """Our MoE files record a digest of the weights each expert had while the gate trained: an expert retrained
    in place since then (the gate would weigh a model it never saw) is refused; the same weights re-saved pass."""
    from shiftbench.models.checkpoints import read_checkpoint, weights_digest

    states = {n: read_checkpoint(tmp_path / f"expert_{n}.pt")["state_dict"] for n in ("highway", "urban")}
    head = MoEHead("simple", 2, 64, K, GRID, False, "probs")
    save_checkpoint(tmp_path / "ours.pt", head.state_dict(),
                    {"kind": "moe", "gate": "simple", "gate_grid": GRID, "experts": ["highway", "urban"],
                     "expert_digests": [weights_digest(states["highway"]), weights_digest(states["urban"])]})
    moe = {"name": "m", "kind": "moe", "experts": ["highway", "urban"], "gate": "simple", "checkpoint": "ours.pt"}
    save_checkpoint(tmp_path / "expert_urban.pt", states["urban"], {"kind": "expert", "note": "re-saved"})
    assert ModelZoo.from_suite(write_suite(tmp_path, [moe])).kinds == {"m": "moe"}  # other bytes, same weights
    retrained = {k: v + 1 if v.is_floating_point() else v for k, v in states["urban"].items()}
    save_checkpoint(tmp_path / "expert_urban.pt", retrained, {"kind": "expert"})
    assert ("ours.pt: its gate was trained on other weights of expert 'urban' (position 2) than the suite loads now "
            "(retrained since?); retrain the gate (shiftbench train --only m)") in _error(write_suite(tmp_path, [moe]))
