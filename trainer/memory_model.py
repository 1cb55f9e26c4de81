"""Bytes per rank of the classification head at the peak of a training step's forward: the memory
model behind the README's table.

For C classes, embedding size D, N ranks, a local batch b (global B = N*b), fp32 (4 bytes)::

                  centres   gradient   AdamW (m, v)   logits (torch path)   centre copies      gathered
    replicated    C D       C D        2 C D          3 b C                 C D                0
    sharded       C_r D     C_r D      2 C_r D        4 B C_r               C_r D              B D
    + sampling    C_r D     C_r D      2 C_r D        4 B K                 2 K D              B D

with C_r = ceil(C / N) and K = max(1, int(r C_r)) kept classes. The gradient is the previous step's
(freed only by the next ``zero_grad``), so it is live during the forward. Logit copies are the
fp32 B x C_r blocks alive at the forward's peak: cos, the margin logits z, z - M and exp(z - M) in
:class:`trainer.sharded_head.ShardedCrossEntropy` (4); cos, s*z and log_softmax in the replicated
head (3). Centre copies: ``F.normalize`` of the centres (saved for backward) and, with sampling,
the gathered kept rows ``W[index]``. With the fused kernel (``fused=True``) neither the logits nor
the normalised copy are stored. The backbone, its activations and its optimiser state are not
counted; backward temporaries (the logits' gradient, one block at a time) stay below the forward's
peak for B <= D.
"""

from __future__ import annotations

import math

FP32 = 4
LOGIT_COPIES = {"replicated": 3, "sharded": 4, "sampled": 4}
MODES = ("replicated", "sharded", "sampled")


def head_memory(num_classes: int, dim: int, world_size: int, local_batch: int, *, mode: str = "sharded",
                sample_rate: float = 1.0, fused: bool = False) -> dict[str, int]:
    """Bytes per rank of each term of the module docstring's table, and their ``total``."""
    if mode not in MODES:
        raise ValueError(f"mode: unknown {mode!r}; valid: {', '.join(MODES)}")
    batch = local_batch * world_size
    rows = num_classes if mode == "replicated" else math.ceil(num_classes / world_size)
    kept = rows if mode != "sampled" else max(1, int(sample_rate * rows))
    logit_rows = local_batch if mode == "replicated" else batch
    out = {
        "centres": rows * dim * FP32,
        "gradient": rows * dim * FP32,
        "adamw": 2 * rows * dim * FP32,
        "logits": 0 if fused else LOGIT_COPIES[mode] * logit_rows * kept * FP32,
        "centre_copies": ((0 if fused else kept) + (kept if mode == "sampled" else 0)) * dim * FP32,
        "gathered": 0 if mode == "replicated" else batch * dim * FP32,
    }
    out["total"] = sum(out.values())
    return out


def table(classes=(10**5, 10**6, 10**7), dim: int = 512, world_size: int = 8, local_batch: int = 128,
          sample_rate: float = 0.1, gpu_gb: float = 48.0) -> str:
    """The README's Markdown table (GB per rank; ``*`` marks what does not fit ``gpu_gb``)."""
    cases = [("replicated", 1.0, False), ("sharded", 1.0, False), ("sharded", 1.0, True),
             ("sampled", sample_rate, False), ("sampled", sample_rate, True)]
    head = ["identities", "head", "centres", "grad", "AdamW", "logits + copies", "gathered", "total / rank"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in classes:
        for mode, r, fused in cases:
            m = head_memory(c, dim, world_size, local_batch, mode=mode, sample_rate=r, fused=fused)
            gb = lambda v: f"{v / 1e9:.2f}"  # noqa: E731
            name = mode + (f" r={r}" if mode == "sampled" else "") + (" + fused" if fused else "")
            total = gb(m["total"]) + (" *" if m["total"] > gpu_gb * 1e9 else "")
            lines.append(f"| 10^{round(math.log10(c))} | {name} | {gb(m['centres'])} | {gb(m['gradient'])} | "
                         f"{gb(m['adamw'])} | {gb(m['logits'] + m['centre_copies'])} | {gb(m['gathered'])} | "
                         f"{total} |")
    return "\n".join(lines)
