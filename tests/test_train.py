"""Training: frozen experts while gates train, determinism, the train command."""

import pytest
import torch
import yaml
from torch.utils.data import Dataset

import shiftbench.data
from shiftbench.cli import main
from shiftbench.models import DeepLabV3Plus, ModelZoo, MoEHead, read_checkpoint
from shiftbench.models.trainer import data_probe
from shiftbench.models.training import GateJob, Stage, init_seed, train_gates, train_segmenter
from shiftbench.suite import load_suite

K = 11


pytestmark = pytest.mark.usefixtures("one_thread")


class Blobs(Dataset):
    """Tiny learnable scenes: the label is the brightest channel's class band (0..2) plus a domain offset."""

    def __init__(self, domain: str, count: int, size=(32, 64), seed=0):
        g = torch.Generator().manual_seed(seed + (0 if domain == "highway" else 100))
        self.x = torch.rand(count, 3, *size, generator=g)
        self.y = self.x.argmax(1) + (0 if domain == "highway" else 3)
        self.y[:, :2] = 255
        self.ids = [f"{domain}/{i:06d}" for i in range(count)]

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i], self.ids[i]


def _experts(n=2):
    experts = {}
    for i, name in enumerate(["highway", "urban", "rural"][:n]):
        torch.manual_seed(i)
        e = DeepLabV3Plus("tiny", K)
        for m in e.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
        experts[name] = e
    return experts


def test_experts_stay_frozen_and_in_eval_mode_while_gates_train():
    experts = _experts()
    before = {n: {k: v.clone() for k, v in e.state_dict().items()} for n, e in experts.items()}
    x = torch.rand(2, 3, 32, 64)
    with torch.no_grad():
        out_before = {n: e.eval()(x) for n, e in experts.items()}
    for e in experts.values():
        e.train()  # whatever state they come in, training the gates must not use it
    modes = []
    for e in experts.values():
        for m in e.modules():
            m.register_forward_pre_hook(lambda mod, inp: modes.append(mod.training))
    jobs = [GateJob("simple", MoEHead("simple", 2, 64, K, (2, 4)), ("highway", "urban")),
            GateJob("cw_conv", MoEHead("classwise", 2, 64, K, (2, 4), final_conv=True), ("urban", "highway"))]
    heads_before = [{k: v.clone() for k, v in j.head.state_dict().items()} for j in jobs]
    ds = Blobs("highway", 8)
    train_gates(experts, jobs, ds, ds, Stage(epochs=2, lr=0.01, weight_decay=0.0, batch_size=4, seed=0),
                torch.device("cpu"), quiet=True)
    assert modes and not any(modes)
    for n, e in experts.items():
        after = e.state_dict()
        assert all(torch.equal(before[n][k], after[k]) for k in after), n  # weights, BN running stats, counters
        assert all(not p.requires_grad and p.grad is None for p in e.parameters())
        with torch.no_grad():
            assert torch.equal(e(x), out_before[n])
    for j, hb in zip(jobs, heads_before):
        assert any(not torch.equal(hb[k], v) for k, v in j.head.state_dict().items()), j.name


def test_segmenter_training_is_deterministic_and_learns():
    ds = Blobs("highway", 8)
    stage = Stage(epochs=3, lr=0.05, weight_decay=1e-4, batch_size=4, seed=3)
    states, stats = [], []
    for _ in range(2):
        init_seed(3, "e")
        model = DeepLabV3Plus("tiny", K, mc_dropout=True)
        stats.append(train_segmenter(model, ds, ds, stage, "e", torch.device("cpu"), quiet=True))
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert stats[0]["val_miou"] == stats[1]["val_miou"] and len(stats[0]["val_miou"]) == 3


