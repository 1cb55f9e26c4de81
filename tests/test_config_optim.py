
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
    with pytest.raises(FacefuseError, match=r"unknown key 'optim.learning_rate'; valid: optim.optimizer, optim.lr"):
        resolve_config(f)
    f.write_text("optim: [1, 2\n")
    with pytest.raises(FacefuseError, match="not valid YAML"):
        resolve_config(f)
    with pytest.raises(FacefuseError, match="no such file"):
        resolve_config(tmp_path / "none.yaml")


def test_every_setting_has_one_name_in_files_set_and_options(tmp_path):
    """Each dataclass field is settable from YAML and from --set under the same dotted name, and the
    values survive a save/load round trip."""
    from facefuse.trainer.config import default_of, leaf_fields

    for key, f, t in leaf_fields():
        value = default_of(f)
        section, _, leaf = key.rpartition(".")
        nested = {section: {leaf: value}} if section else {leaf: value}
        path = tmp_path / "one.yaml"
        import yaml
        path.write_text(yaml.safe_dump(nested))
        assert resolve_config(path) == TrainConfig(), key
        assert resolve_config(None, {key: value}) == TrainConfig(), key


def test_values_are_coerced_to_the_setting_type(tmp_path):
    from facefuse.trainer.config import parse_set

    f = tmp_path / "c.yaml"
    f.write_text("optim: {lr: 3e-3, epochs: 4}\ndata: {skip_bad: yes, mean: [0.4, 0.5, 0.6]}\n")
    cfg = resolve_config(f)
    assert cfg.optim.lr == 0.003 and isinstance(cfg.optim.lr, float)  # YAML 1.1 reads 3e-3 as a string
    assert cfg.data.skip_bad is True and cfg.data.mean == (0.4, 0.5, 0.6)
    cfg = resolve_config(None, parse_set(["optim.lr=1e-4", "loss.name=triplet", "loss.pair_options.margin=0.3",
                                          "data.val_pairs_fold=none"]))
    assert cfg.optim.lr == 1e-4 and cfg.loss.pair_options == {"margin": 0.3} and cfg.data.val_pairs_fold is None


@pytest.mark.parametrize("text,overrides,sources,message", [
    ("optim: {epochs: 0}", {}, {}, "--config {f}: optim.epochs: must be >= 1"),
    ("optim: {epochs: two}", {}, {}, "--config {f}: optim.epochs: expected int, got 'two'"),
    ("", {"optim.epochs": 0}, {"optim.epochs": "--epochs"}, "--epochs: must be >= 1"),
    ("", {"optim.epochs": 0}, {"optim.epochs": "--set optim.epochs"}, "--set optim.epochs: must be >= 1"),
    ("", {"optim.lr": "fast"}, {"optim.lr": "--set optim.lr"}, "--set optim.lr: expected float, got 'fast'"),
    ("", {"optim.nope": 1}, {"optim.nope": "--set optim.nope"}, "--set optim.nope: unknown key 'optim.nope'"),
    ("model: {backbone: vgg}", {}, {}, "--config {f}: model.backbone: unknown 'vgg'; valid: convnext_t"),
    ("loss: {name: arcface, head_options: {subcenters: 2}}", {}, {},
     "loss.head_options: subcenters: not a setting of the 'arcface' head; valid: none"),
    ("loss: {name: adaface, head_options: {subcenters: 2}}", {}, {},
     "loss.head_options: subcenters: not a setting of the 'adaface' head; valid: h, t_alpha"),
    ("loss: {name: triplet, head_options: {h: 0.3}}", {}, {}, "loss.head_options: set, but --loss triplet is not"),
    ("augment: {zoom: [1.1, 0.9]}", {}, {}, "--config {f}: augment.zoom: must be (lo, hi) with 0 < lo <= hi <= 4"),
    ("augment: {zoom: [0.9]}", {}, {}, "--config {f}: augment.zoom: expected"),
    ("", {"augment.jpeg": 1.5}, {"augment.jpeg": "--set augment.jpeg"}, "--set augment.jpeg: probability must be in [0, 1]"),
    ("augment: {shading: 1.0}", {}, {}, "augment.shading: must be in [0, 1), got 1.0"),
    ("augment: {translate: 0.5}", {}, {}, "augment.translate: must be in [0, 0.5)"),
    ("loss: {name: arcface, pair_options: {margin: 0.3}}", {}, {}, "loss.pair_options: set, but no pair loss"),
    ("loss: {name: triplet, pair_options: {temperature: 0.3}}", {}, {},
     "temperature: not a setting of the 'triplet' pair loss; valid: margin, mining"),
])
def test_validation_names_the_key_as_written(tmp_path, text, overrides, sources, message):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(FacefuseError) as info:
        resolve_config([f] if text else None, overrides, sources)
    assert message.format(f=f) in str(info.value)


def test_later_config_files_override_earlier_ones_and_legacy_keys_are_read(tmp_path):
    base, row = tmp_path / "base.yaml", tmp_path / "row.yaml"
    base.write_text("optim: {lr: 0.1, epochs: 3}\nloss: {name: arcface, s: 16}\ndata: {num_workers: 0}\n")
    row.write_text("optim: {lr: 0.2}\n")
    cfg = resolve_config([base, row])
    assert (cfg.optim.lr, cfg.optim.epochs, cfg.loss.scale, cfg.data.workers) == (0.2, 3, 16.0, 0)


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


def test_train_help_lists_every_scalar_setting_with_its_dataclass_default():
    import typing

    from click.testing import CliRunner

    from facefuse.cli import main
    from facefuse.trainer.config import default_of, leaf_fields

    out = CliRunner().invoke(main, ["train", "--help"], terminal_width=2000).output
    flat = " ".join(out.split())
    for key, f, t in leaf_fields():
        base = next((a for a in typing.get_args(t) if a is not type(None)), t)
        if base in (int, float, str, bool):
            assert f"[{key}; default: {default_of(f)}]" in flat, key
    assert "--lr FLOAT" in flat and "--kernels TEXT" in flat and "--ema-decay FLOAT" in flat


@pytest.mark.parametrize("key,value,message", [
    ("optim.epochs", 2.5, "expected int, got 2.5"),
    ("optim.epochs", True, "expected int, got True"),
    ("data.skip_bad", "maybe", "expected bool, got 'maybe'"),
    ("data.mean", [0.5, 0.5], "expected a list of 3 numbers"),
    ("data.mean", ["a", "b", "c"], "expected a list of 3 numbers"),
    ("loss.pair_options", "margin=0.3", "expected a mapping"),
    ("model.backbone", ["resnet18"], "expected str"),
    ("optim.lr", None, "must be set"),
])
def test_wrong_types_are_one_clear_error(key, value, message):
    with pytest.raises(FacefuseError, match=f"--set {key}: {message}"):
        resolve_config(None, {key: value}, {key: f"--set {key}"})
