"""The port of dlib's face-recognition ResNet: the file reader's primitives, and descriptors against dlib's own."""

import numpy as np
import pytest
import torch
from conftest import face_pixels

from training.dlib_weights import DlibFormatError, Stream, dlib_state_dict, find_weights_file, provenance, read_network
from training.models import FaceResNet, build_member

dlib = pytest.importorskip("dlib")


def pack_int(value: int) -> bytes:
    """dlib's compact integer, written independently of the reader: control byte, then little-endian bytes."""
    magnitude = abs(value)
    payload = magnitude.to_bytes(max(1, (magnitude.bit_length() + 7) // 8), "little")
    return bytes([len(payload) | (0x80 if value < 0 else 0)]) + payload


def test_stream_reads_dlibs_primitives():
    tensor = np.arange(6, dtype="<f4")
    data = (pack_int(300) + pack_int(-5) + pack_int(0) + pack_int(5) + pack_int(-2)  # ints; float 5 * 2**-2
            + b"1" + pack_int(4) + b"con_"  # bool, string
            + pack_int(2) + pack_int(1) + pack_int(2) + pack_int(3) + pack_int(1) + tensor.tobytes())
    s = Stream(data)
    assert (s.int(), s.int(), s.int()) == (300, -5, 0)
    assert s.float() == 1.25
    assert s.bool() is True and s.string() == "con_"
    np.testing.assert_array_equal(s.tensor(), tensor.reshape(1, 2, 3, 1))
    assert s.pos == len(data)
    with pytest.raises(DlibFormatError):
        Stream(b"\x01").take(2)
    with pytest.raises(DlibFormatError):
        Stream(b"\x7f").int()  # bits 0x70 are never set in a control byte


def test_reader_walks_the_whole_file():
    settings, records = read_network(find_weights_file())
    assert settings["size"] == (150, 150) and len(settings["means"]) == 3
    kinds = [r["kind"] for r in records]
    assert kinds.count("con") == 29 and kinds.count("affine") == 29 and kinds.count("fc") == 1
    assert records[0]["weight"].shape == (32, 3, 7, 7) and records[0]["stride"] == (2, 2)
    params = sum(r[k].size for r in records for k in ("weight", "bias", "scale", "shift") if k in r)
    assert 5.5e6 < params < 5.7e6
    meta = provenance(find_weights_file())
    assert len(meta["sha256"]) == 64 and "public domain" in meta["license"].lower()


def test_a_truncated_file_is_refused(tmp_path):
    data = find_weights_file().read_bytes()
    (tmp_path / "cut.dat").write_bytes(data[: len(data) // 2])
    with pytest.raises(DlibFormatError):
        read_network(tmp_path / "cut.dat")


def chips() -> list[np.ndarray]:
    """150x150 RGB chips: a real face, the same face mirrored and darkened, noise, a gradient."""
    rng = np.random.default_rng(0)
    face = face_pixels(150)
    ramp = np.linspace(0, 255, 150, dtype=np.float64)
    gradient = np.stack([np.tile(ramp, (150, 1)), np.tile(ramp[:, None], (1, 150)), np.full((150, 150), 90.0)], 2)
    return [face, (face[:, ::-1] * 0.6).astype(np.uint8), rng.integers(0, 256, (150, 150, 3), dtype=np.uint8),
            gradient.astype(np.uint8)]


@pytest.mark.parametrize("index", range(4))
def test_port_matches_dlibs_descriptors(index):
    state, settings = dlib_state_dict()
    model = FaceResNet()
    model.load_state_dict(state)
    model.eval()
    chip = chips()[index]
    expected = np.array(dlib.face_recognition_model_v1(str(find_weights_file())).compute_face_descriptor(chip))
    x = (torch.from_numpy(chip.copy()).permute(2, 0, 1)[None].float()
         - torch.tensor(settings["means"]).view(1, 3, 1, 1)) / 256.0
    with torch.no_grad():
        got = model.describe(x)[0].double().numpy()
    cosine = got @ expected / np.linalg.norm(got) / np.linalg.norm(expected)
    assert cosine >= 0.999, cosine


def test_pretrained_member_starts_from_dlib_and_calibration_keeps_its_function():
    torch.manual_seed(0)
    member = build_member("face-age", 150, pretrained=True).eval()
    x = torch.from_numpy(np.stack(chips())).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        before = member.features(member.normalize(x))
        member.calibrate_batchnorm(x)
        after = member.features(member.normalize(x))
        member.train()
        in_training = member.features(member.normalize(x))  # batch statistics = the calibrated ones
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(in_training, before, atol=1e-3, rtol=1e-3)


def test_frozen_stages_keep_weights_and_statistics():
    member = build_member("face-age-frz", 150, pretrained=True).train()
    frozen = [member.features.stem, *member.features.stages[:2]]
    assert not any(p.requires_grad for m in frozen for p in m.parameters())
    assert all(not m.training for m in frozen) and member.features.stages[2].training
    groups = member.parameter_groups(1e-3)
    assert groups[0]["lr"] == pytest.approx(1e-4) and groups[1]["lr"] == 1e-3
    assert sum(p.numel() for g in groups for p in g["params"]) < sum(p.numel() for p in member.parameters())


def test_crop_framing_keeps_the_centre():
    member = build_member("face-age-c85", 150).eval()
    image = torch.zeros(1, 3, 150, 150)
    image[..., 60:90, 60:90] = 255.0  # a centred square grows by 1 / 0.85 when the 85 % centre is resized up
    framed = member.frame(image)
    assert framed.shape == image.shape
    row = (framed[0, 0, 75] > 127).nonzero().flatten()
    assert abs((row.max() - row.min() + 1).item() - 30 / 0.85) <= 2