SUITE = {
    "name": "train_test",
    "dataset": {"name": "synthetic", "size": [32, 64], "classes": K, "count": {"train": 8, "val": 4, "test": 4},
                "eval": {"id": ["highway_test", "urban_test"]}},
    "experts": {"highway": {"backbone": "tiny", "checkpoint": "ck/expert_highway.pt", "train": ["highway_train"],
                            "val": ["highway_val"]},
                "urban": {"backbone": "tiny", "checkpoint": "ck/expert_urban.pt", "train": ["urban_train"],
                          "val": ["urban_val"]}},
    "models": [
        {"name": "baseline", "kind": "mc_dropout", "backbone": "tiny", "checkpoint": "ck/baseline.pt"},
        {"name": "ensemble", "kind": "ensemble", "experts": ["highway", "urban"]},
        {"name": "moe_simple", "kind": "moe", "experts": ["highway", "urban"], "gate": "simple",
         "checkpoint": "ck/moe_simple.pt"},
        {"name": "moe_classwise_conv", "kind": "moe", "experts": ["highway", "urban"], "gate": "classwise",
         "final_conv": True, "checkpoint": "ck/moe_classwise_conv.pt"},
    ],
    "train": {"seed": 0, "batch_size": 4, "splits": ["highway_train", "urban_train"],
              "val": ["highway_val", "urban_val"],
              "experts": {"epochs": 1, "lr": 0.01}, "baseline": {"epochs": 1, "lr": 0.01},
              "gates": {"epochs": 1, "lr": 0.001}},
    "corruptions": {"names": "none"},
}


@pytest.fixture()
def fake_data(monkeypatch):
    def opener(spec, split):
        domain, _, part = split.rpartition("_")
        return Blobs(domain, spec.count[part], tuple(spec.size), seed=len(part))

    monkeypatch.setitem(shiftbench.data.OPENERS, "synthetic", opener)


