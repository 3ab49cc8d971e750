"""Face detection and alignment (serving/face.py) on synthetic photos made from the public-domain test face."""

import numpy as np
import pytest
from conftest import face_pixels
from PIL import Image

from serving.face import FaceFinder, NoFace, fit_template, prepare_face, similarity


@pytest.fixture(scope="module")
def finder() -> FaceFinder:
    """A finder whose template is the test face itself at 200 px: aligning it anywhere must give it back."""
    plain = FaceFinder(copies=2)
    template = fit_template(plain, [face_pixels(200)])
    return FaceFinder(template, copies=2)


def paste(face_side: int, angle: float, centre: tuple[int, int], size=(640, 480), background=90) -> np.ndarray:
    """The test face scaled to face_side, turned by `angle` degrees, pasted with its centre at `centre`."""
    face = Image.fromarray(face_pixels(face_side)).rotate(angle, Image.BILINEAR, expand=True)
    mask = Image.new("L", (face_side, face_side), 255).rotate(angle, Image.BILINEAR, expand=True)
    photo = Image.new("RGB", size, (background, background + 20, background + 40))
    photo.paste(face, (centre[0] - face.width // 2, centre[1] - face.height // 2), mask)
    return np.asarray(photo)


def test_similarity_recovers_a_known_transform():
    rng = np.random.default_rng(0)
    points = rng.uniform(0, 200, (5, 2))
    angle, scale, shift = np.radians(17), 1.7, np.array([30.0, -12.0])
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    moved = points @ (scale * rotation).T + shift
    matrix = similarity(points, moved)
    np.testing.assert_allclose(matrix[:, :2], scale * rotation, atol=1e-9)
    np.testing.assert_allclose(matrix[:, 2], shift, atol=1e-9)


@pytest.mark.parametrize("face_side, angle, centre", [(260, 0, (200, 250)), (230, 12, (430, 220)),
                                                      (300, -15, (320, 240)), (200, 8, (480, 330))])
def test_a_pasted_face_is_found_there_and_aligned_back(finder, face_side, angle, centre):
    photo = paste(face_side, angle, centre)
    faces = finder.find(photo)
    assert len(faces) == 1
    x, y, w, h = faces[0].box
    # the face's own box is smaller than the pasted square; its centre sits near the square's centre
    assert abs(x + w / 2 - centre[0]) < 0.15 * face_side and abs(y + h / 2 - centre[1]) < 0.2 * face_side
    assert 0.4 * face_side < w < 0.9 * face_side
    aligned = np.asarray(finder.align(photo, faces[0]))
    assert aligned.shape == (200, 200, 3)
    # aligned back onto the template (the face itself at 200 px): the landmarks land on the template's points
    again = finder.find(aligned)[0].landmarks
    assert np.abs(again - np.asarray(finder.template["points"])).max() < 6
    reference = face_pixels(200).astype(np.float64)
    correlation = np.corrcoef(aligned.astype(np.float64).ravel(), reference.ravel())[0, 1]
    assert correlation > 0.8, correlation


def test_blank_and_noise_images_have_no_face(finder):
    rng = np.random.default_rng(0)
    for image in (np.full((480, 640, 3), 255, np.uint8), rng.integers(0, 256, (300, 300, 3), dtype=np.uint8),
                  np.full((1, 10000, 3), 128, np.uint8), np.full((10000, 1, 3), 128, np.uint8)):  # strips
        assert finder.find(image) == []
        with pytest.raises(NoFace, match="no face found in the image"):
            finder.frame(image)


def test_prepare_face_gives_the_model_input_and_where_the_face_was(finder, tmp_path):
    path = tmp_path / "photo.jpg"
    Image.fromarray(paste(260, 5, (300, 200))).save(path, quality=90)
    framed = prepare_face(path, (150, 150), finder)
    assert framed.pixels.shape == (150, 150, 3) and framed.pixels.dtype == np.uint8
    assert framed.faces_found == 1 and framed.face.to_json()["box"][2] > 100
    whole = prepare_face(path, (150, 150), None)  # aligned=true: the whole image resized, no detection
    assert whole.face is None and whole.faces_found is None and whole.pixels.shape == (150, 150, 3)


def test_the_largest_face_comes_first(finder):
    photo = np.asarray(Image.fromarray(paste(200, 0, (130, 130))))
    big = paste(300, 0, (460, 300))
    combined = photo.copy()
    combined[150:450, 310:610] = big[150:450, 310:610]
    faces = finder.find(combined)
    assert len(faces) == 2 and faces[0].box[2] > faces[1].box[2] and faces[0].box[0] > 300
