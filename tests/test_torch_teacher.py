"""Teachers in and out in torchvision's layout: exact features, round trips, clear errors."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill.cli import main
from distill.errors import DistillError
from distill.methods import barlow_twins
from distill.nn import torch_layout
from distill.nn.models import build_model, init_model
from tests.conftest import ROOT, smoke_args

ARCH = dict(name="tv_resnet18", width=8, stem="cifar")


def _random_backbone(arch=ARCH, shape=(16, 16, 3), seed=0) -> dict:
  """Variables with random batch-norm statistics (eval-mode BN is then no identity)."""
  variables = jax.device_get(init_model(build_model(arch), jax.random.key(seed), shape))
  r = np.random.default_rng(seed)
  variables["batch_stats"] = jax.tree.map(
      lambda v: r.uniform(0.5, 1.5, v.shape).astype(np.float32), variables["batch_stats"])
  return variables


def _features(model, variables, x):
  return np.asarray(model.apply(variables, jnp.asarray(x), train=False)[0])


def test_export_then_import_gives_identical_features_without_torch(tmp_path):
  variables = _random_backbone()
  state = torch_layout.from_variables(variables)
  assert state["conv1.weight"].shape == (8, 3, 3, 3)              # torch's (out, in, kh, kw)
  assert "layer2.0.downsample.1.running_var" in state
  assert not any(k.startswith("head") for k in state)
  x = np.random.default_rng(1).normal(size=(5, 16, 16, 3)).astype(np.float32)
  want = _features(build_model(ARCH), variables, x)
  for name, write in (("w.safetensors", torch_layout.save_safetensors),
                      ("w.npz", lambda p, s: np.savez(p, **s))):
    write(str(tmp_path / name), state)
    teacher = barlow_twins.import_torch_backbone(str(tmp_path / name), str(tmp_path / name[2:]),
                                                 (16, 16, 3), [0.5] * 3, [0.25] * 3)
    assert teacher.info["tensors"] == len(state) and teacher.dim == 64
    np.testing.assert_array_equal(teacher.features(x), want)
    exported = barlow_twins.export_torch_backbone(teacher,
                                                  str(tmp_path / f"out_{name[2:]}.safetensors"))
    again = torch_layout.read_state_dict(exported)
    assert set(again) == set(state) and all(np.array_equal(again[k], state[k]) for k in state)


def test_wrappers_and_heads_are_stripped_and_the_architecture_inferred():
  state = torch_layout.from_variables(_random_backbone())
  wrapped = {f"module.backbone.{k}": v for k, v in state.items()}
  wrapped.update({"module.backbone.fc.weight": np.zeros((10, 64)), "projector.0.weight":
                  np.zeros((4, 64)), "module.backbone.bn1.num_batches_tracked": np.zeros(())})
  backbone, dropped = torch_layout.backbone_state(wrapped)
  assert set(backbone) == set(state) and len(dropped) == 3
  assert torch_layout.infer_arch(backbone) == ARCH
  arch = dict(name="tv_resnet50", width=4, stem="imagenet")
  shapes = jax.eval_shape(lambda: init_model(build_model(arch), jax.random.key(0), (32, 32, 3)))
  deep = torch_layout.from_variables(jax.tree.map(lambda v: np.zeros(v.shape, v.dtype), shapes))
  assert torch_layout.infer_arch(deep) == dict(name="tv_resnet50", width=4, stem="imagenet")


def test_a_mismatch_names_the_first_offending_key_and_its_shapes(tmp_path):
  state = torch_layout.from_variables(_random_backbone())
  bad = dict(state)
  bad["layer1.0.conv2.weight"] = np.zeros((8, 8, 5, 5), np.float32)
  with pytest.raises(DistillError, match=re.escape("'layer1.0.conv2.weight' has shape "
                                                   "(8, 8, 5, 5); tv_resnet18 needs (8, 8, 3, 3)")):
    torch_layout.to_variables(bad, ARCH, (16, 16, 3))
  lacking = {k: v for k, v in state.items() if k != "layer3.1.bn2.running_mean"}
  with pytest.raises(DistillError, match="lacks 'layer3.1.bn2.running_mean'"):
    torch_layout.to_variables(lacking, ARCH, (16, 16, 3))
  with pytest.raises(DistillError, match="conv1 takes 3 channels; the source has 1"):
    np.savez(tmp_path / "w.npz", **state)
    barlow_twins.import_torch_backbone(str(tmp_path / "w.npz"), str(tmp_path / "t"),
                                       (16, 16, 1), [0.5], [0.25])
  with pytest.raises(DistillError, match="does not exist"):
    torch_layout.read_state_dict(str(tmp_path / "none.safetensors"))


def test_only_torchvision_layout_teachers_export(tmp_path):
  model = build_model(dict(name="resnet18", width=8))
  teacher = barlow_twins.Teacher(model, {}, np.zeros(3), np.ones(3), (16, 16, 3), 64, {})
  with pytest.raises(DistillError, match="only torchvision-layout teachers"):
    barlow_twins.export_torch_backbone(teacher, str(tmp_path / "x.safetensors"))


@pytest.mark.parametrize("layers, bottleneck, cifar, size", [
    ((2, 2, 2, 2), False, True, 16), ((3, 4, 6, 3), False, False, 32),
    ((3, 4, 6, 3), True, False, 32)])
def test_imported_features_equal_torch(tmp_path, layers, bottleneck, cifar, size):
  torch = pytest.importorskip("torch")
  from tests import torch_resnet
  torch.manual_seed(0)
  block = torch_resnet.Bottleneck if bottleneck else torch_resnet.BasicBlock
  net = torch_resnet.randomized(torch_resnet.ResNet(block, list(layers), width=8, cifar=cifar))
  # A Lightning-style checkpoint: wrapped state dict, prefixed keys, a head.
  torch.save({"state_dict": {f"backbone.{k}": v for k, v in net.state_dict().items()}},
             tmp_path / "ssl.ckpt")
  teacher = barlow_twins.import_torch_backbone(str(tmp_path / "ssl.ckpt"), str(tmp_path / "t"),
                                               (size, size, 3), [0.5] * 3, [0.25] * 3)
  x = np.random.default_rng(0).normal(size=(4, 3, size, size)).astype(np.float32)
  with torch.no_grad():
    want = net.features(torch.from_numpy(x)).numpy()
  np.testing.assert_allclose(teacher.features(x.transpose(0, 2, 3, 1)), want, atol=2e-5,
                             rtol=1e-4)


def test_import_and_export_commands_and_a_stage_on_the_imported_teacher(blobs_npz, tmp_path,
                                                                         capsys):
  state = torch_layout.from_variables(_random_backbone())
  torch_layout.save_safetensors(str(tmp_path / "tv.safetensors"), state)
  workdir = tmp_path / "run"
  checkpoint = ("--set", f"teacher.checkpoint={tmp_path / 'tv.safetensors'}")
  assert main(smoke_args("krr-st", workdir, blobs_npz, *checkpoint)) == 0  # imports on demand
  card = json.loads((workdir / "teacher" / "teacher.json").read_text())
  assert card["arch"] == ARCH and card["info"]["tensors"] == len(state)
  assert 0.0 <= card["info"]["probe"]["accuracy"] <= 1.0
  assert (workdir / "synthetic.npz").exists()
  assert main(smoke_args("export-teacher", workdir, blobs_npz, *checkpoint)) == 0
  out = torch_layout.read_state_dict(str(workdir / "teacher" /
                                         "backbone_torchvision.safetensors"))
  assert set(out) == set(state) and all(np.array_equal(out[k], state[k]) for k in state)
  assert main(smoke_args("import-teacher", tmp_path / "other", blobs_npz)) == 2
  assert "teacher.checkpoint=PATH" in capsys.readouterr().err


def test_readme_pytorch_example_pretrains_on_a_synthetic_set(smoke_run, monkeypatch):
  pytest.importorskip("torch")
  readme = open(f"{ROOT}/README.md").read()
  code = re.search(r"```python\n(# Pretrain a PyTorch network on a synthetic set.*?)```", readme,
                   re.S).group(1)
  monkeypatch.chdir(smoke_run.parent)
  code = code.replace("runs/quickstart/synthetic.npz", str(smoke_run / "synthetic.npz"))
  namespace = {}
  exec(compile(code, "README.md", "exec"), namespace)  # pylint: disable=exec-used
  assert namespace["losses"][-1] < namespace["losses"][0]


def test_a_saved_teacher_folder_is_used_as_the_teacher_of_another_workdir(smoke_run, blobs_npz,
                                                                          tmp_path, capsys):
  saved = smoke_run / "teacher"
  workdir = tmp_path / "reuse"
  checkpoint = ("--set", f"teacher.checkpoint={saved}")
  assert main(smoke_args("import-teacher", workdir, blobs_npz, *checkpoint)) == 0
  copied = barlow_twins.load_teacher(str(workdir / "teacher"))
  original = barlow_twins.load_teacher(str(saved))
  x = np.asarray(jax.random.normal(jax.random.key(0), (4, *original.image_shape)))
  np.testing.assert_array_equal(copied.features(x), original.features(x))
  card = json.loads((workdir / "teacher" / "teacher.json").read_text())
  assert card["info"]["imported_from"] == str(saved) and len(card["info"]["sha256"]) == 64
  assert "steps" in card["info"]  # its own training record is kept
  # A teacher of another image shape is refused by name, and nothing is written.
  other = tmp_path / "other"
  assert main(smoke_args("import-teacher", other, blobs_npz, *checkpoint,
                         "--set", "data.source=fashion-mnist-missing")) == 2
  assert not (other / "teacher" / "teacher.json").exists()


def test_a_snapshot_of_a_teacher_run_is_its_latest_checkpoint_as_a_teacher_folder(
    smoke_run, blobs_npz, tmp_path):
  from distill.config import load_config
  from distill.stages.teacher import snapshot_teacher
  from tests.conftest import SMOKE
  config = load_config(SMOKE, [f"data.source={blobs_npz}", f"data.target={blobs_npz}"])
  finished = barlow_twins.load_teacher(str(smoke_run / "teacher"))
  snapshot = snapshot_teacher(config, str(smoke_run), str(tmp_path / "snap"))
  # The last checkpoint of a finished run is the teacher it saved.
  x = np.asarray(jax.random.normal(jax.random.key(1), (4, *finished.image_shape)))
  np.testing.assert_array_equal(snapshot.features(x), finished.features(x))
  assert snapshot.info["snapshot_step"] == snapshot.info["num_steps"] == finished.info["steps"]
  with pytest.raises(DistillError, match="no teacher checkpoint in"):
    snapshot_teacher(config, str(tmp_path / "never_trained"), str(tmp_path / "snap2"))
  assert not (tmp_path / "snap2").exists() and not (tmp_path / "never_trained").exists()
