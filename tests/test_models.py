from pathlib import Path

import pytest
import torch

from training.config import AGES, COURSE_MEMBERS, DEFAULT_MEMBERS, group_of_age
from training.models import (
    AgeCNN,
    AgeEnsemble,
    Stl10MLP,
    age_distribution,
    age_distribution_loss,
    age_group_matrix,
    build_member,
    pool_plan,
)

# Pretrained members run at 150 px (dlib's own) and a smaller size they still take; the others at 32 and 80.
MEMBER_SIZES = [(m.name, size) for m in DEFAULT_MEMBERS
                for size in ((112, 150) if m.arch == "face" else (32, 80))]


@pytest.mark.parametrize("member,size", MEMBER_SIZES)
def test_every_member_forward_shape(member, size):
    model = build_member(member, size).eval()
    images = torch.rand(3, 3, size, size) * 255
    logits = model(images, torch.tensor([0, 1, 0]), torch.tensor([0, 2, 4]))
    assert logits.shape == (3, 5 if model.target == "group" else len(AGES))
    assert torch.isfinite(logits).all()
    probs = model.group_probs(images, torch.tensor([0, 1, 0]), torch.tensor([0, 2, 4]))
    assert probs.shape == (3, 5) and torch.allclose(probs.sum(1), torch.ones(3)) and (probs >= 0).all()


def test_age_head_decodes_to_the_mass_of_each_groups_years():
    model = build_member("vgg-age", 32).eval()
    logits = torch.full((2, len(AGES)), -1e4)
    logits[0, AGES.index(34)] = 0.0  # all mass on 34 years -> group 30-39
    logits[1, [AGES.index(19), AGES.index(20)]] = 0.0  # half on 19, half on 20
    torch.testing.assert_close(model.decode(logits), torch.tensor([[0, 0, 1.0, 0, 0], [0.5, 0.5, 0, 0, 0]]))
    matrix = age_group_matrix()
    assert matrix.shape == (len(AGES), 5) and (matrix.sum(1) == 1).all()
    assert [group_of_age(a) for a in (10, 19, 20, 59, 60)] == [0, 0, 1, 4, 4]
    assert matrix[:, 4].sum() == 11  # 50-60 holds eleven years


def test_age_distribution_loss_on_a_known_distribution():
    target = age_distribution(torch.tensor([30, 10]), sigma=2.0)
    assert torch.allclose(target.sum(1), torch.ones(2))
    assert target[0].argmax() == AGES.index(30) and target[1].argmax() == 0
    assert torch.isclose(target[0, AGES.index(28)], target[0, AGES.index(32)])  # symmetric around the age
    perfect = target.clamp_min(1e-30).log()  # logits whose softmax is the target: KL = 0
    assert age_distribution_loss(perfect, torch.tensor([30, 10]), 2.0).abs() < 1e-5
    uniform = torch.zeros(2, len(AGES))
    expected = (target * (target.clamp_min(1e-30).log() - torch.log(torch.tensor(1 / len(AGES))))).sum(1).mean()
    torch.testing.assert_close(age_distribution_loss(uniform, torch.tensor([30, 10]), 2.0), expected)


def test_ensemble_mixes_age_and_group_members():
    torch.manual_seed(0)
    members = [build_member("vgg-age", 32).eval(), build_member("res-group", 32).eval()]
    x, g, r = torch.rand(4, 3, 32, 32) * 255, torch.tensor([0, 1, 1, 0]), torch.tensor([0, 1, 2, 3])
    probs = AgeEnsemble(members, [1.0, 3.0]).eval()(x, g, r)
    expected = 0.25 * members[0].group_probs(x, g, r) + 0.75 * members[1](x, g, r).softmax(1)
    torch.testing.assert_close(probs, expected)


def test_members_differ_in_dropout_placement():
    rates = {m.name: m.dropout for m in COURSE_MEMBERS}
    assert len(set(rates.values())) == len(rates) >= 5
    assert rates["drop7-0.5"][6] == 0.5 and sum(rates["drop7-0.5"]) == 0.5
    assert rates["drop67-0.5"][5:7] == (0.5, 0.5)


def test_full_resolution_reproduces_the_seed_feature_size():
    model = AgeCNN(224).eval()
    features = model.pool(model.features(model.normalize(torch.rand(1, 3, 224, 224) * 255)))
    assert features.flatten(1).shape == (1, 256)
    assert model.head[0].in_features == 256 + 2 + 5
    assert sum(pool_plan(224)) == 6 and sum(pool_plan(64)) == 5


