"""export.quantize: INT8 (QDQ, per-channel) models of an exported embedding model, checked against
the float32 model on real-looking faces, and every bad calibration input as one clear error."""

import json

import numpy as np
import onnx
import pytest

from helpers import assert_one_line_error, make_model_file, run_cli, write_identities
from facefuse.export.onnx_export import export_onnx
from facefuse.export.quantize import calibration_images, quantize_int8
from facefuse.export.runtime import OnnxEmbedder
from facefuse.core.errors import FacefuseError


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    faces = root / "faces"
    write_identities(faces, [f"p{i}" for i in range(8)], 5, size=64)
    make_model_file(root / "m.pt", backbone="convnext_atto", dim=64, size=64, random_bn=True)
    export_onnx(root / "m.pt", root / "m.onnx", check_images=faces)
    return root / "m.onnx", faces


def test_int8_model_is_qdq_per_channel_and_close_to_float32(exported, tmp_path):
    onnx_path, faces = exported
    r = quantize_int8(onnx_path, tmp_path / "m8.onnx", faces, n_images=40, method="minmax")
    assert (r.n_calibration, r.n_check, r.skipped) == (30, 10, 0)
    model = onnx.load(str(tmp_path / "m8.onnx"))
    ops = [n.op_type for n in model.graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    conv_weights = [n.input[1] for n in model.graph.node if n.op_type == "Conv"]
    # every Conv weight arrives through a DequantizeLinear of an int8 tensor with one scale per channel
    deq = {n.output[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear"}
    assert conv_weights and all(w in deq for w in conv_weights)
    for w in conv_weights:
        q, scale = inits[deq[w].input[0]], inits[deq[w].input[1]]
        assert q.dtype == np.int8 and scale.shape == (q.shape[0],)
    # LayerNorm and GELU stay in float: none of them reads a quantized tensor directly
    quantized = {n.output[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    float_ops = [n for n in model.graph.node if n.op_type in ("LayerNormalization", "Erf", "Gelu")]
    assert float_ops and not any(i in quantized for n in float_ops for i in n.input)
    # the metadata contract carries over, marked int8
    fp32, int8 = OnnxEmbedder(onnx_path), OnnxEmbedder(tmp_path / "m8.onnx")
    assert int8.meta == fp32.meta and int8.meta_props["facefuse.dtype"] == "int8"
    assert json.loads(int8.meta_props["facefuse.quantization"])["calibration_images"] == 30
    # independent check of the reported cosine: embed every face with both models
    paths = sorted(faces.rglob("*.jpg"))
    a, _ = fp32.embed_paths(paths, workers=0)
    b, _ = int8.embed_paths(paths, workers=0)
    cos = np.sum(a * b, axis=1)
    assert cos.min() > 0.97 and abs(np.sort(cos)[0] - r.min_cosine) < 0.05


def test_quantize_cli_and_bad_calibration_inputs(exported, tmp_path):
    onnx_path, faces = exported
    out = tmp_path / "q.onnx"
    r = run_cli("quantize", onnx_path, "--out", out, "--calib-images", faces, "--n-images", 16)
    assert r.exit_code == 0, r.output
    assert "min cosine" in r.output and out.is_file()
    empty, bad = tmp_path / "empty", tmp_path / "bad"
    empty.mkdir()
    bad.mkdir()
    (bad / "a.jpg").write_bytes(b"not a jpeg")
    (bad / "b.png").write_bytes(b"\x89PNG broken")
    cases = [((tmp_path / "none"), "no such folder"), (empty, "no images found"), (bad, "0 readable images of 2")]
    for folder, message in cases:
        target = tmp_path / f"out-{folder.name}.onnx"
        assert_one_line_error(run_cli("quantize", onnx_path, "--out", target, "--calib-images", folder),
                              f"--calib-images {folder}", message)
        assert not target.exists()
    assert_one_line_error(run_cli("quantize", out, "--out", tmp_path / "again.onnx", "--calib-images", faces),
                          "quantize a float32 export")
    assert_one_line_error(run_cli("quantize", tmp_path / "missing.onnx", "--out", tmp_path / "x.onnx",
                                  "--calib-images", faces), "missing.onnx")


def test_export_writes_the_int8_model_beside_the_float32_one(exported, tmp_path):
    onnx_path, faces = exported
    checkpoint = onnx_path.parent / "m.pt"
    r = run_cli("export", "--onnx", tmp_path / "f.onnx", "--checkpoint", checkpoint, "--check-images", faces,
                "--int8", tmp_path / "i.onnx", "--calib-images", faces)
    assert r.exit_code == 0, r.output
    assert "INT8 QDQ" in r.output and OnnxEmbedder(tmp_path / "i.onnx").meta_props["facefuse.dtype"] == "int8"
    r = run_cli("export", "--onnx", tmp_path / "g.onnx", "--checkpoint", checkpoint, "--int8", tmp_path / "j.onnx")
    assert r.exit_code == 2 and "--calib-images" in r.output and not (tmp_path / "g.onnx").exists()


def test_calibration_images_spread_over_the_folder(tmp_path):
    ids = write_identities(tmp_path, [f"id{i}" for i in range(10)], 4, size=16)
    picked = calibration_images(tmp_path, 10)
    assert len(picked) == 10 and len({p.parent.name for p in picked}) >= 8
    assert sorted(picked) == picked and all(p in sum(ids.values(), []) for p in picked)
    (tmp_path / "only-text").mkdir()
    (tmp_path / "only-text" / "notes.txt").write_text("no faces here")
    with pytest.raises(FacefuseError, match="no images found"):
        calibration_images(tmp_path / "only-text", 4)
