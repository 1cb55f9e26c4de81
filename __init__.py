"""facefuse: train face-embedding models from scratch, run their hot spots through Triton kernels,
export them to ONNX and verify or search faces with FAISS.

The Python API (:mod:`facefuse.api`) is re-exported here::

    import facefuse
    model = facefuse.load_model("model.onnx", flip=True)
    model.verify("a.jpg", "b.jpg").same

The repository root is this package: ``trainer/``, ``kernels/``, ``export/``, ``index/``,
``verification/`` and ``cli.py`` install as ``facefuse.trainer``, ``facefuse.kernels``, ... (a
setuptools ``package-dir`` mapping), and ``core/`` holds what every stage uses. Importing
``facefuse`` imports nothing else: the API's names load :mod:`facefuse.api` on first use.
"""

__version__ = "0.2.0"

API = ("load_model", "Model", "EmbedSettings", "build_gallery", "open_gallery", "Gallery", "embed_to_folder",
       "export_onnx", "quantize_int8", "train", "align_folder", "fetch_lfw", "Verification", "PairsReport", "Calibration", "SearchResult", "Match",
       "Enrolment", "FacefuseError", "ParameterError")
__all__ = list(API)


def __getattr__(name: str):
    if name in ("EmbedSettings",):
        from facefuse.core.settings import EmbedSettings

        return EmbedSettings
    if name in ("FacefuseError", "ParameterError"):
        from facefuse.core import errors

        return getattr(errors, name)
    if name in API:
        from facefuse import api

        return getattr(api, name)
    raise AttributeError(f"module 'facefuse' has no attribute {name!r}")