def test_gender_and_race_change_the_prediction():
    torch.manual_seed(0)
    model = build_member("nodrop", 32).eval()
    images = torch.rand(1, 3, 32, 32).repeat(2, 1, 1, 1) * 255
    logits = model(images, torch.tensor([0, 1]), torch.tensor([0, 3]))
    assert not torch.allclose(logits[0], logits[1])


def test_ensemble_is_weighted_average_of_softmaxes():
    torch.manual_seed(0)
    members = [build_member("nodrop", 32).eval(), build_member("dropall-0.1", 32).eval()]
    ensemble = AgeEnsemble(members, [3.0, 1.0]).eval()
    x, g, r = torch.rand(4, 3, 32, 32) * 255, torch.tensor([0, 1, 1, 0]), torch.tensor([0, 1, 2, 3])
    expected = 0.75 * members[0](x, g, r).softmax(1) + 0.25 * members[1](x, g, r).softmax(1)
    probs = ensemble(x, g, r)
    torch.testing.assert_close(probs, expected)
    torch.testing.assert_close(probs.sum(1), torch.ones(4))


def test_stl10_mlp_forward_shape():
    model = Stl10MLP((64, 32)).eval()
    assert model(torch.rand(2, 3, 96, 96) * 255).shape == (2, 10)
    assert len([m for m in model.mlp if isinstance(m, torch.nn.BatchNorm1d)]) == 2


def test_flip_averaging_is_mirror_invariant():
    torch.manual_seed(0)
    members = [build_member("nodrop", 32).eval(), build_member("drop7-0.5", 32).eval()]
    x, g, r = torch.rand(3, 3, 32, 32) * 255, torch.tensor([0, 1, 1]), torch.tensor([4, 1, 2])
    flipped = AgeEnsemble(members, [0.3, 0.7], tta_flip=True).eval()
    torch.testing.assert_close(flipped(x, g, r), flipped(x.flip(3), g, r))
    plain = AgeEnsemble(members, [0.3, 0.7]).eval()
    torch.testing.assert_close(flipped(x, g, r), 0.5 * (plain(x, g, r) + plain(x.flip(3), g, r)))


def test_age_summary_against_a_hand_computed_distribution():
    from training.models import age_summary

    dist = torch.zeros(3, len(AGES))
    dist[0, AGES.index(34)] = 1.0  # all mass on 34
    dist[1, [AGES.index(10), AGES.index(30), AGES.index(50)]] = torch.tensor([0.05, 0.5, 0.45])
    dist[2, AGES.index(20):AGES.index(30)] = 0.0625  # 0.625 over 20-29 ...
    dist[2, AGES.index(60)] = 0.375  # ... and 0.375 on 60
    median, ranges = age_summary(dist)
    # each the youngest age whose cumulative probability reaches 0.5, 0.1 or 0.9 (the means: 34, 38, 44.5)
    torch.testing.assert_close(median, torch.tensor([34.0, 30.0, 27.0]))
    torch.testing.assert_close(ranges, torch.tensor([[34.0, 34.0], [30.0, 50.0], [21.0, 60.0]]))


def test_ensemble_age_distribution_mixes_only_the_exact_age_members():
    torch.manual_seed(0)
    age_member, group_member = build_member("vgg-age", 32).eval(), build_member("vgg-group", 32).eval()
    x, g, r = torch.rand(3, 3, 32, 32) * 255, torch.tensor([0, 1, 1]), torch.tensor([0, 2, 4])
    probs, ages = AgeEnsemble([age_member, group_member], [0.3, 0.7]).eval().predict(x, g, r)
    torch.testing.assert_close(probs, AgeEnsemble([age_member, group_member], [0.3, 0.7]).eval()(x, g, r))
    torch.testing.assert_close(ages, age_member(x, g, r).softmax(1))  # the group member adds no age mass
    _, spread = AgeEnsemble([group_member]).eval().predict(x, g, r)  # no age member: groups spread over years
    group = group_member(x, g, r).softmax(1)
    torch.testing.assert_close(spread[:, AGES.index(25)], group[:, 1] / 10)
    torch.testing.assert_close(spread[:, AGES.index(60)], group[:, 4] / 11)
    torch.testing.assert_close(spread.sum(1), torch.ones(3))


