"""The fast engine's commands: train (config + flags), apply (exit codes, failures), export, import."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from impasto import images
from impasto.cli import main
from impasto.fast.models import load_model, save_model
from impasto.fast.train import TrainOptions, train
from impasto.fast.transformer import TransformerNet, TransformerSpec

pytestmark = pytest.mark.filterwarnings("ignore:using random VGG weights")


@pytest.fixture
def model_path(tmp_path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "model.pt"
    save_model(path, TransformerNet(TransformerSpec(width=0.25)), {"style": "test"})
    return path


@pytest.fixture
def photos(tmp_path, make_scene) -> Path:
    root = tmp_path / "photos"
    root.mkdir()
    for i in range(4):
        images.save_image(make_scene(36, 44, seed=i), root / f"p{i}.png")
    return root


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("impasto:")]
    assert "Traceback" not in err
    assert len(lines) == 1, err
    return lines[0]


def test_train_reads_config_and_flags_override_it(tmp_path, photos, make_texture, capsys):
    images.save_image(make_texture((0.2, 0.4, 0.8), 40, 40), tmp_path / "style.png")
    config = tmp_path / "style.yaml"
    config.write_text(f"style: {tmp_path / 'style.png'}\ndata: {photos}\nweights: random\nimage-size: 32\n"
                      "batch_size: 2\nsteps: 50\nwidth: 0.25\nworkers: 0\nstyle_layers: [relu1_2, relu2_2]\n")
    code = main(["train", "--config", str(config), "--steps", "2", "-o", str(tmp_path / "m.pt"), "--quiet"])
    assert code == 0
    _, meta = load_model(tmp_path / "m.pt")
    assert meta["steps"] == 2  # the flag beat the file's 50
    assert meta["options"]["style_layers"] == ["relu1_2", "relu2_2"] and meta["options"]["image_size"] == 32


def test_train_bad_config_is_one_line(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("learning_rat: 0.1\n")
    assert main(["train", "--config", str(config), "-o", str(tmp_path / "m.pt")]) == 2
    assert one_error_line(capsys) == f"impasto: error: unknown option 'learning_rat' in {config}"
    config.write_text("- a list\n")
    assert main(["train", "--config", str(config), "-o", str(tmp_path / "m.pt")]) == 2
    assert one_error_line(capsys) == f"impasto: error: {config} must hold a mapping of option names to values"
    assert not (tmp_path / "m.pt").exists()


def test_interrupted_training_saves_a_checkpoint_that_resumes(tmp_path, photos, make_texture):
    images.save_image(make_texture((0.2, 0.4, 0.8), 40, 40), tmp_path / "style.png")
    opts = TrainOptions(style=str(tmp_path / "style.png"), data=str(photos), weights="random", image_size=32,
                        batch_size=2, steps=5, width=0.25, workers=0, quiet=True)

    def stop_after_two(step: int, total: int, terms: dict) -> None:
        if step == 2:
            raise KeyboardInterrupt

    result = train(opts, tmp_path / "m.pt", callbacks=[stop_after_two])
    assert result.interrupted and result.step == 2
    assert not (tmp_path / "m.pt").exists()  # no half-trained model where the finished one goes
    assert (tmp_path / "m.pt.ckpt" / "checkpoint_00000002.pt").is_file()
    assert train(opts, tmp_path / "m.pt", resume=tmp_path / "m.pt.ckpt").step == 5
    assert load_model(tmp_path / "m.pt")[1]["steps"] == 5


def test_apply_writes_each_input_at_its_size(tmp_path, model_path, photos, make_scene, capsys):
    single = tmp_path / "odd.jpg"
    images.save_image(make_scene(31, 17), single)
    out = tmp_path / "out"
    assert main(["apply", str(model_path), str(single), str(photos), "-o", str(out), "--quiet"]) == 0
    assert images.load_image(out / "odd.jpg").shape == (3, 31, 17)
    for i in range(4):
        assert images.load_image(out / "photos" / f"p{i}.png").shape == (3, 36, 44)
    assert images.read_metadata(out / "photos" / "p0.png")["model"] == str(model_path)


def test_apply_reports_a_bad_file_and_goes_on(tmp_path, model_path, photos, capsys):
    (photos / "broken.png").write_bytes(b"\x89PNG broken")
    out = tmp_path / "out"
    assert main(["apply", str(model_path), str(photos), "-o", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert f"impasto: error: {photos / 'broken.png'}: " in err
    assert "impasto: 1 of 5 file(s) failed" in err and "Traceback" not in err
    assert sorted(p.name for p in (out / "photos").iterdir()) == [f"p{i}.png" for i in range(4)]


@pytest.mark.parametrize("make_bad, message", [
    (lambda p: None, "impasto: error: model file not found: {path}"),
    (lambda p: p.write_bytes(b"garbage"), "impasto: error: cannot read model file {path} (UnpicklingError); "
                                          "is it an impasto model?"),
    (lambda p: torch.save({"weights": torch.zeros(2)}, p),
     "impasto: error: {path} is not an impasto fast-style model (use `impasto import` for other toolkits)"),
])
def test_apply_bad_model_is_one_line(tmp_path, photos, capsys, make_bad, message):
    path = tmp_path / "bad.pt"
    make_bad(path)
    assert main(["apply", str(path), str(photos), "-o", str(tmp_path / "out")]) == 2
    assert one_error_line(capsys) == message.format(path=path)
    assert not (tmp_path / "out").exists()


def test_apply_refuses_writing_over_an_input(tmp_path, model_path, photos, capsys):
    assert main(["apply", str(model_path), str(photos / "p0.png"), "-o", str(photos)]) == 2
    assert "is also an input" in one_error_line(capsys)


def test_export_torchscript_from_the_command_line(tmp_path, model_path, capsys):
    assert main(["export", str(model_path), "--format", "torchscript"]) == 0
    exported = model_path.with_suffix(".torchscript.pt")
    assert f"wrote {exported}" in capsys.readouterr().err
    net, _ = load_model(model_path)
    x = torch.rand(1, 3, 29, 41)
    assert torch.allclose(torch.jit.load(str(exported))(x), net(x).clamp(0, 1), atol=1e-6)


def test_info_prints_a_models_network_and_origin(model_path, capsys):
    assert main(["info", str(model_path)]) == 0
    out = capsys.readouterr().out
    assert "network:\n" in out and "  width: 0.25\n" in out and "  upsample: nearest\n" in out
    assert "style: test\n" in out


def test_train_config_values_are_coerced_and_checked(tmp_path, photos, make_texture, capsys):
    images.save_image(make_texture((0.2, 0.4, 0.8), 40, 40), tmp_path / "style.png")
    config = tmp_path / "c.yaml"
    base = (f"style: {tmp_path / 'style.png'}\ndata: {photos}\nweights: random\n"
            "image_size: 32\nwidth: 0.25\nworkers: 0\n")
    config.write_text(base + "learning_rate: 1e-3\nsteps: '2'\nbatch_size: 2.0\nstyle_layers: relu1_2,relu2_2\n")
    assert main(["train", "--config", str(config), "-o", str(tmp_path / "m.pt"), "--quiet"]) == 0
    options = load_model(tmp_path / "m.pt")[1]["options"]
    assert options["learning_rate"] == 1e-3 and options["steps"] == 2 and options["batch_size"] == 2
    assert options["style_layers"] == ["relu1_2", "relu2_2"]
    capsys.readouterr()
    config.write_text(base + "keep_checkpoints: 1.5\n")
    assert main(["train", "--config", str(config), "-o", str(tmp_path / "n.pt")]) == 2
    assert one_error_line(capsys) == f"impasto: error: {config}: keep-checkpoints must be a whole number, got 1.5"


def test_train_refuses_outputs_that_would_clobber(tmp_path, photos, capsys):
    style = photos / "p0.png"
    assert main(["train", "--style", str(style), "--data", str(photos), "-o", str(tmp_path)]) == 2
    assert one_error_line(capsys) == f"impasto: error: -o {tmp_path} is a directory; give the model file to write, " \
                                     f"e.g. {tmp_path / 'style.pt'}"
    inside = photos / "model.pt"
    assert main(["train", "--style", str(style), "--data", str(photos), "-o", str(inside)]) == 2
    assert "is inside the training data folder" in one_error_line(capsys)
    assert main(["train", "--style", str(style), "--data", str(tmp_path), "-o", str(style)]) == 2
    assert "is also an input" in one_error_line(capsys)
    (tmp_path / "f").write_text("x")  # unwritable places: refused before training, not after it
    model = tmp_path / "f" / "m.pt"
    assert main(["train", "--style", str(style), "--data", str(photos), "-o", str(model)]) == 2
    assert one_error_line(capsys) == f"impasto: error: cannot write {model}: {tmp_path / 'f'} is not a directory"
    checkpoints = tmp_path / "f" / "ck"
    assert main(["train", "--style", str(style), "--data", str(photos), "-o", str(tmp_path / "m.pt"),
                 "--checkpoint-dir", str(checkpoints)]) == 2
    assert one_error_line(capsys) == (f"impasto: error: cannot write {checkpoints / 'checkpoint.pt'}: "
                                      f"{tmp_path / 'f'} is not a directory")
    assert not (tmp_path / "m.pt").exists()


def test_train_refuses_crops_that_will_not_fit_before_any_step(tmp_path, photos, capsys):
    style = photos / "p0.png"
    argv = ["train", "--style", str(style), "--data", str(photos), "-o", str(tmp_path / "m.pt"), "--weights", "random",
            "--image-size", "100000", "--steps", "1", "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("impasto: error:")]
    assert re.fullmatch(r"impasto: error: a training step on 4 crops of 100000x100000 needs about [0-9.]+ GiB but cpu "
                        r"has [0-9.]+ GiB; use a smaller --image-size or --batch-size", line), line
    assert not (tmp_path / "m.pt").exists() and not list(tmp_path.glob("m.pt.ckpt/*"))


def test_apply_runs_again_into_the_same_output_folder(tmp_path, model_path, photos):
    folder = photos.rename(tmp_path / "stylized")  # a name that once collided with the writability probe
    out = tmp_path / "out"
    for _ in range(2):
        assert main(["apply", str(model_path), str(folder), "-o", str(out), "--runtime", "torch", "--quiet"]) == 0
    assert sorted(p.name for p in (out / "stylized").iterdir()) == ["p0.png", "p1.png", "p2.png", "p3.png"]
    assert list(out.rglob(".*probe")) == []


def test_apply_into_its_own_input_folder_says_so(model_path, photos, capsys):
    assert main(["apply", str(model_path), str(photos), "-o", str(photos)]) == 2
    assert one_error_line(capsys) == (f"impasto: error: -o {photos} is the input folder {photos}; "
                                      f"give another folder for the results")


def test_apply_output_that_is_a_file_is_a_usage_error(tmp_path, model_path, photos, capsys):
    target = tmp_path / "afile"
    target.write_text("x")
    assert main(["apply", str(model_path), str(photos), "-o", str(target)]) == 2
    assert one_error_line(capsys) == f"impasto: error: -o {target} is a file; give a directory for the results"
