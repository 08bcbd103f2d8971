"""Training fast style networks: the loss drops, checkpoints, exact resume, data handling, DDP on gloo."""

from __future__ import annotations

import os
import socket
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from impasto import images
from impasto.errors import ImpastoError
from impasto.fast.models import load_model
from impasto.fast.train import (
    EpochBatches,
    TrainOptions,
    find_images,
    random_crop_box,
    style_loss_template,
    train,
)
from impasto.fast.transformer import TransformerNet, TransformerSpec
from impasto.nets import load_vgg

pytestmark = pytest.mark.filterwarnings("ignore:using random VGG weights")


def options(photos: Path, style_path: Path, **kw) -> TrainOptions:
    base = dict(style=str(style_path), data=str(photos), weights="random", image_size=32, batch_size=2,
                width=0.25, workers=0, checkpoint_every=1000, quiet=True, seed=3,
                device="cpu")  # bit-exact claims are about CPU runs; the DDP test runs on gloo
    return TrainOptions(**{**base, **kw})


def fixed_loss(net: torch.nn.Module, opts: TrainOptions, batch: torch.Tensor) -> float:
    """The training objective of `net` on one fixed batch (evaluated, not stepped)."""
    vgg = _vgg(opts)
    loss = style_loss_template(vgg, images.load_image(opts.style), opts)
    with torch.no_grad():
        content = vgg(batch, loss.content_layer_weights)
        out = net(batch)
        total, _ = replace(loss, content_targets=content)(out, vgg(out))
    return float(total)


def _vgg(opts: TrainOptions):
    """The random loss network train() builds: same seed, after the same network initialization."""
    torch.manual_seed(opts.seed)
    TransformerNet(TransformerSpec(width=opts.width))
    return load_vgg(opts.model, [*opts.content_layers, *opts.style_layers], opts.pooling, "random")


def test_training_lowers_the_loss_and_writes_model_and_checkpoints(tmp_path, photos, style_path):
    opts = options(photos, style_path, steps=24, checkpoint_every=10, keep_checkpoints=2, learning_rate=3e-3)
    batch = torch.stack([images.resize(images.load_image(p), (32, 32)) for p in find_images(photos)[:2]])
    torch.manual_seed(opts.seed)
    untrained = TransformerNet(TransformerSpec(width=0.25))  # what train() starts from (same seed)
    result = train(opts, tmp_path / "m.pt")
    net, meta = load_model(tmp_path / "m.pt")
    assert result.step == 24 and meta["steps"] == 24 and meta["style"] == "style.png"
    before, after = fixed_loss(untrained, opts, batch), fixed_loss(net, opts, batch)
    assert after < 0.7 * before, (before, after)
    # checkpoints at 10, 20 and the final one at 24; only the newest 2 are kept
    assert sorted(p.name for p in (tmp_path / "m.pt.ckpt").iterdir()) == ["checkpoint_00000020.pt",
                                                                          "checkpoint_00000024.pt"]


def test_resume_continues_exactly(tmp_path, photos, style_path):
    train(options(photos, style_path, steps=6), tmp_path / "full.pt")
    train(options(photos, style_path, steps=3), tmp_path / "half.pt")
    ckpt = torch.load(tmp_path / "half.pt.ckpt" / "checkpoint_00000003.pt", weights_only=True)
    assert ckpt["step"] == 3
    assert all(int(s["step"]) == 3 for s in ckpt["optimizer"]["state"].values())  # Adam's own step count
    result = train(options(photos, style_path, steps=6), tmp_path / "half.pt", resume=tmp_path / "half.pt.ckpt")
    assert result.step == 6
    full, _ = load_model(tmp_path / "full.pt")
    resumed, _ = load_model(tmp_path / "half.pt")
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    final = torch.load(tmp_path / "half.pt.ckpt" / "checkpoint_00000006.pt", weights_only=True)
    assert all(int(s["step"]) == 6 for s in final["optimizer"]["state"].values())


