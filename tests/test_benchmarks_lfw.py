"""The LFW benchmark scripts (fold identities, results merging, the suite's plan, the report), the
shared results writer, and the committed results files."""

import json
import multiprocessing as mp
import re
import tempfile
from pathlib import Path

import numpy as np
import pytest

from facefuse import cli
from benchmarks import common, lfw_protocol, lfw_report, lfw_suite
from facefuse.core.metrics import roc_auc
from facefuse.trainer.config import resolve_config
from facefuse.trainer.losses import build_head


def test_fold_identities_are_disjoint_across_folds(lfw):
    folds = [lfw_protocol.fold_identities(lfw / "pairs.txt", k) for k in range(10)]
    assert all(len(f) > 300 for f in folds)
    for i in range(10):
        for j in range(i + 1, 10):
            assert not folds[i] & folds[j], (i, j)
    assert "Abel_Pacheco" in folds[0]  # first same-person line of pairs.txt


def _row(name, auc=0.9, fold=0, budget=10.0, **kw):
    rng = np.random.default_rng(len(name))
    labels = [1] * 50 + [0] * 50
    scores = list(np.r_[rng.normal(0.6, 0.2, 50), rng.normal(0.1, 0.2, 50)].round(5))
    return {"name": name, "fold": fold, "device": "cpu (test)", "budget_minutes": budget, "parameters": 1000,
            "images_per_s": 50.0, "epochs_done": 2, "val_accuracy": 0.5, "plain_kfold_accuracy": 0.8,
            "flip_kfold_accuracy": 0.81, "flip_kfold_std": 0.02, "flip_roc_auc": auc, "flip_eer": 0.2,
            "flip_tar_at_far_1e-2": 0.3, "flip_scores": scores, "pair_labels": labels,
            "history": [{"epoch": 1, "elapsed_s": 60.0, "train_loss": 5.0, "train_accuracy": 0.2, "val_accuracy": 0.1},
                        {"epoch": 2, "elapsed_s": 120.0, "train_loss": 2.0, "train_accuracy": 0.6,
                         "val_accuracy": None}], **kw}


def _merge(args):
    path, name = args
    lfw_protocol.merge_row(path, _row(name), {})


def test_merge_row_replaces_by_name_and_loses_nothing_when_runs_finish_together(tmp_path):
    path = tmp_path / "r.json"
    lfw_protocol.merge_row(path, _row("a", auc=0.5), {"protocol": "x"})
    lfw_protocol.merge_row(path, _row("a", auc=0.7), {})
    doc = json.loads(path.read_text())
    assert [r["flip_roc_auc"] for r in doc["results"]] == [0.7]
    assert doc["settings"] == {"protocol": "x", "scores": "r.scores.json"}
    assert list(doc) == ["benchmark", "device", "versions", "settings", "results"]
    with mp.get_context("spawn").Pool(4) as pool:
        pool.map(_merge, [(path, f"row{i}") for i in range(12)])
    names = {r["name"] for r in json.loads(path.read_text())["results"]}
    assert names == {"a", *(f"row{i}" for i in range(12))}
    assert set(common.read_sidecar(path)) == names
    assert sorted(p.name for p in tmp_path.iterdir()) == [".r.json.lock", "r.json", "r.scores.json"]  # no temp left


def test_merge_row_moves_the_per_pair_scores_to_the_sidecar(tmp_path):
    path = tmp_path / "lfw_protocol-x.json"
    row = _row("loss/a")
    lfw_protocol.merge_row(path, row, {})
    stored = json.loads(path.read_text())["results"][0]
    assert "flip_scores" not in stored and "pair_labels" not in stored and stored["flip_roc_auc"] == 0.9
    side = json.loads((tmp_path / "lfw_protocol-x.scores.json").read_text())
    assert side["rows"]["loss/a"] == {"fold": 0, "pair_labels": row["pair_labels"], "flip_scores": row["flip_scores"]}
    lfw_protocol.merge_row(path, {k: v for k, v in row.items() if k not in ("flip_scores", "pair_labels")}, {})
    assert common.read_sidecar(path) == {}  # a rerun without scores leaves none of the old ones behind


