
import pytest
import torch

from facefuse.trainer.config import TrainConfig, resolve_config, save_config
from facefuse.core.errors import FacefuseError
from facefuse.trainer.optim import build_ema, build_optimizer, lr_factor, param_groups
from facefuse.trainer.config import OptimConfig


def test_precedence_defaults_file_options(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("optim: {lr: 0.1, epochs: 7}\nmodel: {backbone: mobilenetv2}\n")
    cfg = resolve_config(f, {"optim.lr": 0.01, "data.root": "x"})
    assert cfg.optim.lr == 0.01 and cfg.optim.epochs == 7 and cfg.model.backbone == "mobilenetv2"
    assert cfg.optim.batch_size == TrainConfig().optim.batch_size
    save_config(cfg, tmp_path / "saved.yaml")
    again = resolve_config(tmp_path / "saved.yaml")
    assert again == cfg  # the saved config reproduces the run's config


def test_config_file_errors(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("optim: {learning_rate: 0.1}\n")
    with pytest.raises(FacefuseError, match=r"unknown key 'learning_rate'; valid: optimizer, lr"):
        resolve_config(f)
    f.write_text("optim: [1, 2\n")
    with pytest.raises(FacefuseError, match="not valid YAML"):
        resolve_config(f)
    with pytest.raises(FacefuseError, match="no such file"):
        resolve_config(tmp_path / "none.yaml")


def test_lr_schedule():
    assert lr_factor(0, 10, 0.0, 0.01) == pytest.approx(0.1)
    assert lr_factor(9, 10, 0.0, 0.01) == pytest.approx(1.0)
    assert lr_factor(50, 10, 0.5, 0.0) == pytest.approx(0.5)
    assert lr_factor(100, 10, 1.0, 0.01) == pytest.approx(0.01)
    values = [lr_factor(s, 5, s / 100, 0.0) for s in range(5, 100)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # monotone after warm-up


def test_no_weight_decay_on_norms_and_biases():
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                            torch.nn.Linear(4, 2))
    groups = param_groups(m, 0.05)
    decayed = {id(p) for p in groups[0]["params"]}
    assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0
    assert decayed == {id(m[0].weight), id(m[3].weight)}
    opt = build_optimizer(m, OptimConfig(optimizer="sgd"))
    assert isinstance(opt, torch.optim.SGD)


def test_center_loss_has_its_own_lr():
    from facefuse.trainer.losses import build_pair_loss

    m = torch.nn.ModuleDict({"fc": torch.nn.Linear(3, 3), "center": build_pair_loss("center", 3, 5, lr=0.7)})
    groups = param_groups(m, 0.1)
    special = [g for g in groups if g.get("fixed_lr")]
    assert len(special) == 1 and special[0]["lr"] == 0.7 and special[0]["weight_decay"] == 0.0


def test_center_loss_without_lr_follows_the_model_lr_undecayed():
    from facefuse.trainer.losses import build_pair_loss

    m = torch.nn.ModuleDict({"fc": torch.nn.Linear(3, 3), "center": build_pair_loss("center", 3, 5)})
    groups = param_groups(m, 0.1)
    assert not any(g.get("fixed_lr") or "lr" in g for g in groups)
    undecayed = [g for g in groups if g["weight_decay"] == 0.0]
    assert any(p is m["center"].centers for g in undecayed for p in g["params"])
    assert not any(p is m["center"].centers for p in groups[0]["params"])


def test_ema_tracks_weights():
    m = torch.nn.Linear(2, 2)
    ema = build_ema(m, 0.5)
    w0 = m.weight.detach().clone()
    ema.update_parameters(m)  # the first update copies
    with torch.no_grad():
        m.weight.add_(1.0)
    ema.update_parameters(m)
    torch.testing.assert_close(ema.module.weight, w0 + 0.5)
    assert build_ema(m, 0.0) is None
