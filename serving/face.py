"""Find the face in a photo and frame it as the training crops are framed (no torch).

dlib's HOG frontal-face detector (in the dlib-bin wheel, no file) finds the faces; dlib's public-domain 5-point
landmark model (`shape_predictor_5_face_landmarks.dat`, PyPI's face_recognition_models) places the eye corners
and the base of the nose; a similarity transform (rotation, scale, shift) maps those points onto the template,
the mean landmarks of the training crops (fitted by `fit_template`, stored in the model's JSON), and the photo
is resampled into a crop of the training crops' size. /predict, the CSV scorer and bench/wild.py share it.

    python -m serving.face photo.jpg       # prints the faces found and writes photo.aligned.png
"""

from __future__ import annotations

import importlib.util
import os
import queue
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from serving.image import decode_rgb, prepare_image

MODELS_PACKAGE = "face_recognition_models"  # dlib's model files on PyPI (its metadata says MIT; the files: CC0)
MODELS_LICENSE = "Public domain (CC0 1.0), dlib model by Davis King; via PyPI face_recognition_models 0.3.0"
LANDMARKS_FILE = "shape_predictor_5_face_landmarks.dat"  # never the 68-point model: its data forbids commercial use
# Photos are searched at most this many pixels on their longer side. The detector's window is 80 px, so at 448 a
# face of about 18 % of a photo's longer side is still found; bench/wild.py measured recall and time.
DETECT_SIDE = 448
# A photo this small is searched once more at twice its size when nothing was found at first (a face filling a
# 100-200 px thumbnail is often just under the detector's window).
UPSAMPLE_BELOW = 260
# The detector's margin a face must reach. dlib's default is 0; on bench/wild.py's synthetic photos (faces turned
# up to 20 degrees) -0.5 raised recall from 92 % to 98 % with no false detection in 200 photos without a face,
# where -0.7 reached 99.5 % but accepted 1.5 % of them.
DETECT_THRESHOLD = -0.5
NO_FACE = "no face found in the image"


@dataclass(frozen=True)
class Face:
    """One detection, in the pixels of the image it was found in."""

    box: tuple[int, int, int, int]  # x, y, width, height
    score: float  # the detector's margin; higher is surer
    landmarks: np.ndarray  # (5, 2) x, y: dlib's order (right eye outer, inner, left eye outer, inner, nose)

    def to_json(self) -> dict:
        return {"box": list(self.box), "score": round(self.score, 4)}


class NoFace(ValueError):
    """The image holds no face the detector can find."""


def find_model_file(name: str = LANDMARKS_FILE) -> Path:
    """A model file of the installed face_recognition_models package, found without importing it (its __init__
    needs pkg_resources, which current setuptools no longer ships)."""
    return package_file(MODELS_PACKAGE, "models", name, "pip install -e .")