def test_merge_row_stores_run_paths_relative_to_their_roots(tmp_path, monkeypatch):
    monkeypatch.setenv("FACEFUSE_DATA", str(tmp_path / "data"))
    runs = tmp_path / "runs"
    row = _row("loss/a", train_args=["--data", str(tmp_path / "data" / "lfw" / "lfw-112"),
                                     "--out", str(runs / "fold0-loss" / "a" / "train"), "--lr", "3e-3"])
    lfw_protocol.merge_row(tmp_path / "r.json", row, {"data": str(tmp_path / "data" / "lfw" / "lfw-112")},
                           roots={"<runs>": runs})
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["results"][0]["train_args"] == ["--data", "<data>/lfw/lfw-112", "--out", "<runs>/fold0-loss/a/train",
                                               "--lr", "3e-3"]
    assert doc["settings"]["data"] == "<data>/lfw/lfw-112"


def test_history_keeps_epoch_records_only(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(
        '{"epoch": 1, "step": 5, "train_loss": 3.14159265, "train_accuracy": 0.25, "elapsed_s": 10.0, "lr": 0.001}\n'
        '{"event": "checkpoint", "step": 7}\n'
        '{"epoch": 2, "step": 10, "train_loss": 2.5, "train_accuracy": 0.5, "elapsed_s": 20.0, "lr": 0.0005, '
        '"val_accuracy": 0.4}\n')
    h = lfw_protocol.history(tmp_path)
    assert [r["epoch"] for r in h] == [1, 2]
    assert h[0]["train_loss"] == 3.14159 and h[0]["val_accuracy"] is None and h[1]["val_accuracy"] == 0.4


def test_suite_plan_runs_stages_first_and_every_row_is_a_valid_train_command():
    rows = lfw_suite.plan(["loss", "backbone", "regulariser"], "arcface")
    names = [n for n, _, _ in rows]
    assert len(names) == len(set(names))
    assert names.index("loss/arcface-stage1") < names.index("loss/arcface-then-triplet")
    shares = dict((n, s) for n, s, _ in rows)
    assert shares["loss/arcface-stage1"] + shares["loss/arcface-then-triplet"] == pytest.approx(1.0)
    expected = {"softmax", "softmax-ls", "sphereface", "cosface", "arcface", "triplet", "arcface+center",
                "arcface-then-triplet", "supcon"}
    assert expected <= {n.split("/", 1)[1] for n in names if n.startswith("loss/")}
    for name, _, opts in rows:  # each parses as `train` options and resolves to a valid config
        opts = [o if not o.startswith("@") else "/tmp/stage" for o in opts]
        ctx = cli.train.make_context("train", ["--data", "/tmp/d", "--out", "/tmp/x", *lfw_suite.BASE, *opts])
        overrides, sources = cli.train_overrides(ctx.params, ctx.params["pk"], ctx.params["settings"])
        cfg = resolve_config(None, overrides, sources)
        assert (cfg.model.width, cfg.model.image_size, cfg.model.embedding_dim) == (
            (0.5 if name.startswith("backbone/") else 0.25), 64, 256), name


def test_report_tables_and_plots(tmp_path):
    res = tmp_path / "r.json"
    rows = [_row("loss/arcface", 0.95), _row("loss/softmax", 0.93), _row("regulariser/arcface+ema", 0.96),
            _row("backbone/mobilenetv2-x0.5", 0.9), _row("loss/old", 0.99, budget=30.0, fold=1)]
    for r in rows:
        lfw_protocol.merge_row(res, r, {})
    loss = lfw_report.load_rows(res, "loss", 0)
    assert [r["name"] for r in loss] == ["loss/arcface", "loss/softmax"]  # by AUC, fold 0 only
    assert loss[0]["flip_scores"] == rows[0]["flip_scores"]  # read back from the sidecar
    reg = [r["name"] for r in lfw_report.load_rows(res, "regulariser", 0)]
    assert reg == ["regulariser/arcface+ema", "regulariser/arcface (none)"]
    bb = lfw_report.load_rows(res, "backbone", 0)
    assert [r["name"] for r in bb] == ["backbone/resnet18-x0.25", "backbone/mobilenetv2-x0.5"]
    assert bb[0]["pair_labels"] == rows[0]["pair_labels"]  # a reference row keeps its scores
    md = lfw_report.markdown(loss).splitlines()
    assert md[2].startswith("| arcface | 1,000 | 50 | 2 | 0.600 | 0.500 | 80.0% | 81.0% | 2.0% | 0.9500 |")
    out = tmp_path / "plots"
    lfw_report.main(["--results", str(res), "--table", "loss", "backbone", "--out", str(out),
                     "--markdown", str(tmp_path / "t.md")])
    for f in ("loss-curves.png", "loss-roc.png", "backbone-roc.png"):
        assert (out / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in out.iterdir()) == [  # written atomically: no temp file left
        "backbone-curves.png", "backbone-roc.png", "loss-curves.png", "loss-roc.png"]
    assert "### backbone" in (tmp_path / "t.md").read_text()


def test_stored_scores_reproduce_the_stored_auc():
    """Every committed row's sidecar scores give back its AUC (the ROC plots are drawn from them)."""
    path = lfw_report.RESULTS_DIR / "lfw_protocol-cpu2.json"
    rows = json.loads(path.read_text())["results"]
    scores = common.read_sidecar(path)
    assert all("flip_scores" not in r and "pair_labels" not in r for r in rows)  # the main file stays small
    assert set(scores) == {r["name"] for r in rows if "config" in r}  # every row since scores were kept
    for r in rows:
        if r["name"] in scores:
            s = scores[r["name"]]
            assert s["fold"] == r["fold"] and len(s["flip_scores"]) == len(s["pair_labels"]) == 600
            auc = roc_auc(np.asarray(s["flip_scores"]), np.asarray(s["pair_labels"], dtype=bool))
            assert auc == pytest.approx(r["flip_roc_auc"], abs=1e-3), r["name"]


COMMITTED = sorted(common.RESULTS_DIR.glob("*.json"))
_DRIVE = re.compile(r"^[A-Za-z]:[\\/]")


def _strings(obj):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield k
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)
    elif isinstance(obj, str):
        yield obj


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: p.name)
def test_committed_results_hold_no_machine_path(path):
    home = str(Path.home())
    found = [s for s in _strings(json.loads(path.read_text()))
             if s.startswith(("/", "\\", "~/")) or _DRIVE.match(s) or (len(home) > 1 and home in s)]
    assert not found, f"{path.name}: absolute paths {sorted(set(found))[:5]}"


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: p.name)
def test_committed_results_have_the_shared_shape(path):
    doc = json.loads(path.read_text())
    if path.name.endswith(common.SIDECAR_SUFFIX):
        main = path.with_name(path.name.removesuffix(common.SIDECAR_SUFFIX) + ".json")
        assert main.is_file() and set(doc) >= {"benchmark", "device", "rows"}
    else:
        assert list(doc) == ["benchmark", "device", "versions", "settings", "results"]
        assert path.name.startswith(f"{doc['benchmark']}-") and isinstance(doc["results"], list)


