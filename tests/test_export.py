"""export.onnx_export and export.runtime: ONNX export parity with PyTorch, the metadata contract,
both Embedder implementations, flip TTA and bad images."""


import numpy as np
import onnx
import pytest
import torch

import helpers
from facefuse.export import onnx_export
from facefuse.export.onnx_export import export_onnx
from facefuse.export.runtime import OnnxEmbedder, TorchEmbedder, load_embedder
from facefuse.core.errors import FacefuseError


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    yield


def make_model_file(path, seed=0, **kw):
    """The export tests' model: non-trivial BatchNorm statistics and a non-default mean/std."""
    return helpers.make_model_file(path, seed=seed, random_bn=True, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), **kw)



make_images = helpers.write_images



@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    return make_model_file(tmp_path_factory.mktemp("model") / "model.pt")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("imgs") / "faces", n=7)


@pytest.fixture(scope="module")
def exported(model_file, images, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    report = export_onnx(model_file, out, check_images=images[0].parent)
    return out, report


def _reference(model_file, images):
    """PyTorch float64 reference embeddings of the images, preprocessed by hand."""
    from facefuse.trainer.checkpoint import load_embedding_model
    from facefuse.trainer.data import eval_transform, open_rgb

    model, meta = load_embedding_model(model_file)
    tf = eval_transform(meta.image_size, meta.mean, meta.std)
    x = torch.stack([tf(open_rgb(p)) for p in images]).double()
    with torch.no_grad():
        return model.double()(x).numpy(), x


def _cos_rows(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_dynamo_export_report_metadata_and_checker(exported, model_file):
    out, r = exported
    assert r.exporter == "dynamo" and r.fallback_reason is None and r.dtype == "float32"
    assert r.min_cosine >= 0.9999 and r.n_check == 7 and "images from" in r.check_source
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    props = {p.key: p.value for p in model.metadata_props}
    meta = TorchEmbedder(model_file, device="cpu").meta
    assert props["facefuse.fingerprint"] == meta.fingerprint
    assert props["facefuse.image_size"] == "64" and props["facefuse.embedding_dim"] == "32"
    assert props["facefuse.mean"] == "[0.5, 0.4, 0.3]" and props["facefuse.channel_order"] == "RGB"
    assert props["facefuse.exporter"] == "dynamo" and props["facefuse.backbone"] == "resnet18"
    batch_dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value  # dynamic batch axis
    assert not list(out.parent.glob(".*"))  # no temp file left


@pytest.mark.parametrize("batch", [1, 2, 5, 13])
def test_onnx_matches_pytorch_float64_at_any_batch(exported, model_file, images, batch):
    ref, x = _reference(model_file, (images * 2)[:batch])
    got = OnnxEmbedder(exported[0]).embed_tensor(x.float(), normalize=False)
    assert got.shape == (batch, 32) and got.dtype == np.float32
    assert _cos_rows(got, ref).min() >= 0.9999
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-3)


def test_io_binding_equals_plain_run_and_reference(exported, model_file, images):
    """The I/O-binding path (on by default on CUDA) binds torch buffers by pointer; on CPU it must
    give the plain run's embeddings, at batch 1 and at a batch that differs from the last call's."""
    ref, x = _reference(model_file, images)
    bound, plain = OnnxEmbedder(exported[0], io_binding=True), OnnxEmbedder(exported[0])
    assert bound.io_binding and not plain.io_binding  # no GPU here: off by default
    for batch in (len(images), 1, 3):
        got = bound.embed_tensor(x[:batch].float(), normalize=False)
        assert got.shape == (batch, 32) and got.dtype == np.float32
        np.testing.assert_array_equal(got, plain.embed_tensor(x[:batch].float(), normalize=False))
        assert _cos_rows(got, ref[:batch]).min() >= 0.9999


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (ORT's CUDA provider)")
def test_cuda_fp16_model_with_io_binding(tmp_path, model_file, images):
    out = tmp_path / "fp16.onnx"
    export_onnx(model_file, out, fp16=True, check_images=images[0].parent)
    emb = OnnxEmbedder(out)
    assert emb.io_binding and emb.session.get_providers()[0] == "CUDAExecutionProvider"
    ref, x = _reference(model_file, images)
    assert _cos_rows(emb.embed_tensor(x.float(), normalize=False), ref).min() >= 0.995


def test_embed_paths_onnx_equals_torch_and_reference(exported, model_file, images):
    ref, _ = _reference(model_file, images)
    ref = ref / np.linalg.norm(ref, axis=1, keepdims=True)
    for emb in (OnnxEmbedder(exported[0]), TorchEmbedder(model_file, device="cpu")):
        e, ok = emb.embed_paths(images, batch_size=3, workers=0)
        assert ok.all() and e.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
        np.testing.assert_allclose(e, ref, atol=1e-5)
    assert OnnxEmbedder(exported[0]).meta.fingerprint == TorchEmbedder(model_file, device="cpu").meta.fingerprint


def test_embed_paths_with_worker_processes(model_file, images):
    emb = TorchEmbedder(model_file, device="cpu")
    many = images * 10  # >= 64 paths: decoded in 2 DataLoader workers
    a, ok = emb.embed_paths(many, batch_size=16, workers=2)
    b, _ = emb.embed_paths(images, batch_size=16, workers=0)
    assert ok.all()
    np.testing.assert_allclose(a, np.tile(b, (10, 1)), atol=1e-6)


def test_flip_tta_is_sum_of_image_and_mirror(model_file, images):
    ref, x = _reference(model_file, images)
    with torch.no_grad():
        from facefuse.trainer.checkpoint import load_embedding_model
        mirror = load_embedding_model(model_file)[0].double()(x.flip(-1)).numpy()
    want = ref + mirror
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    e, _ = TorchEmbedder(model_file, device="cpu").embed_paths(images, flip=True, workers=0)
    np.testing.assert_allclose(e, want, atol=1e-5)
    plain, _ = TorchEmbedder(model_file, device="cpu").embed_paths(images, workers=0)
    assert np.abs(e - plain).max() > 1e-3  # the flip really changes the result


def test_bgr_channel_order_is_applied(tmp_path, images):
    rgb = make_model_file(tmp_path / "rgb.pt", seed=3)
    bgr = make_model_file(tmp_path / "bgr.pt", seed=3, channel_order="BGR")
    ref, x = _reference(rgb, images[:3])
    from facefuse.trainer.checkpoint import load_embedding_model
    with torch.no_grad():
        want = load_embedding_model(rgb)[0].double()(x.flip(1)).numpy()
    e, _ = TorchEmbedder(bgr, device="cpu").embed_paths(images[:3], workers=0)
    np.testing.assert_allclose(e, want / np.linalg.norm(want, axis=1, keepdims=True), atol=1e-5)


def test_missing_and_corrupt_images(tmp_path, model_file, images):
    emb = TorchEmbedder(model_file, device="cpu")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    missing = [tmp_path / f"gone{i}.jpg" for i in range(7)]
    paths = [images[0], *missing, bad, images[1]]
    where = {missing[0]: "pairs.txt:17"}
    with pytest.raises(FacefuseError, match=r"7 missing image\(s\): .*gone0.jpg: no such file \(pairs.txt:17\);"
                                            r".* and 2 more \(skip_missing=True goes on without them\)"):
        emb.embed_paths(paths, workers=0, where=where)
    with pytest.raises(FacefuseError, match=r"1 unreadable image\(s\): .*bad.jpg: (not an image|corrupt)"):
        emb.embed_paths([images[0], bad], workers=0)
    e, ok = emb.embed_paths(paths, workers=0, skip_missing=True)
    assert ok.tolist() == [True] + [False] * 8 + [True]
    assert np.all(e[~ok] == 0)
    good, _ = emb.embed_paths([images[0], images[1]], workers=0)
    np.testing.assert_allclose(e[ok], good, atol=1e-6)


def test_torchscript_exporter_and_fp16(tmp_path, model_file, images):
    ts = export_onnx(model_file, tmp_path / "ts.onnx", exporter="torchscript", opset=17,
                     check_images=images[0].parent)
    assert ts.exporter == "torchscript" and ts.opset == 17 and ts.min_cosine >= 0.9999
    half = export_onnx(model_file, tmp_path / "half.onnx", fp16=True, exporter="torchscript",
                       check_images=images[0].parent)
    assert half.dtype == "float16" and half.min_cosine >= onnx_export.MIN_COSINE["float16"]
    m = onnx.load(str(tmp_path / "half.onnx"))
    assert m.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # float32 I/O kept
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in m.graph.initializer)
    ref, x = _reference(model_file, images)
    got = OnnxEmbedder(tmp_path / "half.onnx").embed_tensor(x.float(), normalize=False)
    assert _cos_rows(got, ref).min() >= 0.995


def test_failed_parity_writes_nothing(tmp_path, model_file, monkeypatch):
    monkeypatch.setitem(onnx_export.MIN_COSINE, "float32", 1.5)  # impossible: every export must fail
    out = tmp_path / "m.onnx"
    with pytest.raises(FacefuseError, match="export check failed.*nothing written"):
        export_onnx(model_file, out, exporter="torchscript")
    assert list(tmp_path.iterdir()) == []


def test_falls_back_to_torchscript_and_says_why(tmp_path, model_file, monkeypatch):
    real = torch.onnx.export

    def no_dynamo(*args, dynamo=False, **kw):
        if dynamo:
            raise RuntimeError("dynamo unavailable in this test")
        return real(*args, dynamo=False, **kw)

    monkeypatch.setattr(torch.onnx, "export", no_dynamo)
    r = export_onnx(model_file, tmp_path / "m.onnx")
    assert r.exporter == "torchscript" and "dynamo unavailable in this test" in r.fallback_reason


def test_model_loading_errors(tmp_path, exported, model_file):
    (tmp_path / "junk.onnx").write_bytes(b"not a model at all")
    with pytest.raises(FacefuseError, match="junk.onnx: not a valid ONNX model"):
        load_embedder(tmp_path / "junk.onnx")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(FacefuseError, match="junk.pt: not a facefuse checkpoint"):
        load_embedder(tmp_path / "junk.pt")
    with pytest.raises(FacefuseError, match="no such model"):
        load_embedder(tmp_path / "nothing.onnx")
    plain = onnx.load(str(exported[0]))
    del plain.metadata_props[:]
    onnx.save(plain, str(tmp_path / "bare.onnx"))
    with pytest.raises(FacefuseError, match="no facefuse preprocessing metadata"):
        load_embedder(tmp_path / "bare.onnx")
    assert isinstance(load_embedder(exported[0]), OnnxEmbedder)
    assert isinstance(load_embedder(model_file), TorchEmbedder)
    assert isinstance(load_embedder(model_file.parent), TorchEmbedder)  # run folder holding model.pt


def test_export_synthetic_when_no_images(monkeypatch, tmp_path, model_file):
    monkeypatch.setenv("FACEFUSE_DATA", str(tmp_path / "no-data"))
    batch, source = onnx_export.check_batch(TorchEmbedder(model_file, device="cpu").meta, None, 4)
    assert "synthetic" in source and batch.shape == (4, 3, 64, 64) and batch.std() > 0.1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_runtimes_match_cpu(exported, model_file, images):
    cpu, _ = TorchEmbedder(model_file, device="cpu").embed_paths(images, workers=0)
    gpu, _ = TorchEmbedder(model_file, device="cuda").embed_paths(images, workers=0)
    ort_gpu, _ = OnnxEmbedder(exported[0]).embed_paths(images, workers=0)
    np.testing.assert_allclose(gpu, cpu, atol=2e-3)
    np.testing.assert_allclose(ort_gpu, cpu, atol=2e-3)


def test_export_cli(tmp_path, model_file, images):


    run = helpers.run_cli
    ok = run("export", "--onnx", tmp_path / "m.onnx", "--checkpoint", model_file, "--exporter", "torchscript",
             "--check-images", images[0].parent)
    assert ok.exit_code == 0, ok.output
    assert "with the torchscript exporter" in ok.stdout
    import re
    assert float(re.search(r"min cosine ([0-9.]+)", ok.stdout).group(1)) >= 0.9999
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    for args, fragment in [(("--checkpoint", junk), "junk.pt: not a facefuse checkpoint"),
                           (("--checkpoint", tmp_path / "none"), "no such checkpoint"),
                           (("--checkpoint", tmp_path), "run folder has no model.pt"),
                           (("--checkpoint", model_file, "--check-images", tmp_path / "nothing"), "no images")]:
        res = run("export", "--onnx", tmp_path / "x.onnx", *args)
        assert res.exit_code == 2 and res.stderr.count("\n") == 1 and fragment in res.stderr, res.output
    res = run("export", "--onnx", tmp_path, "--checkpoint", model_file)
    assert res.exit_code == 2 and "is a folder" in res.stderr
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.parametrize("content", [b"junk", b"junk, not a checkpoint"])
def test_junk_checkpoint_is_a_clean_error(tmp_path, content):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(content)
    with pytest.raises(FacefuseError, match="not a facefuse checkpoint"):
        load_embedder(junk)