def test_train_command_writes_checkpoints_the_zoo_loads(tmp_path, fake_data, capsys):
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(SUITE, sort_keys=False))
    assert main(["train", str(path), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "trained 5 models" in out
    suite = load_suite(path)
    for name in ("expert_highway", "expert_urban", "baseline", "moe_simple", "moe_classwise_conv"):
        meta = read_checkpoint(tmp_path / "ck" / f"{name}.pt")["meta"]
        assert meta["suite"] == "train_test" and meta["suite_digest"] == suite.digest()
        assert set(meta["versions"]) == {"shiftbench", "torch", "torchvision"} and len(meta["val_miou"]) == 1
        assert meta["data_probe"] == {s: data_probe(shiftbench.data.open_split(suite, s)) for s in meta["train_splits"]}
        assert meta.get("normalize") == ("imagenet" if meta["kind"] != "moe" else None)  # what the zoo checks
    assert main(["train", str(path), "--quiet", "--out", str(tmp_path / "again")]) == 0
    for again in (tmp_path / "again").iterdir():  # the same seed and threads: the same bytes (no wall time saved)
        assert again.read_bytes() == (tmp_path / "ck" / again.name).read_bytes(), again.name
    meta = read_checkpoint(tmp_path / "ck" / "moe_classwise_conv.pt")
    assert meta["meta"]["gate_grid"] == [2, 4] and meta["meta"]["experts"] == ["highway", "urban"]
    from shiftbench.models.checkpoints import weights_digest

    assert meta["meta"]["expert_digests"] == [
        weights_digest(read_checkpoint(tmp_path / "ck" / f"expert_{e}.pt")["state_dict"]) for e in ("highway", "urban")]
    assert not any(k.startswith("expert") for k in meta["state_dict"])  # gates only; experts from their files
    preds = ModelZoo.from_suite(suite)(torch.rand(2, 3, 32, 64), [0, 1])
    assert set(preds) == {"baseline", "ensemble", "moe_simple", "moe_classwise_conv"}
    assert not list((tmp_path / "ck").glob(".*"))  # atomic writes leave no temporaries

    # --only a gate, into another folder: it trains on the suite's expert checkpoints
    assert main(["train", str(path), "--only", "moe_simple", "--out", str(tmp_path / "other"), "--quiet"]) == 0
    assert [p.name for p in (tmp_path / "other").iterdir()] == ["moe_simple.pt"]


def test_train_command_errors_are_one_line(tmp_path, fake_data, capsys):
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(SUITE, sort_keys=False))
    assert main(["train", str(path), "--only", "ensemble"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "--only: 'ensemble' is not a trainable expert or model of suite 'train_test'; trainable: highway, urban, " \
           "baseline, moe_simple, moe_classwise_conv" in err
    assert main(["train", str(path), "--only", "highway,,urban"]) == 2
    assert "--only: 'highway,,urban' has an empty item" in capsys.readouterr().err
    assert main(["train", str(path), "--only", "moe_simple", "--quiet"]) == 2  # experts not trained yet
    assert "expert_highway.pt not found" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["train", str(path), "--device", "cuda"]) == 2
        assert "--device cuda: no CUDA device is available; use --device cpu" in capsys.readouterr().err
    assert main(["train", str(path), "--threads", "0"]) == 2
    assert "--threads: 0 is not an integer in 1.." in capsys.readouterr().err
    assert main(["train", str(path), "--threads", "100000"]) == 2
    assert "--threads: 100000 is not an integer in 1.." in capsys.readouterr().err
    assert main(["train", str(path), "--out", ""]) == 2  # not the suite's own checkpoint paths
    assert "--out: empty path; give the folder to write the checkpoints into" in capsys.readouterr().err
    assert main(["train", str(path), "--quiet", "--out", str(path)]) == 2  # checked before anything trains
    assert f"--out {path}: {path} is a file, not a folder to write expert_highway.pt into" in capsys.readouterr().err
    assert not (tmp_path / "ck").exists()
    big_batch = yaml.safe_load(yaml.safe_dump(SUITE))
    big_batch["train"]["batch_size"] = 64
    path.write_text(yaml.safe_dump(big_batch, sort_keys=False))
    assert main(["train", str(path), "--only", "highway", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "highway: " in err and "make no full batch of 64; give train.batch_size <=" in err
    no_train = {k: v for k, v in SUITE.items() if k != "train"}
    path.write_text(yaml.safe_dump(no_train, sort_keys=False))
    assert main(["train", str(path)]) == 2
    assert "train: missing; the suite needs a train section" in capsys.readouterr().err


@pytest.mark.parametrize("eight_bit", [True, False])
def test_in_memory_copy_returns_the_same_samples(eight_bit):
    from shiftbench.models.training import InMemory

    ds = Blobs("urban", 40)
    if eight_bit:
        ds.x = (ds.x * 255).round() / 255
    ds.x[35, 0, 0, 0] = 0.5 if eight_bit else ds.x[35, 0, 0, 0]  # 0.5 is not k/255: a later batch is not 8-bit
    mem = InMemory(ds)
    assert mem.x.dtype == torch.float32 and mem.y.dtype == torch.uint8
    for i in (0, 17, 35, 39):
        for a, b in zip(mem[i], ds[i]):
            assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
    ds.x[35, 0, 0, 0] = 2 / 255
    if eight_bit:
        assert InMemory(ds).x.dtype == torch.uint8 and torch.equal(InMemory(ds)[35][0], ds[35][0])


@pytest.mark.parametrize("where", ["/proc", "read-only --out", "read-only suite path"])
def test_an_output_folder_that_cannot_be_written_fails_before_any_training(tmp_path, fake_data, monkeypatch, capsys,
                                                                           where):
    """Not only a file in the way: a folder that cannot be created or written is refused up front, in one line,
    and the folders the check created are removed again."""
    import os

    import shiftbench.models.trainer as trainer

    def no_training(*args, **kwargs):
        raise AssertionError("training started before the output folder was checked")

    def read_only(*args, **kwargs):  # as root a folder's mode stops no write: refuse the probe as the kernel would
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(trainer, "train_segmenter", no_training)
    monkeypatch.setattr(trainer, "train_gates", no_training)
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(SUITE, sort_keys=False))
    out = None if where == "read-only suite path" else str(tmp_path / "new" / "ck")
    if where == "/proc":
        if not os.path.isdir("/proc/self"):
            pytest.skip("no /proc")
        out = "/proc/shiftbench_test/ck"
    else:
        monkeypatch.setattr(trainer.tempfile, "mkstemp", read_only)
    assert main(["train", str(path), "--only", "highway", "--quiet"] + (["--out", out] if out else [])) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    named, folder = (f"--out {out}", out) if out else ("experts.highway.checkpoint", tmp_path / "ck")
    assert err.startswith(f"shiftbench: error: {named}: cannot write expert_highway.pt into {folder} (")
    assert err.endswith("); give a folder that can be created and written")
    assert [p.name for p in tmp_path.iterdir()] == ["suite.yaml"]  # the folders the check made are gone