def test_writer_rewrites_paths_under_known_roots_and_refuses_others(tmp_path, monkeypatch):
    monkeypatch.setenv("FACEFUSE_DATA", str(tmp_path / "data"))
    doc = {"data": tmp_path / "data" / "lfw" / "pairs.txt", "run": str(tmp_path / "runs" / "a" / "train"),
           "scratch": str(Path(tempfile.gettempdir()) / "x" / "y"), "code": str(common.REPO_ROOT / "configs"),
           "relative": "runs/r18/model.onnx", "note": "~2 GB", "list": [str(tmp_path / "data")]}
    path = common.write_json(tmp_path / "out" / "x-cpu2.json", doc, roots={"<runs>": tmp_path / "runs"})
    assert json.loads(path.read_text()) == {
        "data": "<data>/lfw/pairs.txt", "run": "<runs>/a/train", "scratch": "<tmp>/x/y", "code": "<repo>/configs",
        "relative": "runs/r18/model.onnx", "note": "~2 GB", "list": ["<data>"]}
    for bad in ("/elsewhere/model.onnx", "C:\\Users\\me\\lfw", "~/lfw", f"--data={Path.home()}/lfw"):
        with pytest.raises(ValueError, match="absolute path"):
            common.write_json(path, {"settings": {"model": bad}})
    assert json.loads(path.read_text())["data"] == "<data>/lfw/pairs.txt"  # a refused write changes nothing
    assert [p.name for p in path.parent.iterdir()] == ["x-cpu2.json"]


