"""Verification apart from search: scoring pairs (:mod:`.scoring`), the threshold rule and stored
thresholds (:mod:`.thresholds`), calibration (:mod:`.calibrate`) and ROC plots (:mod:`.roc`).
Imports ``core`` and the embedder (``export``), never FAISS."""
