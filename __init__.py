"""facefuse: train face-embedding models from scratch, run their hot spots through Triton kernels,
export them to ONNX and verify or search faces with FAISS.

The repository root is this package: ``trainer/``, ``kernels/``, ``export/``, ``index/`` and
``cli.py`` install as ``facefuse.trainer``, ``facefuse.kernels``, ... (a setuptools ``package-dir``
mapping), and ``core/`` holds what every stage uses. Importing ``facefuse`` imports nothing else.
"""

__version__ = "0.2.0"
