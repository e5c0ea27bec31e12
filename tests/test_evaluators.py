"""Evaluators end to end: exact masked inference over devices, every metric in the report."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from vitcls import configs, evaluate, evaluators, train, validate
from vitcls.run import report
from conftest import REPO, xla_flags

DIGITS = os.path.join(REPO, "experiments", "digits_vit.py:runlocal=True")


def test_1001_examples_batch_64_over_8_devices_are_each_counted_once():
  """The split is padded to 1,024 and the 23 padding rows are dropped by their mask."""
  script = textwrap.dedent("""
      import jax, numpy as np
      from vitcls import configs, sharding
      from vitcls.data import sources
      from vitcls import inference

      class Source:
        def __len__(self):
          return 1001
        def __getitem__(self, i):
          return {"image": np.zeros((2, 2, 1), np.uint8), "label": i % 7, "index": np.int32(i)}

      class Model:  # A stand-in: constant logits; the pass-through `index` shows the order.
        def apply(self, variables, images, train=False):
          logits = images.reshape(images.shape[0], -1)[:, :1].repeat(7, axis=1)
          return logits, {"pre_logits": logits}

      sources.get_source = lambda *a, **k: Source()
      config = configs.resolve(configs.ConfigDict())
      mesh = sharding.make_mesh([("data", -1)])
      split = inference.Inference(
          model=Model(), name="x", split="test", pp="onehot(7)", batch_size=64,
          train_config=config, mesh=mesh, batch_sharding=sharding.batch_sharding(mesh),
          extra_keys=("index",))
      out = split.run({})
      print(jax.device_count(), len(out["index"]), sorted(out["index"].tolist()) == list(range(1001)),
            out["index"].tolist() == list(range(1001)), int(out["labels"].sum()),
            [int(x) for x in np.argmax(out["labels"], -1)[:8]])
  """)
  env = dict(os.environ, XLA_FLAGS=xla_flags(8))
  proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.split("\n")[-2] == "8 1001 True True 1001 [0, 1, 2, 3, 4, 5, 6, 0]"


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
  """A runlocal digits ViT trained with every evaluator on, then `vitcls.evaluate`."""
  workdir = str(tmp_path_factory.mktemp("digits"))
  evals = [
      "evals.calib.type=calibration", "evals.calib.every=1000",
      "evals.ood.type=ood", "evals.ood.ood_data=mnist5k", "evals.ood.every=1000",
      "evals.ood.ood_pp=resize(8)|value_range(-1,1)|onehot(10)",
      "evals.ood.fit_examples=300",
      "evals.probe.type=fewshot", "evals.probe.shots=[1, 5]", "evals.probe.seeds=2",
      "evals.probe.every=1000", "ema_decay=0.5"]
  config = configs.resolve(configs.load_experiment(DIGITS), evals)
  final = train.train(config, workdir)
  return workdir, final


def test_every_evaluator_reports_during_training(evaluated):
  _, final = evaluated
  for key in ["test/top1", "test/top5", "test/balanced_accuracy", "test/worst_class_accuracy",
              "calib/ece", "calib/nll", "calib/brier", "calib/temperature",
              "calib/ece_scaled", "ood/msp/auroc", "ood/energy/aupr",
              "ood/mahalanobis/fpr95", "ood/relative_mahalanobis/auroc", "probe/1shot",
              "probe/5shot", "test_ema/top1"]:
    assert key in final, key
  assert final["test/count"] == 359 and final["ood/count_out"] == 1000
  assert 0 <= final["test/worst_class_accuracy"] <= final["test/balanced_accuracy"] <= 1


def test_evaluate_cli_adds_evaluators_and_writes_the_report_with_plots(evaluated):
  workdir, final = evaluated
  results = evaluate.evaluate(workdir, overrides=["evals.test.slice_by=label"])
  assert results["test/top1"] == pytest.approx(final["test/top1"])
  assert "test/worst_group_accuracy" in results
  with open(os.path.join(workdir, "report", "evaluate.json")) as f:
    assert json.load(f)["step"] == 4
  text = open(os.path.join(workdir, "report", "report.md")).read()
  for name in ["test_confusion.png", "test_per_class.png", "calib_reliability.png",
               "ood_ood.png", "test_ema_confusion.png"]:
    assert f"({name})" in text, name
    with Image.open(os.path.join(workdir, "report", name)) as image:
      assert image.size[0] > 200 and image.size[1] > 200
  assert "| ood/msp/auroc |" in text and "| test/worst_group_accuracy |" in text


def test_evaluate_checks_the_overridden_config_as_training_does(evaluated, tmp_path):
  workdir, _ = evaluated
  with pytest.raises(configs.ConfigError) as e:
    evaluate.evaluate(workdir, overrides=["loss=nope", "model.depht=2"])
  assert "loss" in str(e.value) and "model.depht" in str(e.value)
  assert "2 problems" in str(e.value)
  # model_init is what a run started from; evaluating it again does not read it.
  config = configs.load_workdir_config(workdir, ["model_init=" + str(tmp_path / "gone.npz")])
  validate.check(config, training=False)
  with pytest.raises(configs.ConfigError, match="gone.npz"):
    validate.check(config)


def test_ood_needs_an_ood_dataset():
  config = configs.resolve(configs.load_experiment(DIGITS), ["evals.ood.type=ood"])
  cfg = evaluators.resolve("ood", config.evals.ood)
  with pytest.raises(configs.ConfigError, match="needs ood_data"):
    evaluators.get("ood").Evaluator(cfg, model=None, train_config=config, mesh=None,
                                    batch_sharding=None)


def test_predict_writes_a_row_per_file_with_errors_and_ood_flags(evaluated, tmp_path):
  import csv
  from vitcls import predict
  from vitcls.data import sources
  workdir, final = evaluated
  folder = tmp_path / "images"
  folder.mkdir()
  source = sources.get_source("digits", "test")
  for i in range(3):
    Image.fromarray(np.repeat(source[i]["image"], 3, -1)).save(folder / f"digit{i}.png")
  Image.fromarray(np.full((8, 8, 3), 255, np.uint8)).save(folder / "white.png")
  (folder / "notes.png").write_text("not an image")
  (folder / "empty.jpg").write_bytes(b"")
  (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 20)
  output = str(tmp_path / "preds.csv")
  counts = predict.predict(workdir, str(folder), output, topk=3)
  assert counts["predicted"] == 4 and counts["failed"] == 3
  with open(output) as f:
    rows = {os.path.basename(r["path"]): r for r in csv.DictReader(f)}
  assert sorted(rows) == sorted(os.listdir(folder))
  for bad in ("notes.png", "empty.jpg", "broken.jpg"):
    assert rows[bad]["error"] and not rows[bad]["label_1"]
  for i in range(3):
    row = rows[f"digit{i}.png"]
    probs = [float(row[f"prob_{r}"]) for r in (1, 2, 3)]
    assert probs == sorted(probs, reverse=True) and row["label_1"] in list("0123456789")
    assert float(row["ood_score"]) == pytest.approx(-probs[0], abs=1e-6)
    assert int(row["ood_flag"]) == int(-probs[0] > final["ood/msp/threshold"])


def test_a_folder_with_broken_files_trains_evaluates_and_predicts_through_the_clis(tmp_path):
  """folder:PATH with a corrupt JPEG, a text file named .png and a zero-byte file."""
  from vitcls.data import sources
  root = tmp_path / "images"
  digits = {split: sources.get_source("digits", split) for split in ("train", "test")}
  for split, per_class in (("train", 12), ("test", 4)):
    seen = {c: 0 for c in range(3)}
    for i in range(len(digits[split])):
      example = digits[split][i]
      label = int(example["label"])
      if label < 3 and seen[label] < per_class:
        folder = root / split / f"digit_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.repeat(example["image"], 3, -1)).save(folder / f"{i}.png")
        seen[label] += 1
  broken = root / "train" / "digit_0"
  (broken / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 40)
  (broken / "notes.png").write_text("this is not an image")
  (broken / "empty.jpg").write_bytes(b"")
  pp = "value_range(-1,1)|onehot(3)"
  workdir = str(tmp_path / "run")
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  common = [f"--workdir={workdir}"]
  trained = subprocess.run(
      [sys.executable, "-m", "vitcls.train", f"--config={DIGITS}", *common,
       f"--config.input.data.name=folder:{root}", "--config.num_classes=3",
       f"--config.input.pp={pp}", f"--config.evals.test.pp={pp}",
       "--config.evals.test.batch_size=16"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert trained.returncode == 0, trained.stderr[-3000:]
  assert "skipping 3 of 39 image files" in trained.stderr
  assert "Final eval: " in trained.stdout and "test/count=12.0000" in trained.stdout

  results = evaluate.evaluate(workdir)
  assert results["test/count"] == 12
  # The report's plots name the classes after the folders.
  assert report.load_artifacts(workdir)["test"]["class_names"].tolist() == [
      "digit_0", "digit_1", "digit_2"]

  predicted = subprocess.run(
      [sys.executable, "-m", "vitcls.predict", *common, f"--input={root / 'train'}",
       f"--output={tmp_path / 'preds.csv'}", "--topk=2"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert predicted.returncode == 0, predicted.stderr[-3000:]
  assert "36 predicted" in predicted.stdout and "3 unreadable" in predicted.stdout
  rows = (tmp_path / "preds.csv").read_text().splitlines()
  assert len(rows) == 40 and rows[0].startswith("path,label_1,prob_1,label_2,prob_2")
  assert any(r.startswith(str(broken / "notes.png")) and r.split(",")[-1] for r in rows)
  assert "digit_1" in rows[1] or "digit_0" in rows[1]  # Label names from the folders.
