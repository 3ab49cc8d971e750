import subprocess
import sys

import pandas as pd
import pytest

from serving.batch import main, score_csv


def test_round_trip_every_row_in_order(face_dir, tiny_export, tmp_path):
    out = tmp_path / "submission.csv"
    written = score_csv(face_dir / "testdata.csv", out, model_path=tiny_export / "age_ensemble.onnx",
                        with_probabilities=True, chunk_size=5, workers=2, progress=False)
    source = pd.read_csv(face_dir / "testdata.csv")
    result = pd.read_csv(out)
    assert list(result.columns[:2]) == ["Id", "Category"] and len(result) == len(source) == len(written)
    assert result["Id"].tolist() == source["Image"].tolist()
    assert result["Category"].between(0, 4).all()
    probs = result[[c for c in result.columns if c.startswith("p_")]]
    assert probs.shape[1] == 5 and ((probs.sum(axis=1) - 1).abs() < 1e-4).all()
    assert (probs.to_numpy().argmax(1) == result["Category"].to_numpy()).all()
    chunked = score_csv(face_dir / "testdata.csv", tmp_path / "again.csv",
                        model_path=tiny_export / "age_ensemble.onnx", chunk_size=256, progress=False)
    assert chunked["Category"].tolist() == result["Category"].tolist()  # chunking does not change results


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.drop(columns=["Race"]), "missing column(s) Race"),
    (lambda t: t.assign(Gender=[2] + [0] * (len(t) - 1)), "Gender must be an integer 0-1; bad at line 2"),
    (lambda t: t.assign(Race=["x"] * len(t)), "Race must be an integer 0-4"),
    (lambda t: t.assign(Image=["images/missing.jpg"] + t["Image"].tolist()[1:]), "not found at line 2"),
    (lambda t: t.assign(Image=["images/broken.jpg"] * len(t)), "could not be decoded"),
])
def test_bad_csv_exits_with_one_line_and_writes_nothing(face_dir, tiny_export, tmp_path, capsys, edit, message):
    (face_dir / "images" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    bad = tmp_path / "bad.csv"
    edit(pd.read_csv(face_dir / "testdata.csv")).to_csv(bad, index=False)
    out = tmp_path / "out.csv"
    with pytest.raises(SystemExit) as exit_info:
        main([str(bad), str(out), "--images-root", str(face_dir), "--model", str(tiny_export / "age_ensemble.onnx"),
              "--no-progress"])
    assert exit_info.value.code != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert list(tmp_path.iterdir()) == [bad]  # no output, no temporary file left behind


def test_cli_entry_point_and_bad_arguments(face_dir, tiny_export, tmp_path):
    out = tmp_path / "sub.csv"
    ok = subprocess.run([sys.executable, "-m", "serving.batch", str(face_dir / "testdata.csv"), str(out),
                         "--model", str(tiny_export / "age_ensemble.onnx"), "--no-progress"],
                        capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert f"wrote 23 rows to {out}" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "serving.batch", "only-one-arg"], capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


def run_cli(face_dir, tiny_export, out, *extra, umask=None):
    """agegroup-score as a subprocess on the synthetic faces; returns the finished process."""
    return subprocess.run([sys.executable, "-m", "serving.batch", str(face_dir / "testdata.csv"), str(out),
                           "--model", str(tiny_export / "age_ensemble.onnx"), "--no-progress", *extra],
                          capture_output=True, text=True, timeout=300, umask=-1 if umask is None else umask)


def one_line_error(proc, message: str) -> None:
    assert proc.returncode == 1, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and message in proc.stderr, proc.stderr


def test_output_equal_to_input_is_refused(face_dir, tiny_export, tmp_path):
    source = face_dir / "testdata.csv"
    before = source.read_bytes()
    one_line_error(run_cli(face_dir, tiny_export, source), "is the input CSV")
    link = tmp_path / "link.csv"
    link.symlink_to(source)
    one_line_error(run_cli(face_dir, tiny_export, link), "is the input CSV")
    assert source.read_bytes() == before


def test_non_regular_outputs_are_refused(face_dir, tiny_export, tmp_path):
    (tmp_path / "folder").mkdir()
    one_line_error(run_cli(face_dir, tiny_export, tmp_path / "folder"), "is a directory")
    (tmp_path / "file").write_text("x")
    one_line_error(run_cli(face_dir, tiny_export, tmp_path / "file" / "out.csv"), "is not a directory")
    one_line_error(run_cli(face_dir, tiny_export, "/dev/null"), "not a regular file")
    assert (tmp_path / "file").read_text() == "x"


def test_symlinked_output_is_written_through(face_dir, tiny_export, tmp_path):
    target, link = tmp_path / "target.csv", tmp_path / "link.csv"
    target.write_text("old\n")
    link.symlink_to(target)
    assert run_cli(face_dir, tiny_export, link).returncode == 0
    assert link.is_symlink() and target.read_text().startswith("Id,Category")


def test_output_mode_follows_the_umask(face_dir, tiny_export, tmp_path):
    assert run_cli(face_dir, tiny_export, tmp_path / "a.csv", umask=0o022).returncode == 0
    assert run_cli(face_dir, tiny_export, tmp_path / "b.csv", umask=0o077).returncode == 0
    assert (tmp_path / "a.csv").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "b.csv").stat().st_mode & 0o777 == 0o600