def test_resume_refuses_changed_settings(tmp_path, photos, style_path):
    train(options(photos, style_path, steps=2), tmp_path / "m.pt")
    with pytest.raises(ImpastoError, match=r"cannot resume .*checkpoint_00000002.pt: width was 0.25, now 0.5"):
        train(options(photos, style_path, steps=4, width=0.5), tmp_path / "m.pt", resume=tmp_path / "m.pt.ckpt")
    with pytest.raises(ImpastoError, match="no checkpoint to resume in"):
        train(options(photos, style_path, steps=4), tmp_path / "m.pt", resume=tmp_path)
    other_path = f"{style_path.parent}/./{style_path.name}"  # the same file by another path resumes
    assert train(options(photos, other_path, steps=3), tmp_path / "m.pt", resume=tmp_path / "m.pt.ckpt").step == 3


def test_unreadable_files_are_skipped_and_counted(tmp_path, photos, style_path):
    (photos / "broken.jpg").write_bytes(b"not a jpeg")
    (photos / "nested" / "empty.png").write_bytes(b"")
    with pytest.warns(UserWarning, match=r"skipped 2 unreadable image\(s\)"):
        result = train(options(photos, style_path, epochs=2, batch_size=4), tmp_path / "m.pt")
    assert result.skipped == {str(photos / "broken.jpg"), str(photos / "nested" / "empty.png")}
    assert result.step == result.total == 2 * (12 // 4)


def test_bad_options_are_clear(tmp_path, photos, style_path):
    with pytest.raises(ImpastoError, match="training data folder not found"):
        train(options(tmp_path / "nowhere", style_path), tmp_path / "m.pt")
    with pytest.raises(ImpastoError, match="style image not found"):
        train(options(photos, tmp_path / "none.png"), tmp_path / "m.pt")
    with pytest.raises(ImpastoError, match=r"has 10 images; a batch of 16 on 1 process\(es\) needs at least 16"):
        train(options(photos, style_path, batch_size=16), tmp_path / "m.pt")
    with pytest.raises(ImpastoError, match="crop-scale takes two numbers"):
        train(options(photos, style_path, crop_scale=[0.5, 1.5]), tmp_path / "m.pt")
    with pytest.raises(ImpastoError, match="unknown option 'learning_rat' in cfg.yaml"):
        TrainOptions.from_dict({"learning-rat": 1}, "cfg.yaml")
    assert not (tmp_path / "m.pt").exists()


def test_epoch_batches_shard_each_permutation_and_restart_anywhere():
    n, batch, world = 23, 3, 2
    shards = [list(EpochBatches(n, batch, 7, rank, world, 0, epochs=2)) for rank in range(world)]
    per_epoch = (n // world) // batch
    assert all(len(s) == 2 * per_epoch for s in shards)
    for epoch in range(2):
        keys = [k for s in shards for b in s[epoch * per_epoch:(epoch + 1) * per_epoch] for k in b]
        assert {e for e, _ in keys} == {epoch}
        indices = [i for _, i in keys]
        assert len(indices) == len(set(indices)) == world * per_epoch * batch  # disjoint, no repeats
    assert [k for b in shards[0][:per_epoch] for k in b] != [k for b in shards[0][per_epoch:] for k in b]
    assert list(EpochBatches(n, batch, 7, 1, world, 5, epochs=2)) == shards[1][5:]


def test_random_crops_stay_inside_and_cover_the_asked_area():
    rng = np.random.default_rng(0)
    for _ in range(200):
        x0, y0, x1, y1 = random_crop_box(120, 80, rng, (0.3, 0.6))
        assert 0 <= x0 < x1 <= 120 and 0 <= y0 < y1 <= 80
        assert 0.3 - 1e-9 <= (x1 - x0) * (y1 - y0) / (120 * 80) <= 0.6 + 1e-9
        assert 3 / 4 - 1e-9 <= (x1 - x0) / (y1 - y0) <= 4 / 3 + 1e-9


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, opts: TrainOptions, out: str, dump: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    result = train(opts, out)
    torch.save({k: v.clone() for k, v in result.net.state_dict().items()}, f"{dump}/rank{rank}.pt")


def test_ddp_on_gloo_keeps_replicas_identical_and_only_rank0_writes(tmp_path, photos, style_path):
    # two unreadable files among 12, one image per rank and step, a whole epoch: some step has a rank
    # without a batch, and the ranks must skip it together (one stepping alone would pair mismatched all-reduces)
    (photos / "bad1.jpg").write_bytes(b"junk")
    (photos / "nested" / "bad2.png").write_bytes(b"junk")
    opts = options(photos, style_path, steps=6, batch_size=1, checkpoint_every=2)
    out = tmp_path / "out" / "m.pt"
    torch.multiprocessing.spawn(_ddp_worker, args=(2, _free_port(), opts, str(out), str(tmp_path)), nprocs=2)
    a = torch.load(tmp_path / "rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    saved, _ = load_model(out)
    assert all(torch.equal(saved.state_dict()[k], a[k]) for k in a)
    # the replicas moved away from the common start: gradients were applied, not just broadcast
    torch.manual_seed(opts.seed)
    start = TransformerNet(TransformerSpec(width=0.25)).state_dict()
    assert any(not torch.equal(start[k], a[k]) for k in a)
    assert sorted(p.name for p in out.parent.iterdir()) == ["m.pt", "m.pt.ckpt"]


def test_tensorboard_logs_each_term_and_samples(tmp_path, photos, style_path):
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    opts = options(photos, style_path, steps=4, log_dir=str(tmp_path / "logs"), log_every=2, sample_every=2,
                   tv_weight=1.0)
    result = train(opts, tmp_path / "m.pt")
    events = accumulator.EventAccumulator(str(tmp_path / "logs"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    assert {"loss/loss", "loss/content", "loss/style", "loss/tv"} <= set(tags["scalars"])
    assert [e.step for e in events.Scalars("loss/loss")] == [1, 2, 4]
    assert events.Scalars("loss/loss")[-1].value == pytest.approx(result.last["loss"], rel=1e-6)
    assert {"photos", "stylized"} <= set(tags["images"])
    assert [e.step for e in events.Images("stylized")] == [1, 2, 4]


def test_all_unreadable_data_is_an_error_not_a_model(tmp_path, style_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for i in range(4):
        (bad / f"{i}.jpg").write_bytes(b"junk")
    with pytest.raises(ImpastoError, match=r"none of the images read in .*bad could be used, e\.g\. .*0\.jpg"):
        train(options(bad, style_path, steps=2), tmp_path / "m.pt")
    assert not (tmp_path / "m.pt").exists()


def test_a_fresh_run_refuses_an_earlier_runs_checkpoints(tmp_path, photos, style_path):
    train(options(photos, style_path, steps=2), tmp_path / "m.pt")
    with pytest.raises(ImpastoError, match=r"m\.pt\.ckpt holds checkpoints of an earlier run; continue it with"):
        train(options(photos, style_path, steps=3), tmp_path / "m.pt")
    with pytest.raises(ImpastoError, match=r"m\.pt is a finished model, not a training checkpoint"):
        train(options(photos, style_path, steps=3), tmp_path / "m.pt", resume=tmp_path / "m.pt")


def test_training_reads_16_bit_photos_at_their_brightness(tmp_path):
    from PIL import Image

    from impasto.fast.train import PhotoFolder

    ramp = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    crop, _ = PhotoFolder([tmp_path / "deep.png"], 32, (1.0, 1.0), 0)[(0, 0)]
    assert crop is not None and abs(float(crop.mean()) - 0.5) < 0.1


def test_non_finite_training_options_are_refused(tmp_path, photos, style_path):
    with pytest.raises(ImpastoError, match=r"^style-weight must be a finite number, got nan$"):
        options(photos, style_path, style_weight=float("nan")).check()


def test_an_output_folder_with_a_long_name_can_be_written(tmp_path):
    """The write probe of a folder has a short name of its own (a file's probe takes the file's name)."""
    from impasto.files import check_writable_folder

    check_writable_folder(tmp_path / ("f" * 250))