def test_write_results_has_the_shared_shape_and_one_line_lists(tmp_path):
    path = common.write_results("demo", "cpu (test)", {"sizes": [1, 2, 3]}, [{"ms": 1.5, "scores": [0.1] * 100}],
                                out_dir=tmp_path)
    assert path == tmp_path / f"demo-{common.device_slug('cpu (test)')}.json"
    doc = json.loads(path.read_text())
    assert list(doc) == ["benchmark", "device", "versions", "settings", "results"] and doc["results"][0]["ms"] == 1.5
    assert '"scores": [0.1, 0.1,' in path.read_text()  # a list of plain values is one line


# Fields that describe where and how a run was executed rather than the recipe.
RUN_FIELDS = {"data": {"root", "exclude_identities", "val_pairs", "val_pairs_root", "val_pairs_fold",
                       "val_pairs_disjoint", "workers"},
              "top": {"out", "device", "time_budget", "threads", "checkpoint_minutes", "eval_every", "seed"},
              "optim": {"epochs"}}


# settings added after the stored rows were measured, with the value that reproduces them
ADDED_SINCE = {"data": {"alignment": "template"}, "loss": {"head_parallel": False, "sample_rate": 1.0, "head_options": {}},
               "augment": {"rotate": 0.0, "translate": 0.0, "zoom": (1.0, 1.0), "grayscale": 0.0, "blur": 0.0,
                           "jpeg": 0.0, "shading": 0.0}}


def test_default_config_is_the_measured_recipe():
    """`facefuse train --data D --out O` trains the recipe of the committed row it was chosen from."""
    from facefuse.trainer.config import DEFAULT_RECIPE_ROW, TrainConfig

    doc = json.loads((lfw_report.RESULTS_DIR / "lfw_protocol-cpu2.json").read_text())
    row = next(r for r in doc["results"] if r["name"] == DEFAULT_RECIPE_ROW)
    measured, default = row["config"], TrainConfig().to_dict()
    for section, values in default.items():
        if isinstance(values, dict):
            # settings added after the row was measured must default to what the row trained
            for key, neutral in ADDED_SINCE.get(section, {}).items():
                if key not in measured[section]:
                    assert values.pop(key) == neutral, f"{section}.{key}"
            assert set(values) == set(measured[section]), (
                f"{section}: keys only in the default {sorted(set(values) - set(measured[section]))}, "
                f"only in the stored row {sorted(set(measured[section]) - set(values))}")
            for key, value in values.items():
                if key not in RUN_FIELDS.get(section, ()):
                    got = measured[section][key]
                    if (section, key) == ("loss", "margin") and value is None:  # the head's own default
                        value = build_head(default["loss"]["name"], 4, 3).margin
                    got = tuple(got) if isinstance(value, tuple) else got
                    assert got == value, f"{section}.{key}: default {value!r}, measured {got!r}"
        elif section not in RUN_FIELDS["top"]:
            assert measured[section] == values, section
    # the time-budgeted run's epoch count is the default's
    assert default["optim"]["epochs"] == row["epochs_done"]
    assert row["minutes"] <= 30


def _comparable(config: dict) -> dict:
    """A stored or resolved config without the fields that belong to one run (paths, budget)."""
    out = {}
    for section, values in config.items():
        if isinstance(values, dict):
            out[section] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in values.items()
                            if k not in RUN_FIELDS.get(section, ())}
        elif section not in RUN_FIELDS["top"]:
            out[section] = values
    return out