def test_ctrl_c_exits_130_with_one_line(face_dir, tiny_export, tmp_path):
    import signal
    import time

    out = tmp_path / "out.csv"
    code = ("import sys, time, serving.batch as b\n"
            "b.score_csv = lambda *a, **k: time.sleep(60)\n"  # hold the run where a Ctrl-C would land
            f"sys.argv = ['agegroup-score', {str(face_dir / 'testdata.csv')!r}, {str(out)!r}, '--model', "
            f"{str(tiny_export / 'age_ensemble.onnx')!r}]\n"
            "print('ready', flush=True)\nb.main()\n")
    # a job started in the background (CI from a script) inherits SIGINT as ignored; with the default disposition
    # the child's Python installs its KeyboardInterrupt handler, so it sees the Ctrl-C whatever started this test
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert len(err.strip().splitlines()) == 1 and "interrupted" in err and "Traceback" not in err
    assert not out.exists()


def test_rows_without_a_face_are_marked_and_aligned_crops_skip_detection(face_dir, tiny_export, tmp_path):
    from PIL import Image

    Image.new("RGB", (64, 64), (240, 240, 240)).save(face_dir / "images" / "blank.jpg")
    Image.new("RGB", (10000, 1), (90, 90, 90)).save(face_dir / "images" / "strip.png")
    table = pd.read_csv(face_dir / "testdata.csv").head(6)
    table.loc[2, "Image"] = "images/blank.jpg"
    table.loc[4, "Image"] = "images/strip.png"  # once made the detector's downscale 0 px wide
    table.to_csv(tmp_path / "mixed.csv", index=False)
    model = tiny_export / "age_ensemble.onnx"
    detected = score_csv(tmp_path / "mixed.csv", tmp_path / "detected.csv", images_root=face_dir, model_path=model,
                         with_ages=True, progress=False)
    result = pd.read_csv(tmp_path / "detected.csv", dtype={"Category": str})
    assert result["Category"].tolist()[2] == result["Category"].tolist()[4] == "no_face"
    assert pd.isna(result.loc[2, "age"])
    others = result.drop(index=[2, 4])
    assert others["Category"].astype(int).between(0, 4).all()
    assert ((10 <= others["age_p10"]) & (others["age_p10"] <= others["age"]) & (others["age"] <= others["age_p90"])
            & (others["age_p90"] <= 60)).all()
    assert len(detected) == 6
    crops = score_csv(tmp_path / "mixed.csv", tmp_path / "crops.csv", images_root=face_dir, model_path=model,
                      aligned=True, progress=False)
    assert crops["Category"].astype(int).between(0, 4).all()  # the blank image is scored as a crop
    assert list(crops.columns) == ["Id", "Category"]
