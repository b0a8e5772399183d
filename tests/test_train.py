"""The reference trainer: metrics, config, a tiny end-to-end run with every loss, baseline vs distilled,
exact resume after a kill, and a finite holistic D step at batch 4-6."""
from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from train_helpers import state_dicts_equal, tiny_config

from skd_train.config import TrainConfig, add_config_arguments, build_config
from skd_train.metrics import confusion_matrix, iou_from_confusion, mean_iou


# --- metrics -------------------------------------------------------------------------------------

def test_confusion_matrix_counts_pairs_and_skips_ignored_pixels():
    label = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 0, 2]])
    cm = confusion_matrix(pred, label, 3, ignore_index=255)
    assert cm.tolist() == [[1, 1, 0], [0, 2, 1], [1, 0, 1]]


def test_miou_on_known_confusion_matrix():
    cm = torch.tensor([[1, 1, 0], [0, 2, 1], [1, 0, 1]])
    # IoU_c = TP / (row + col - TP): 1/(2+2-1), 2/(3+3-2), 1/(2+2-1)
    expected = [1 / 3, 2 / 4, 1 / 3]
    assert iou_from_confusion(cm).tolist() == pytest.approx(expected)
    assert mean_iou(cm) == pytest.approx(sum(expected) / 3)


def test_miou_ignores_classes_absent_from_truth_and_prediction():
    cm = torch.tensor([[5, 0, 0], [0, 0, 0], [0, 0, 3]])
    iou = iou_from_confusion(cm)
    assert iou[0] == 1 and iou[2] == 1 and math.isnan(iou[1])
    assert mean_iou(cm) == 1.0
    # a class predicted but never true counts as IoU 0
    assert mean_iou(torch.tensor([[4, 1], [0, 0]])) == pytest.approx((4 / 5 + 0) / 2)


def test_sliding_window_equals_whole_image_for_a_pointwise_model():
    from skd_train.evaluate import logits_at, sliding_window_logits

    class Pointwise(torch.nn.Module):  # output stride 1, no context: windows must agree with the whole
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 1)

        def forward(self, x):
            return [self.conv(x)]

    model, images = Pointwise(), torch.randn(2, 3, 23, 37)
    whole = logits_at(model, images)
    tiled = sliding_window_logits(model, images, 4, window=(16, 16), stride_ratio=0.5)
    torch.testing.assert_close(tiled, whole, rtol=1e-5, atol=1e-5)


# --- config --------------------------------------------------------------------------------------

def test_config_file_then_command_line_overrides(tmp_path):
    import argparse
    path = tmp_path / "run.yaml"
    path.write_text("steps: 77\npixel_weight: 3.0\nlr: 0.05\ncrop_size: [48, 40]\n")
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    args = parser.parse_args(["--config", str(path), "--lr", "0.2", "--no-pixel", "--dataset-options",
                              '{"num_samples": 5}'])
    cfg = build_config(args)
    assert (cfg.steps, cfg.pixel_weight, cfg.lr, cfg.crop_size) == (77, 3.0, 0.2, (48, 40))
    assert cfg.pixel is False and cfg.pair is True and cfg.dataset_options == {"num_samples": 5}
    assert "pixel" not in cfg.distill_terms() and cfg.distill_terms()["pair"] == 0.5
    assert build_config(pair_weight=0).distill_terms().keys() == {"pixel", "holistic"}


def test_config_rejects_unknown_options_and_bad_values(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"stepz": 3}))
    with pytest.raises(ValueError, match="stepz"):
        import argparse
        build_config(argparse.Namespace(config=str(bad)))
    with pytest.raises(ValueError, match="--amp: expected one of none, bf16, fp16, got 'fp8'"):
        build_config(amp="fp8")
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        build_config(argparse.Namespace(config=str(tmp_path / "nope.yaml")))


def _train_parser():
    from skd_train.cli import _parser
    parser = _parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sub.choices["train"]


def test_every_flag_of_train_help_has_help_text_and_a_default():
    import argparse
    from skd_train.config import FIELDS
    actions = [a for a in _train_parser()._actions if a.option_strings and a.dest != "help"]
    assert {a.dest for a in actions} == set(FIELDS) | {"config"}
    for action in actions:
        assert action.help and action.help != argparse.SUPPRESS, action.option_strings
        if action.dest in FIELDS:
            assert "(default: " in action.help, action.option_strings
    help_text = _train_parser().format_help()
    assert "--no-holistic" in help_text and "{wgan-gp,hinge}" in help_text


