"""One settings object (core.settings.EmbedSettings): stored whole, read back from every record
shape facefuse has written (including the loose keys of records made before it), compared by one
function, and built by the CLI from its options."""

import json

import pytest
from click.testing import CliRunner

from facefuse.core.errors import ParameterError
from facefuse.core.settings import VECTOR_FIELDS, EmbedSettings, settings_mismatch


def test_round_trip_and_defaults():
    s = EmbedSettings(flip=True, align="haar", center=True, batch_size=8, workers=0, skip_missing=True)
    assert EmbedSettings.from_record({"settings": json.loads(json.dumps(s.to_dict()))}) == s
    assert EmbedSettings.from_record(None) == EmbedSettings() == EmbedSettings.from_record({})
    assert s.replace(batch_size=None, workers=2) == EmbedSettings(True, "haar", True, 8, 2, True)
    assert s.vectors() == {"flip": True, "align": "haar", "center": True} and VECTOR_FIELDS == tuple(s.vectors())
    with pytest.raises(ParameterError, match="^flp=True: not an embedding setting"):
        s.replace(flp=True)
    with pytest.raises(ParameterError, match="^workers=-1: must be an integer >= 0"):
        EmbedSettings(workers=-1)


@pytest.mark.parametrize("record,expected", [
    # calibration provenance before the settings object: flip_tta, detect, center loose
    ({"source": "pairs.txt", "flip_tta": True, "detect": "haar", "center": True, "seed": 0},
     EmbedSettings(flip=True, align="haar", center=True)),
    # older still: no detect, no center
    ({"source": "pairs.txt", "flip_tta": False}, EmbedSettings()),
    # an embed manifest of the last release
    ({"format": "facefuse-embeddings", "flip_tta": True, "detect": "none", "dim": 8}, EmbedSettings(flip=True)),
    # a gallery's params
    ({"nlist": 4, "nprobe": 2, "flip_tta": False, "detect": "haar"}, EmbedSettings(align="haar")),
])
def test_records_written_before_the_settings_object_still_read(record, expected):
    assert EmbedSettings.from_record(record) == expected


def test_mismatch_compares_what_changes_the_vectors_only():
    a = EmbedSettings(flip=True, batch_size=8, workers=0)
    assert settings_mismatch(a, a.replace(batch_size=128, workers=4, skip_missing=True)) is None
    assert (settings_mismatch(a, a.replace(align="landmarks"), made="calibrated")
            == "calibrated with flip on, align none; this run uses flip on, align landmarks")
    assert "centred" in settings_mismatch(a.replace(center=True), a)


def test_legacy_calibration_record_is_read_for_the_mismatch_note():
    from facefuse.core.meta import ModelMeta
    from facefuse.verification.thresholds import calibrated_settings, calibration_mismatch

    meta = ModelMeta("resnet18", 8, 64, thresholds={"at_far": [], "provenance": {"flip_tta": True, "detect": "haar"}})
    assert calibrated_settings(meta) == EmbedSettings(flip=True, align="haar")
    assert calibration_mismatch(meta, EmbedSettings(flip=True, align="haar", workers=3)) is None
    assert "align haar; this run uses flip on, align none" in calibration_mismatch(meta, EmbedSettings(flip=True))


def test_cli_options_build_one_settings_object():
    import click

    from facefuse.cli import settings_from, settings_options

    seen = {}

    @click.command()
    @settings_options("flip", "align", "center", "batch_size", "workers", "skip_missing")
    def probe(**options):
        seen["settings"] = settings_from(options)
        seen["rest"] = options

    r = CliRunner().invoke(probe, ["--flip", "--detect", "haar", "--batch-size", "8"])  # --detect: the older name
    assert r.exit_code == 0, r.output
    assert seen == {"settings": EmbedSettings(flip=True, align="haar", batch_size=8), "rest": {}}
    assert CliRunner().invoke(probe, []).exit_code == 0 and seen["settings"] == EmbedSettings()


def test_auto_alignment_is_what_the_models_training_faces_need(tmp_path):
    import facefuse
    from facefuse.core.meta import ModelMeta
    from facefuse.core.settings import resolve_align
    from facefuse.export.runtime import meta_from_props, meta_to_props
    from helpers import make_model_file

    assert [resolve_align("auto", t) for t in ("template", "none", "")] == ["landmarks", "none", "none"]
    assert resolve_align("haar", "template") == "haar"
    crops = facefuse.load_model(make_model_file(tmp_path / "t.pt", size=48, dim=8, alignment="template"),
                                align="auto")
    older = facefuse.load_model(make_model_file(tmp_path / "o.pt", size=48, dim=8), align="auto")
    assert (crops.settings.align, older.settings.align) == ("landmarks", "none")  # resolved, never stored as auto
    assert crops.with_settings(align="auto", flip=True).settings == EmbedSettings(flip=True, align="landmarks")
    meta = ModelMeta("resnet18", 8, 64, fingerprint="f", alignment="template")
    assert meta_from_props(meta_to_props(meta), "m.onnx").alignment == "template"  # travels with an ONNX export
