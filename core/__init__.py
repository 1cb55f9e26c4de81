"""What every stage uses: the error types (:mod:`.errors`), atomic file writes (:mod:`.files`),
where the shared data lives (:mod:`.paths`), image decoding (:mod:`.images`), L2-normalisation and
batch embedding (:mod:`.embed`) and verification metrics (:mod:`.metrics`).

``core`` imports nothing else of facefuse; ``trainer``, ``export`` and ``index`` import it.
"""