def test_flag_choices_match_the_registries():
    from skd_kernels.holistic import ADV_TYPES
    from skd_train.config import ADV_TYPES as CONFIG_ADV_TYPES, DATASETS, MODELS, ON_DISK_DATASETS
    from skd_train.data import DATASET_NAMES, _ON_DISK
    from skd_train.models import MODEL_NAMES
    assert set(MODELS) == set(MODEL_NAMES) and set(DATASETS) == set(DATASET_NAMES)
    assert set(ON_DISK_DATASETS) == set(_ON_DISK) and set(CONFIG_ADV_TYPES) == set(ADV_TYPES)


@pytest.mark.parametrize("argv, message", [
    (["--dataset", "cityscapes"], "--data-root: dataset 'cityscapes' is read from disk"),
    (["--model", "resnet9"], "argument --model: invalid choice: 'resnet9'"),
    (["--steps", "0"], "--steps: expected >= 1, got 0"),
    (["--dataset-options", "{bad"], "argument --dataset-options: not valid JSON"),
    (["--dataset", "procedural", "--teacher-weights", "/nonexistent/t.pt"], "--teacher-weights: weights file not found"),
    (["--dataset", "procedural", "--no-pixel", "--no-pair", "--no-holistic", "--weights", "/nonexistent/s.pt"],
     "--weights: weights file not found"),
])
def test_config_mistakes_are_one_line_errors_naming_the_flag(tmp_path, capsys, argv, message):
    from skd_train.cli import main
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--out-dir", str(tmp_path / "run"), "--device", "cpu", "--width", "0.0625",
              "--teacher", "pspnet_resnet18", "--teacher-width", "0.0625", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and "Traceback" not in "\n".join(err)


def test_official_recipe_defaults():
    cfg = TrainConfig()
    assert (cfg.lr, cfg.momentum, cfg.weight_decay, cfg.poly_power, cfg.lr_d) == (0.01, 0.9, 5e-4, 0.9, 4e-4)
    assert cfg.distill_terms() == {"pixel": 10.0, "pair": 0.5, "holistic": 0.1}
    assert (cfg.d_weight, cfg.lambda_gp, cfg.dsn_weight) == (0.1, 10.0, 0.4)


def test_cuda_graph_option_is_off_by_default_and_parses_with_its_help():
    assert TrainConfig().cuda_graph is False
    parser = _train_parser()
    assert build_config(parser.parse_args(["--device", "cuda", "--cuda-graph"])).cuda_graph is True
    assert build_config(parser.parse_args(["--device", "cuda", "--no-cuda-graph"])).cuda_graph is False
    help_text = " ".join(parser.format_help().split())
    assert "--cuda-graph, --no-cuda-graph" in help_text and "CUDA graphs" in help_text
    assert "(default: off)" in help_text.split("--cuda-graph, --no-cuda-graph")[1].split("--")[0]


@pytest.mark.parametrize("argv, message", [
    (["--cuda-graph"], "--cuda-graph: CUDA graphs need a GPU; this run has --device cpu"),
    (["--device", "cuda", "--cuda-graph", "--no-holistic"], "--cuda-graph: captures the holistic term's steps"),
    (["--device", "cuda", "--cuda-graph", "--adv-weight", "0"], "--cuda-graph: captures the holistic term's steps"),
])
def test_cuda_graph_option_errors_are_one_line_naming_the_flag(tmp_path, capsys, argv, message):
    test_config_mistakes_are_one_line_errors_naming_the_flag(tmp_path, capsys, argv, message)


@pytest.mark.skipif(torch.cuda.is_available(), reason="auto picks the GPU here")
def test_cuda_graph_option_with_auto_on_a_machine_without_gpu_is_a_one_line_error(tmp_path, capsys):
    test_config_mistakes_are_one_line_errors_naming_the_flag(
        tmp_path, capsys, ["--device", "auto", "--cuda-graph"], "--cuda-graph: CUDA graphs need a GPU; this run's device is cpu")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_option_trains_and_matches_the_eager_student_terms_at_the_first_step(tmp_path):
    """The captured G term sees the same D as the eager one at step 1 (capture leaves D as it was), so
    the logged adv_g agrees; the D step's alphas come from another generator (the GPU's), so d_loss
    only has to be finite. Three steps: capture, then replays."""
    from skd_train.train import train
    runs = {}
    for graph in (False, True):
        cfg = tiny_config(tmp_path, f"graph_{graph}", device="cuda", cuda_graph=graph, crop_size=(64, 64))
        train(cfg)
        runs[graph] = [r for r in _log_rows(tmp_path / f"graph_{graph}") if r["task"]]
    assert len(runs[True]) == 3
    for row in runs[True]:
        assert all(math.isfinite(float(row[key])) for key in ("adv_g", "d_loss", "loss")), row
    eager, graphed = float(runs[False][0]["adv_g"]), float(runs[True][0]["adv_g"])
    assert graphed == pytest.approx(eager, rel=1e-4, abs=1e-6)