def _effective(config: dict) -> dict:
    """The pair loss's settings with its defaults filled in (``{}`` and the defaults spelled out agree)."""
    from facefuse.trainer.losses import PAIR_LOSSES, pair_loss_settings

    loss = dict(config["loss"])
    in_use = loss["pair_loss"] or (loss["name"] if loss["name"] in PAIR_LOSSES else None)
    if in_use:
        loss["pair_options"] = {**pair_loss_settings(in_use), **loss["pair_options"]}
    return {**config, "loss": loss}


def _unused_by_row(diff: str, config: dict) -> bool:
    """A difference in a setting the row's loss ignores (the logit scale of plain softmax or of a
    pair loss alone), left by a default that changed after the row was measured."""
    return diff.startswith("loss.scale:") and config["loss"]["name"] in ("softmax", "triplet", "supcon")


def test_yaml_recipes_reproduce_the_stored_rows_configs():
    """configs/lfw_suite.yaml is a faithful transcription: each row it plans resolves to the config
    the committed results file stored for that row (the run's paths and budget aside)."""
    doc = json.loads((lfw_report.RESULTS_DIR / "lfw_protocol-cpu2.json").read_text())
    stored = {r["name"]: r["config"] for r in doc["results"] if r.get("config")}
    checked = 0
    for name, _, opts in lfw_suite.plan(["loss", "backbone", "recipe", "repeat", "regulariser", "lever"], "sphereface"):
        if name not in stored or "--init-from" in opts:
            continue
        ctx = cli.train.make_context("train", ["--data", "/tmp/d", "--out", "/tmp/x", *lfw_suite.BASE, *opts])
        overrides, sources = cli.train_overrides(ctx.params, ctx.params["pk"], ctx.params["settings"])
        resolved = resolve_config(None, overrides, sources).to_dict()
        want, got = _comparable(_effective(stored[name])), _comparable(_effective(resolved))
        diffs = [f"{sec}.{k}: stored {v!r}, yaml {got[sec].get(k)!r}" for sec in want if isinstance(want[sec], dict)
                 for k, v in want[sec].items() if got[sec].get(k) != v]
        diffs += [f"{sec}: stored {want[sec]!r}, yaml {got[sec]!r}" for sec in want
                  if not isinstance(want[sec], dict) and got[sec] != want[sec]]
        assert not [d for d in diffs if not _unused_by_row(d, resolved)], (name, diffs)
        checked += 1
    assert checked >= 10


def test_default_yaml_is_the_dataclass_default():
    """configs/default.yaml spells out the default recipe; it must equal the dataclass defaults."""
    from facefuse.trainer.config import TrainConfig

    assert resolve_config(lfw_suite.ROOT / "configs" / "default.yaml") == TrainConfig()


def test_release_yaml_is_the_default_recipe_with_the_mild_jitter_on_a_time_budget():
    """configs/release.yaml is the default recipe with the lever rows' mild jitter (the same numbers
    as configs/lfw_suite.yaml's `mild`, the rows that chose it) and a budget of minutes instead of
    20 epochs; nothing else differs."""
    import dataclasses

    from facefuse.trainer.config import TrainConfig

    release = resolve_config(lfw_suite.ROOT / "configs" / "release.yaml")
    default = TrainConfig()
    mild = lfw_suite.RECIPES["mild"]
    assert release.time_budget == 60 and release.optim.epochs >= 100
    assert {k: getattr(release.augment, k) for k in mild} == {k: tuple(v) if isinstance(v, list) else v
                                                               for k, v in mild.items()}
    augment = dataclasses.replace(release.augment, **{k: getattr(default.augment, k) for k in mild})
    assert dataclasses.replace(release, time_budget=0.0, optim=dataclasses.replace(release.optim, epochs=20),
                               augment=augment) == default
    assert {"lever/mild-60min", "lever/mild-60min-seed1"} <= set(lfw_suite.RECIPES["longer"])