def test_export_parity_of_an_ensemble_of_framings_and_backbones(tmp_path):
    """Face members with their own framings (a crop resized inside the graph) beside a from-scratch ResNet at its
    own 64 px (shrunk inside the graph) and a VGG: one graph, <= 1e-4."""
    from training.export import AgeGraph, check_parity, example_age_inputs, export_graph

    torch.manual_seed(0)
    members = [build_member(name, 150) for name in ("face-age-c85", "face-group", "res-age-64", "vgg-age")]
    ensemble = AgeEnsemble([m.eval() for m in members], [0.4, 0.2, 0.2, 0.2], tta_flip=True).eval()
    graph, names = AgeGraph(ensemble).eval(), ["image", "gender", "race"]
    path = tmp_path / "mixed.onnx"
    export_graph(graph, example_age_inputs(2, 150), names, path, ["probabilities", "label", "age", "age_range"])
    report = check_parity(graph, path, lambda n: example_age_inputs(n, 150), names)
    assert all(r["max_abs_diff"] <= 1e-4 and r["labels_equal"] for r in report.values()), report
    assert all(r["age_max_abs_diff_years"] <= 1e-2 for r in report.values()), report


def test_a_smaller_member_shrinks_the_graph_input_as_pillow_resizes():
    """A 150 px member fed 200 px images sees what Pillow's bilinear resize to 150 px would have given it (the
    shrink is a fixed antialiased filter in the graph): within one grey level, and a third of one on average."""
    import numpy as np
    from PIL import Image

    face = np.asarray(Image.open(Path(__file__).parent / "data" / "face.jpg").convert("RGB").resize((200, 200)))
    pillow = np.asarray(Image.fromarray(face).resize((150, 150), Image.BILINEAR)).astype(np.float32)
    member = build_member("face-age-frz3", 200)  # crop 1, its own 150 px
    assert (member.source_size, member.window_side(), member.input_size) == (200, 200, 150)
    framed = member.frame(torch.from_numpy(face.copy()).permute(2, 0, 1)[None].float())[0].permute(1, 2, 0).numpy()
    assert framed.shape == pillow.shape
    assert np.abs(framed - pillow).max() <= 1.0 and np.abs(framed - pillow).mean() < 0.5


def test_a_multi_level_head_reads_the_last_stages_pooled():
    member = build_member("face-age-ml", 150).eval()
    assert member.head[0].in_features == 128 + 256 + 256 + 2 + 5
    images, gender, race = torch.rand(2, 3, 150, 150) * 255, torch.tensor([0, 1]), torch.tensor([3, 4])
    maps = member.features.stage_maps(member.normalize(images))
    torch.testing.assert_close(maps[-1], member.features(member.normalize(images)))
    pooled = torch.cat([m.mean(dim=(2, 3)) for m in maps[-3:]], dim=1)
    expected = member.head(torch.cat([pooled, torch.eye(2)[gender], torch.eye(5)[race]], dim=1))
    torch.testing.assert_close(member(images, gender, race), expected)


def test_a_native_member_sees_its_window_unresampled():
    member = build_member("face-age-n92-frz", 200)  # 92 % of 200 px = its own 184 px
    images = torch.rand(2, 3, 200, 200) * 255
    assert member.window_side() == member.input_size == 184 and not hasattr(member, "shrink")
    torch.testing.assert_close(member.frame(images), images[:, :, 8:192, 8:192])


def test_export_parity_of_a_mixed_size_ensemble(tmp_path):
    """One 200 px graph input; members at 150 (shrunk, one from a crop, one whose head reads three stages), 184 and
    170 (native windows) and a VGG at 80 px: the ONNX graph matches PyTorch within 1e-4."""
    from dataclasses import replace

    from training.config import member_by_name
    from training.export import AgeGraph, check_parity, example_age_inputs, export_graph

    torch.manual_seed(0)
    configs = ["face-age-frz3", "face-age-c85", "face-age-n92-frz", "face-age-n85", "face-age-frz-ml",
               replace(member_by_name("vgg-age"), input_size=80)]
    members = [build_member(c, 200).eval() for c in configs]
    assert [m.input_size for m in members] == [150, 150, 184, 170, 150, 80]
    ensemble = AgeEnsemble(members, [0.3, 0.2, 0.1, 0.1, 0.2, 0.1]).eval()
    graph, names = AgeGraph(ensemble).eval(), ["image", "gender", "race"]
    path = tmp_path / "sizes.onnx"
    export_graph(graph, example_age_inputs(2, 200), names, path, ["probabilities", "label", "age", "age_range"])
    report = check_parity(graph, path, lambda n: example_age_inputs(n, 200), names)
    assert all(r["max_abs_diff"] <= 1e-4 and r["labels_equal"] for r in report.values()), report