# --- runs ----------------------------------------------------------------------------------------

def _log_rows(out_dir):
    with open(out_dir / "log.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_tiny_run_with_every_loss_through_the_command_line(tmp_path, capsys):
    from skd_train.cli import main
    cfg = tiny_config(tmp_path)
    args = ["train", "--dataset", "procedural", "--dataset-options", '{"num_samples": 12}', "--crop-size", "32", "32",
            "--batch-size", "4", "--width", "0.0625", "--teacher", cfg.teacher, "--teacher-width",
            str(cfg.teacher_width), "--teacher-weights", cfg.teacher_weights, "--d-conv-dim", "8", "--steps", "3",
            "--device", "cpu", "--no-progress", "--out-dir", cfg.out_dir, "--ohem", "--ohem-min-kept", "500"]
    assert main(args) == 0
    rows = _log_rows(tmp_path / "run")
    steps = [r for r in rows if r["task"]]
    assert [int(r["step"]) for r in steps] == [1, 2, 3]
    for r in steps:
        for key in ("task", "pixel", "pair", "adv_g", "d_loss", "loss"):
            assert math.isfinite(float(r[key])), (key, r)
        assert float(r["pixel"]) > 0 and float(r["pair"]) > 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert 0 <= results["miou"] <= 1 and len(results["iou"]) == 4
    assert (tmp_path / "run" / "last.pt").exists() and (tmp_path / "run" / "model.pt").exists()
    # `skd-train eval` scores the saved weights: the same mIoU as the run's final evaluation
    capsys.readouterr()
    assert main(["eval", "--config", str(tmp_path / "run" / "config.json"), "--weights",
                 str(tmp_path / "run" / "model.pt"), "--no-progress"]) == 0
    assert capsys.readouterr().out.startswith(f"mIoU {100 * results['miou']:.2f}")


def test_baseline_and_distilled_differ_only_in_the_loss_switches(tmp_path):
    from skd_train.train import Trainer
    plain = tiny_config(tmp_path, "plain", pixel=False, pair=False, holistic=False)
    distilled = tiny_config(tmp_path, "distilled")
    diff = {k for k, v in plain.to_dict().items() if distilled.to_dict()[k] != v}
    assert diff == {"pixel", "pair", "holistic", "out_dir"}
    a = Trainer(plain)
    xa, ya = next(iter(a._epoch_loader()))
    va = a.train_step(xa, ya)
    b = Trainer(distilled)  # built after a's step: the generators are reseeded at the end of construction
    xb, yb = next(iter(b._epoch_loader()))
    assert torch.equal(xa, xb) and torch.equal(ya, yb)  # same data
    assert a.teacher is None and a.distill.D is None and b.teacher is not None and b.distill.D is not None
    vb = b.train_step(xb, yb)
    assert va["task"] == vb["task"]  # same task loss before the first update
    assert set(vb) - set(va) == {"pixel", "pair", "adv_g", "d_loss"}


def test_resume_after_a_kill_reproduces_the_uninterrupted_run_bitwise(tmp_path):
    from skd_train.checkpoint import load_checkpoint
    from skd_train.train import SimulatedKill, train
    # 12 samples / batch 4 = 3 steps per epoch: the run crosses epochs, the kill lands mid-epoch,
    # after the step-4 checkpoint, so step 5 is lost and redone.
    common = dict(steps=7, ckpt_every=2, eval_every=3)
    train(tiny_config(tmp_path, "straight", **common))
    with pytest.raises(SimulatedKill):
        train(tiny_config(tmp_path, "killed", stop_after=5, **common))
    assert load_checkpoint(tmp_path / "killed" / "last.pt")["step"] == 4
    train(tiny_config(tmp_path, "killed", resume=True, **common))
    a = load_checkpoint(tmp_path / "straight" / "last.pt")
    b = load_checkpoint(tmp_path / "killed" / "last.pt")
    assert a["step"] == b["step"] == 7
    for part in ("model", "D"):
        assert state_dicts_equal(a[part], b[part]) == [], part
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for k in a["optimizer"]["state"]:
        assert torch.equal(a["optimizer"]["state"][k]["momentum_buffer"], b["optimizer"]["state"][k]["momentum_buffer"])
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    # the resumed log has each step once, with the same values
    rows_a, rows_b = _log_rows(tmp_path / "straight"), _log_rows(tmp_path / "killed")
    assert rows_a == rows_b


def test_resume_refuses_other_options_and_a_finished_run_keeps_its_log(tmp_path, capsys):
    from skd_train.config import ConfigError
    from skd_train.train import train
    first = train(tiny_config(tmp_path, "run", steps=2))
    config_before = (tmp_path / "run" / "config.json").read_text()
    rows_before = _log_rows(tmp_path / "run")
    assert [r["step"] for r in rows_before if r["miou"]] == ["2"]
    with pytest.raises(ConfigError, match=r"--resume: .*--lr 0\.01 \(now 0\.05\), --pixel-weight 10\.0 \(now 3\.0\)"):
        train(tiny_config(tmp_path, "run", steps=2, resume=True, lr=0.05, pixel_weight=3.0))
    assert (tmp_path / "run" / "config.json").read_text() == config_before  # the record stays true
    capsys.readouterr()
    again = train(tiny_config(tmp_path, "run", steps=2, resume=True, progress=True))  # session options may change
    assert "finished at step 2 already" in capsys.readouterr().err
    assert _log_rows(tmp_path / "run") == rows_before  # no second final row
    assert again["miou"] == first["miou"]


def test_resume_without_a_checkpoint_says_it_starts_from_scratch(tmp_path, capsys):
    from skd_train.train import train
    train(tiny_config(tmp_path, "fresh", steps=1, resume=True))
    assert f"no checkpoint at {tmp_path / 'fresh' / 'last.pt'}: starting from step 0" in capsys.readouterr().err
    assert [r["step"] for r in _log_rows(tmp_path / "fresh")] == ["1", "1"]  # losses, then the final mIoU


def test_two_processes_with_the_same_seed_and_threads_write_identical_logs(tmp_path):
    """Each run in a fresh process (nothing shared but the files): the per-step losses and the final
    evaluation agree bitwise. Two threads, so that multithreaded reductions are part of the check."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    cfg = tiny_config(tmp_path, "unused", steps=3)
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(root / "python"),
                                                         os.environ.get("PYTHONPATH", "")])}
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    for name in ("a", "b"):
        subprocess.run([sys.executable, "-m", "skd_train", "train", "--config", str(tmp_path / "config.json"),
                        "--out-dir", str(tmp_path / name), "--threads", "2"], check=True, env=env, cwd=tmp_path,
                       timeout=600, capture_output=True)
    a, b = (tmp_path / "a" / "log.csv").read_text(), (tmp_path / "b" / "log.csv").read_text()
    assert a == b and len(a.splitlines()) == 5  # header, 3 steps, the final mIoU
    result = lambda name: json.loads((tmp_path / name / "results.json").read_text())  # noqa: E731
    assert result("a")["confusion"] == result("b")["confusion"] and result("a")["threads"] == 2


@pytest.mark.parametrize("batch", [4, 5, 6])
def test_holistic_d_step_stays_finite_at_small_batches(tmp_path, batch):
    from skd_train.losses import DistillLosses
    torch.manual_seed(batch)
    cfg = build_config(batch_size=batch, d_conv_dim=8, pixel=False, pair=False)
    losses = DistillLosses(cfg, num_classes=3)
    opt = torch.optim.SGD(losses.D.parameters(), lr=cfg.lr_d, momentum=0.9)
    # degenerate maps: a class never predicted (constant channel), saturated and identical samples
    teacher = torch.randn(batch, 3, 16, 16) * 20
    student = torch.zeros(batch, 3, 16, 16)
    student[:, 0] = 30.0
    for _ in range(5):
        opt.zero_grad()
        d_loss = losses.d_step([student], [teacher])
        assert torch.isfinite(d_loss)
        assert all(torch.isfinite(p.grad).all() for p in losses.D.parameters() if p.grad is not None)
        opt.step()
        g = losses.student_terms([student.requires_grad_()], [teacher])["adv_g"]
        assert torch.isfinite(g)


# --- set-up --------------------------------------------------------------------------------------

def test_installed_packages_have_no_conflicts():
    """scripts/setup_env.sh ends with a clean `pip check`; so must the environment the tests run in."""
    import importlib.util
    import subprocess
    import sys
    if importlib.util.find_spec("pip") is None:
        pytest.skip("pip is not installed")
    done = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