def package_file(package: str, folder: str, name: str, install: str) -> Path:
    """package/folder/name of an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the {package} package is not installed ({install})")
    path = Path(next(iter(spec.submodule_search_locations))) / folder / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the {package} package")
    return path


class FaceFinder:
    """Detector, landmarks and (once a template is given) alignment.

    Thread-safe, and parallel: a dlib detector must not run in two threads at once (seen crashing), so the
    finder keeps `copies` detector + landmark-model pairs (default: one per core, about 0.6 s and 10 MB each to
    load) and a call takes a free one. dlib releases the GIL while it runs, so the copies use several cores."""

    def __init__(self, template: dict | None = None, copies: int | None = None):
        import dlib  # the compiled dlib-bin wheel; imported here so that `import serving.face` stays light

        self.dlib = dlib
        self.template = template  # {"size": [w, h], "points": [[x, y] x 5]} in training-crop pixels
        self.models: queue.SimpleQueue = queue.SimpleQueue()
        landmarks = str(find_model_file())
        for _ in range(copies or os.cpu_count() or 1):
            self.models.put((dlib.get_frontal_face_detector(), dlib.shape_predictor(landmarks)))

    def find(self, image: np.ndarray, threshold: float = DETECT_THRESHOLD) -> list[Face]:
        """Every face in an (H, W, 3) uint8 RGB image, largest first."""
        scale = min(1.0, DETECT_SIDE / max(image.shape[:2]))
        grey = Image.fromarray(image).convert("L")  # Pillow's C code: 4x faster than a numpy mean here
        if scale < 1.0:
            grey = grey.resize((max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale))),
                                Image.BILINEAR)  # a 1x10000 strip keeps a side of 1 px, not 0
        grey = np.asarray(grey)  # (h, w) uint8
        detector, predictor = self.models.get()  # blocks while every copy is busy
        try:
            boxes, scores, _ = detector.run(grey, 0, threshold)
            if not boxes and max(image.shape[:2]) < UPSAMPLE_BELOW:
                boxes, scores, _ = detector.run(grey, 1, threshold)
            shapes = [predictor(image, self.dlib.rectangle(*(round(v / scale) for v in (
                r.left(), r.top(), r.right(), r.bottom())))) for r in boxes]
        finally:
            self.models.put((detector, predictor))
        faces = []
        for rect, score, shape in zip(boxes, scores, shapes):
            left, top = rect.left() / scale, rect.top() / scale
            width, height = rect.width() / scale, rect.height() / scale
            points = np.array([(shape.part(i).x, shape.part(i).y) for i in range(shape.num_parts)], np.float64)
            x, y = max(0, round(left)), max(0, round(top))
            w = min(image.shape[1], round(left + width)) - x
            h = min(image.shape[0], round(top + height)) - y
            faces.append(Face((x, y, w, h), float(score), points))
        return sorted(faces, key=lambda f: f.box[2] * f.box[3], reverse=True)

    def align(self, image: np.ndarray, face: Face) -> Image.Image:
        """The face resampled onto the template: a crop framed like the training crops (template size)."""
        if self.template is None:
            raise RuntimeError("no face template: the model's JSON has none (re-export with agegroup-export)")
        width, height = self.template["size"]
        target = np.asarray(self.template["points"], np.float64)
        matrix = similarity(face.landmarks, target)  # photo -> crop
        photo = Image.fromarray(image)
        shrink = int(1 / np.sqrt(abs(np.linalg.det(matrix[:, :2]))) // 2)  # > 1: the face is over 2x the crop
        if shrink > 1:  # box-reduce first so that the bilinear resampling below does not alias
            photo = photo.reduce(shrink)
            matrix = matrix @ np.diag([shrink, shrink, 1.0])
        inverse = np.linalg.inv(np.vstack([matrix, [0, 0, 1]]))[:2]  # crop -> photo, what Pillow takes
        return photo.transform((width, height), Image.AFFINE, tuple(inverse.ravel()), Image.BILINEAR)

    def frame(self, image: np.ndarray) -> tuple[Image.Image, Face, int]:
        """The largest face, aligned; with it the detection and how many faces were found. Raises NoFace."""
        faces = self.find(image)
        if not faces:
            raise NoFace(NO_FACE)
        return self.align(image, faces[0]), faces[0], len(faces)


@dataclass(frozen=True)
class Framed:
    """An image ready for the model, and where its face was (None when the client said it was a crop)."""

    pixels: np.ndarray  # (H, W, 3) uint8 at the model's input size
    face: Face | None
    faces_found: int | None


def prepare_face(source, size: tuple[int, int], finder: FaceFinder | None) -> Framed:
    """Decode `source` (bytes, path or opened Pillow image) and frame it for a model of input `size` (w, h):
    with a finder, the largest face aligned onto the template (raises NoFace); without one, the whole image
    taken as an aligned crop. Raises InputError for an image that cannot be decoded."""
    if finder is None:
        return Framed(prepare_image(source, size), None, None)
    crop = tuple(finder.template["size"])
    photo = np.asarray(decode_rgb(source, crop))  # at least DRAFT_FACTOR x the crop size when larger
    aligned, face, found = finder.frame(photo)
    return Framed(np.asarray(aligned.resize(size, Image.BILINEAR), dtype=np.uint8), face, found)


def similarity(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The (2, 3) least-squares similarity transform (rotation, uniform scale, shift) taking the (K, 2) source
    points onto the target points (Umeyama's method, without reflection)."""
    mu_s, mu_t = source.mean(0), target.mean(0)
    s, t = source - mu_s, target - mu_t
    u, sigma, vt = np.linalg.svd(t.T @ s / len(source))
    d = np.diag([1.0, np.sign(np.linalg.det(u @ vt))])
    rotation = u @ d @ vt
    scale = (sigma * np.diag(d)).sum() / s.var(0).sum()
    return np.hstack([scale * rotation, (mu_t - scale * rotation @ mu_s)[:, None]])


def fit_template(finder: FaceFinder, images: list[np.ndarray]) -> dict:
    """The template: mean landmark positions over aligned crops (all one size), from those with a face found;
    also how many were found, so that a training run can report the detector's recall on its own crops."""
    points, found = [], 0
    for image in images:
        faces = finder.find(image)
        if faces:
            found += 1
            points.append(faces[0].landmarks)
    if not points:
        raise NoFace("no face found in any of the template images")
    height, width = images[0].shape[:2]
    return {"size": [width, height], "points": np.mean(points, axis=0).round(3).tolist(), "images": len(images),
            "faces_found": found, "landmarks": LANDMARKS_FILE, "detector": "dlib HOG frontal_face_detector",
            "license": MODELS_LICENSE}


def main(argv: list[str] | None = None) -> None:
    import json

    from serving.runtime import MODEL_DIR

    argv = sys.argv[1:] if argv is None else argv
    template = json.loads((MODEL_DIR / "age_ensemble.json").read_text()).get("face_template")
    finder = FaceFinder(template)
    for path in argv:
        image = np.asarray(Image.open(path).convert("RGB"))
        faces = finder.find(image)
        print(path, [f.to_json() for f in faces] or NO_FACE)
        if faces and template:
            out = Path(path).with_suffix(".aligned.png")
            finder.align(image, faces[0]).save(out)
            print("  aligned crop:", out)


if __name__ == "__main__":
    main()
