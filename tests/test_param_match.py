"""Parameter matching: expert buffer, matching loss, meta-gradient, stages."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill.cli import main
from distill.config import base_config, load_config
from distill.data import synthetic_set
from distill.errors import DistillError
from distill.methods import experts, param_match as pm
from distill.nn.models import ConvNet
from distill.stages.param_match import run_experts, run_param_match
from tests.conftest import make_blobs

ROOT = os.path.join(os.path.dirname(__file__), "..")
CONFIG = os.path.join(ROOT, "experiments", "configs", "cifar10_param_match.py")


def _smoke(data, *overrides):
  return load_config(CONFIG + ":smoke", [f"data.source={data}", f"data.target={data}",
                                         *overrides])


def _trajectories(seed=0):
  """(start, target, student) params pytrees of three tensors, as numpy float32."""
  r = np.random.default_rng(seed)
  shapes = {"a": {"kernel": (3, 2), "bias": (2,)}, "b": {"kernel": (4,)}}
  draw = lambda: {k: {n: r.normal(size=s).astype(np.float32) for n, s in v.items()}
                  for k, v in shapes.items()}
  return draw(), draw(), draw()


def _by_hand(student, start, target, weights=None):
  leaves = lambda t: [np.asarray(x, np.float64) for x in jax.tree.leaves(t)]
  ws = leaves(weights) if weights is not None else [1.0] * 3
  num = sum(np.sum((w * (s - t)) ** 2) for s, t, w in zip(leaves(student), leaves(target), ws))
  den = sum(np.sum((w * (s - t)) ** 2) for s, t, w in zip(leaves(start), leaves(target), ws))
  return num / den


@pytest.mark.parametrize("granularity", ["parameter", "tensor"])
def test_unit_weights_give_the_mtt_loss_computed_by_hand(granularity):
  start, target, student = _trajectories()
  weights = pm.importance_weights(pm.init_raw_weights(start, granularity), start)
  for w in jax.tree.leaves(weights):
    np.testing.assert_allclose(w, 1.0, rtol=1e-6)
  expected = _by_hand(student, start, target)
  np.testing.assert_allclose(pm.matching_loss(student, start, target, weights), expected,
                             rtol=1e-6)
  # Any other weights: the same formula with W inside both norms.
  raw = jax.tree.map(lambda w: jnp.asarray(np.random.default_rng(1).normal(size=w.shape),
                                           jnp.float32), pm.init_raw_weights(start, granularity))
  weights = pm.importance_weights(raw, start)
  full = jax.tree.map(lambda w, p: np.broadcast_to(w, p.shape), weights, start)
  np.testing.assert_allclose(pm.matching_loss(student, start, target, weights),
                             _by_hand(student, start, target, full), rtol=1e-5)


@pytest.mark.parametrize("granularity", ["parameter", "tensor"])
def test_weights_are_mean_normalised_so_scaling_changes_nothing(granularity):
  start, target, student = _trajectories(2)
  r = np.random.default_rng(3)
  raw = jax.tree.map(lambda w: jnp.asarray(r.normal(size=w.shape), jnp.float32),
                     pm.init_raw_weights(start, granularity))
  # softplus^-1(c * softplus(raw)): every unnormalised weight times c.
  scaled = jax.tree.map(lambda x: jnp.log(jnp.expm1(3.7 * jax.nn.softplus(x))), raw)
  w1, w2 = pm.importance_weights(raw, start), pm.importance_weights(scaled, start)
  for a, b in zip(jax.tree.leaves(w1), jax.tree.leaves(w2)):
    np.testing.assert_allclose(a, b, rtol=1e-5)
  np.testing.assert_allclose(pm.matching_loss(student, start, target, w1),
                             pm.matching_loss(student, start, target, w2), rtol=1e-5)
  # Mean 1 over parameters (a per-tensor weight counts once per parameter).
  full = jax.tree.map(lambda w, p: np.broadcast_to(w, p.shape), w1, start)
  np.testing.assert_allclose(np.concatenate([np.ravel(w) for w in jax.tree.leaves(full)]).mean(),
                             1.0, rtol=1e-6)


def test_prune_mask_drops_the_lowest_weights():
  start, _, _ = _trajectories()
  weights = jax.tree.map(lambda p: jnp.arange(p.size, dtype=jnp.float32).reshape(p.shape) + 1,
                         start)
  mask = pm.prune_mask(weights, start, 0.5)
  kept = sum(float(jnp.sum(m)) for m in jax.tree.leaves(mask))
  assert kept == 12 - 6
  for w, m in zip(jax.tree.leaves(weights), jax.tree.leaves(mask)):
    assert np.all(np.asarray(w)[np.asarray(m) == 0] <= 3)  # the three smallest of each value
  tensor_w = {"a": {"kernel": 2.0, "bias": 0.5}, "b": {"kernel": 1.0}}
  tensor_w = jax.tree.map(jnp.float32, tensor_w)
  mask = pm.prune_mask(tensor_w, start, 0.5)  # bias (2) + b (4) = 6 <= 6 of 12 parameters
  assert jax.tree.map(float, mask) == {"a": {"kernel": 1.0, "bias": 0.0}, "b": {"kernel": 0.0}}


def _tiny_method(objective="mse", size=4, channels=1, n=3, outputs=2, **cfg_updates):
  cfg = base_config().param_match
  with cfg.unlocked():
    cfg.update(dict(syn_steps=3, syn_batch=2, augment=False, alpha_init=0.1))
    cfg.update(cfg_updates)
  model = ConvNet(width=2, depth=1, num_outputs=outputs)
  method = pm.ParamMatch(cfg, model, objective)
  r = np.random.default_rng(0)
  images = r.normal(size=(n, size, size, channels)).astype(np.float32)
  targets = (r.normal(size=(n, outputs)) if objective == "mse" else
             pm.initial_soft_labels(np.arange(n) % outputs, outputs)).astype(np.float32)
  state = method.init(jax.random.key(0), images, targets)
  # Random parameters drawn with numpy: a jitted flax init costs seconds of compile.
  shapes = jax.eval_shape(model.init, jax.random.key(0), images[:1])["params"]
  start = jax.tree.map(lambda p: jnp.asarray(r.normal(size=p.shape) * 0.5, p.dtype), shapes)
  target = jax.tree.map(lambda p: p + 0.05 * jnp.asarray(r.normal(size=p.shape), p.dtype),
                        start)
  return method, state, start, target


@pytest.fixture(scope="module")
def tiny_gradients():
  """A tiny float64 problem's loss and gradients with and without remat, with
  the unroll compiled as a loop ("loop"; on the CPU the default is straight-line
  code), and central differences of the loss along random directions (one set
  of compilations shared by three tests)."""
  out, eps = {}, 1e-6
  with jax.enable_x64(True):
    for remat in (False, True, "loop"):
      method, state, start, target = (_tiny_method(unroll=1) if remat == "loop" else
                                      _tiny_method(remat=remat))
      to64 = lambda t: jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), t)
      learned, start, target = to64(state["learned"]), to64(start), to64(target)
      r = np.random.default_rng(5)
      learned["raw_weights"] = jax.tree.map(lambda w: w + r.normal(size=w.shape) * 0.3,
                                            learned["raw_weights"])
      value_and_grad = jax.jit(jax.value_and_grad(
          lambda l: method.loss(l, start, target, jax.random.key(3))[0]))
      out[remat] = jax.device_get(value_and_grad(learned))
      if remat is not False:
        continue
      out["checks"] = []
      for key in ("images", "targets", "raw_weights", "log_alpha"):
        direction = jax.tree.map(lambda x: r.normal(size=np.shape(x)), learned[key])
        shifted = lambda s: {**learned, key: jax.tree.map(lambda x, d: x + s * d,
                                                          learned[key], direction)}
        numeric = (value_and_grad(shifted(eps))[0]
                   - value_and_grad(shifted(-eps))[0]) / (2 * eps)
        analytic = sum(np.vdot(g, d) for g, d in zip(jax.tree.leaves(out[False][1][key]),
                                                     jax.tree.leaves(direction)))
        out["checks"].append((key, float(analytic), float(numeric)))
  return out


def test_meta_gradient_matches_finite_differences(tiny_gradients):
  """d loss / d (images, targets, W, log alpha) through the minibatched unroll, float64."""
  for key, analytic, numeric in tiny_gradients["checks"]:
    assert abs(analytic) > 1e-8, key
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-10, err_msg=key)


def test_remat_gives_the_same_loss_and_gradients(tiny_gradients):
  (loss_a, grads_a), (loss_b, grads_b) = tiny_gradients[False], tiny_gradients[True]
  np.testing.assert_allclose(loss_a, loss_b, rtol=1e-12)
  for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)


def test_unroll_as_a_loop_or_straight_line_code_gives_the_same_result(tiny_gradients):
  (loss_a, grads_a), (loss_b, grads_b) = tiny_gradients[False], tiny_gradients["loop"]
  np.testing.assert_allclose(loss_a, loss_b, rtol=1e-12)
  for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)
  cfg = base_config().param_match
  with cfg.unlocked():
    cfg.syn_steps = 7
  assert pm.scan_unroll(cfg, "cpu") == 7 and pm.scan_unroll(cfg, "gpu") == 1
  with cfg.unlocked():
    cfg.unroll = 2
  assert pm.scan_unroll(cfg, "cpu") == 2 == pm.scan_unroll(cfg, "gpu")


def test_teacher_targets_are_the_teachers_view_and_carry_its_gradient():
  """With teacher_targets the student regresses T(X_s): the loss equals the
  stored-target loss with targets T(X_s), and d loss / d X_s (float64, central
  differences) includes the path through the teacher."""
  teacher = ConvNet(width=2, depth=1, num_outputs=2)
  with jax.enable_x64(True):
    method, state, start, target = _tiny_method()
    r = np.random.default_rng(7)
    shapes = jax.eval_shape(teacher.init, jax.random.key(0), state["learned"]["images"][:1])
    t_vars = jax.tree.map(lambda p: jnp.asarray(r.normal(size=p.shape), jnp.float64), shapes)
    teacher_fn = lambda x: teacher.apply(t_vars, x)[1]
    cfg = method.cfg.copy_and_resolve_references()
    with cfg.unlocked():
      cfg.update(dict(teacher_targets=True, lr_targets=0.0))
    with_teacher = pm.ParamMatch(cfg, method.model, "mse", teacher_fn)
    to64 = lambda t: jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), t)
    learned, start, target = to64(state["learned"]), to64(start), to64(target)
    key = jax.random.key(3)
    loss = jax.jit(lambda l: with_teacher.loss(l, start, target, key)[0])
    stored = {**learned, "targets": teacher_fn(learned["images"])}
    np.testing.assert_allclose(with_teacher.export_targets(learned), stored["targets"],
                               rtol=1e-12)
    np.testing.assert_allclose(loss(learned), method.loss(stored, start, target, key)[0],
                               rtol=1e-10)
    grad = jax.grad(loss)(learned)["images"]
    direction = r.normal(size=learned["images"].shape)
    eps = 1e-6
    shifted = lambda e: {**learned, "images": learned["images"] + e * direction}
    numeric = (loss(shifted(eps)) - loss(shifted(-eps))) / (2 * eps)
    np.testing.assert_allclose(np.vdot(grad, direction), numeric, rtol=1e-6, atol=1e-10)
    # Holding the targets at T(X_s) drops the teacher's path: another gradient.
    held = jax.grad(lambda x: method.loss({**stored, "images": x}, start, target, key)[0])(
        learned["images"])
    assert np.linalg.norm(grad - held) > 1e-3 * np.linalg.norm(grad)
  # Settings that cannot hold: learned targets, "ce" experts, no teacher.
  learned_targets = cfg.copy_and_resolve_references()
  with learned_targets.unlocked():
    learned_targets.lr_targets = 1e-2
  with pytest.raises(DistillError, match="teacher_targets=True computes the targets"):
    pm.ParamMatch(learned_targets, method.model, "mse", teacher_fn)
  with pytest.raises(DistillError, match=r"needs 'mse' experts .*\(the experts are 'ce'\)"):
    pm.ParamMatch(cfg, method.model, "ce", teacher_fn)
  with pytest.raises(DistillError, match="needs 'mse' experts and the teacher"):
    pm.ParamMatch(cfg, method.model, "mse")


def test_alpha_stays_positive_under_a_huge_learning_rate():
  # A student with a far too large step overshoots, so the gradient pushes
  # log(alpha) down; Adam with lr 1e4 moves it by ~1e4 per step.
  method, state, start, target = _tiny_method(method="mtt", alpha_init=5.0, lr_alpha=1e4,
                                              lr_images=0.0, lr_targets=0.0)
  alphas = []
  for t in range(3):
    state, metrics = method.step(state, (start, target), jax.random.key(t))
    alphas.append(float(metrics["alpha"]))
    assert np.isfinite(float(metrics["loss"]))
    # "mtt": the weights never move from 1.
    assert float(metrics["w_min"]) == float(metrics["w_max"]) == 1.0
  assert all(0.0 < a < 5.0 for a in alphas), alphas
  assert alphas[-1] <= 1e-11


def test_trajectory_file_round_trip_and_float16(tmp_path):
  traj = {"Conv_0": {"kernel": np.random.default_rng(0).normal(size=(4, 3, 3, 1, 2)),
                     "bias": np.linspace(-1, 1, 8).reshape(4, 2)}}
  traj = jax.tree.map(lambda x: x.astype(np.float32), traj)
  for dtype, tol in (("float32", 0.0), ("float16", 1e-3)):
    path = experts.save_trajectory(str(tmp_path / f"expert_{dtype}.npz"), traj,
                                   {"epochs": 3, "note": dtype}, dtype)
    loaded, meta = experts.load_trajectory(path)
    assert meta == {"epochs": 3, "note": dtype}
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(traj)):
      assert a.dtype == np.dtype(dtype) and a.shape == b.shape
      np.testing.assert_allclose(a, b, rtol=tol, atol=tol)
  assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]  # atomic: no leftovers
  buffer = experts.ExpertBuffer([loaded], meta)
  assert buffer.checkpoint(0, 2)["Conv_0"]["kernel"].dtype == np.float32
  with pytest.raises(DistillError, match="unreadable"):
    (tmp_path / "expert_99.npz").write_bytes(b"PK not really")
    experts.load_trajectory(str(tmp_path / "expert_99.npz"))


@pytest.fixture(scope="module")
def expert_run(blobs_npz, tmp_path_factory):
  """Two tiny "ce" experts trained without interruption."""
  workdir = tmp_path_factory.mktemp("experts")
  buffer = run_experts(_smoke(blobs_npz), str(workdir))
  return workdir, buffer


def test_expert_buffer_has_every_epoch(expert_run):
  workdir, buffer = expert_run
  assert len(buffer.trajectories) == 2 and buffer.epochs == 3
  assert buffer.meta["objective"] == "ce" and buffer.meta["num_outputs"] == 3
  kernel = buffer.trajectories[0]["Conv_0"]["kernel"]
  assert kernel.shape == (4, 3, 3, 3, 4)  # (epochs + 1, 3x3 conv, 3 -> 4 channels)
  steps = np.linalg.norm((kernel[1:] - kernel[:-1]).reshape(3, -1), axis=1)
  assert np.all(steps > 0)  # each epoch's snapshot differs from the one before
  assert not (workdir / "experts_ce" / "expert_00" / "ckpt").exists()
  e, t, a, b = experts.sample_checkpoints(buffer, 0, 7, max_start=2, expert_epochs=1)
  assert t < 2
  np.testing.assert_array_equal(b["Conv_0"]["kernel"], buffer.trajectories[e]["Conv_0"][
      "kernel"][t + 1])


def test_infobatch_experts_keep_every_epoch_and_report_pruning(blobs_npz, tmp_path):
  buffer = run_experts(_smoke(blobs_npz, "experts.infobatch.prune_ratio=0.5",
                                      "experts.infobatch.delta=0.7"), str(tmp_path))
  report = json.loads(str(np.load(tmp_path / "experts_ce" / "expert_00.npz")["meta"]))[
      "infobatch"]
  # Epoch 0 has no scores yet, epoch 1 prunes, epoch 2 (>= 0.7 * 3) anneals.
  assert report["pruned_per_epoch"][0] == 0 < report["pruned_per_epoch"][1]
  assert report["pruned_per_epoch"][2] == 0 and 0 < report["skipped_fraction"] < 0.5
  kernel = buffer.trajectories[0]["Conv_0"]["kernel"]
  steps = np.linalg.norm((kernel[1:] - kernel[:-1]).reshape(3, -1), axis=1)
  assert np.all(steps > 0)  # a snapshot at the end of every (shorter) epoch


def test_killed_expert_training_resumes_exactly(expert_run, blobs_npz, tmp_path, monkeypatch):
  workdir, buffer = expert_run
  real_loop = experts.run_loop

  def killed_after_four_steps(**kwargs):
    real_loop(**{**kwargs, "num_steps": 4})
    raise KeyboardInterrupt

  monkeypatch.setattr(experts, "run_loop", killed_after_four_steps)
  with pytest.raises(KeyboardInterrupt):
    run_experts(_smoke(blobs_npz), str(tmp_path))
  assert not (tmp_path / "experts_ce" / "expert_00.npz").exists()
  monkeypatch.setattr(experts, "run_loop", real_loop)
  resumed = run_experts(_smoke(blobs_npz), str(tmp_path))
  for a, b in zip(jax.tree.leaves(resumed.trajectories), jax.tree.leaves(buffer.trajectories)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  # A finished expert is skipped on a rerun.
  before = (tmp_path / "experts_ce" / "expert_01.npz").stat().st_mtime_ns
  run_experts(_smoke(blobs_npz), str(tmp_path))
  assert (tmp_path / "experts_ce" / "expert_01.npz").stat().st_mtime_ns == before


def test_toy_run_lowers_the_matching_loss(expert_run):
  _, buffer = expert_run
  # The smoke settings (so the stage test below reuses this executable).
  cfg = load_config(CONFIG + ":smoke", ["param_match.alpha_init=0.05"]).param_match
  model = experts.expert_model(buffer.meta["arch"], 3)
  method = pm.ParamMatch(cfg, model, "ce")
  x, y = make_blobs(6, size=16, seed=3)
  x = (x / 255.0 - np.asarray(buffer.meta["mean"])) / np.asarray(buffer.meta["std"])
  state = method.init(jax.random.key(0), x, pm.initial_soft_labels(y, 3))
  loss = jax.jit(lambda l, s, t: method.loss(l, s, t, jax.random.key(0))[0])
  pairs = [(buffer.checkpoint(e, t), buffer.checkpoint(e, t + 1)) for e in range(2)
           for t in range(2)]
  held_out = lambda learned: np.mean([loss(learned, s, t) for s, t in pairs])
  before = held_out(state["learned"])
  for step in range(30):
    batch = experts.sample_checkpoints(buffer, 0, step, 2, 1)[2:]
    state, metrics = method.step(state, batch, jax.random.key(step))
    if step == 0:
      compiled = pm.ParamMatch.step._cache_size()
  after = held_out(state["learned"])
  assert pm.ParamMatch.step._cache_size() == compiled  # no recompilation after the first step
  assert float(metrics["w_std"]) > 0 and float(metrics["w_min"]) > 0
  assert after < 0.8 * before, (before, after)


def test_a_set_matched_on_one_expert_also_lowers_the_loss_on_an_unseen_one(expert_run):
  _, buffer = expert_run
  cfg = load_config(CONFIG + ":smoke", ["param_match.alpha_init=0.05"]).param_match
  method = pm.ParamMatch(cfg, experts.expert_model(buffer.meta["arch"], 3), "ce")
  x, y = make_blobs(6, size=16, seed=3)
  x = (x / 255.0 - np.asarray(buffer.meta["mean"])) / np.asarray(buffer.meta["std"])
  state = method.init(jax.random.key(0), x, pm.initial_soft_labels(y, 3))
  initial = jax.device_get(state["learned"])
  matched = buffer._replace(trajectories=buffer.trajectories[:1])
  for step in range(30):
    state, _ = method.step(state, experts.sample_checkpoints(matched, 0, step, 2, 1)[2:],
                           jax.random.key(step))
  before = method.held_out_loss(initial, buffer, [1], seed=0)
  after = method.held_out_loss(jax.device_get(state["learned"]), buffer, [1], seed=0)
  assert before["pairs"] == after["pairs"] == cfg.max_start
  # W = 1 at initialisation: the method's loss is the plain one.
  assert before["loss"] == pytest.approx(before["loss_plain"], rel=1e-6)
  assert after["loss_plain"] < 0.9 * before["loss_plain"], (before, after)


def test_param_match_stage_writes_the_synthetic_set(expert_run, blobs_npz, tmp_path):
  workdir, _ = expert_run
  os.symlink(workdir / "experts_ce", tmp_path / "experts_ce")
  assert main(["param-match", "--config", CONFIG + ":smoke", "--workdir", str(tmp_path),
               "--set", f"data.source={blobs_npz}", "--set", f"data.target={blobs_npz}"]) == 0
  s = synthetic_set.load_synthetic(str(tmp_path / "synthetic_iadd_ce.npz"))
  assert s.images.shape == (6, 16, 16, 3) and s.targets.shape == (6, 3)
  np.testing.assert_allclose(s.targets.sum(1), 1.0, rtol=1e-5)
  assert np.bincount(s.labels).tolist() == [2, 2, 2] and s.method == "iadd_ce"  # balanced
  assert s.step == 4 and s.extra["alpha"] > 0 and s.teacher == "source_labels"
  # alpha_init = 0 starts the student at the experts' lr (0.05); 4 Adam steps
  # of 0.03 on log(alpha) cannot move it by more than ~0.12 from there.
  assert s.config["param_match"]["alpha_init"] == 0
  assert s.extra["expert_seconds"] > 0   # the buffer's training time is part of the cost
  assert abs(np.log(s.extra["alpha"]) - np.log(0.05)) < 0.2, s.extra["alpha"]
  # The last of the two experts is held out: never matched, it measures the set.
  held_out = s.extra["held_out"]
  assert held_out["experts"] == [1] and held_out["learned"]["pairs"] == 2
  assert all(np.isfinite(held_out[w][k]) for w in ("learned", "initial")
             for k in ("loss", "loss_plain"))
  assert s.extra["image_shift"]["rms"] > 0 and s.extra["image_shift"]["relative"] > 0
  summary = s.extra["weights"]["Conv_0/kernel"]
  assert summary["min"] <= summary["mean"] <= summary["max"] and summary["size"] == 108
  for picture in ("synthetic_iadd_ce_grid.png", "param_match_iadd_ce_weights.png",
                  "param_match_iadd_ce/loss.png"):
    assert (tmp_path / picture).stat().st_size > 0
  metrics = [json.loads(line) for line in (tmp_path / "param_match_iadd_ce" / "metrics.jsonl").open()]
  assert [m["step"] for m in metrics] == [2, 4] and all(m["alpha"] > 0 for m in metrics)
  # Rerun without the export: the state comes back from the last checkpoint unchanged.
  os.remove(tmp_path / "synthetic_iadd_ce.npz")
  assert main(["param-match", "--config", CONFIG + ":smoke", "--workdir", str(tmp_path),
               "--set", f"data.source={blobs_npz}", "--set", f"data.target={blobs_npz}"]) == 0
  again = synthetic_set.load_synthetic(str(tmp_path / "synthetic_iadd_ce.npz"))
  np.testing.assert_array_equal(again.images, s.images)
  assert again.extra["alpha"] == s.extra["alpha"]


def test_table_row_reuses_a_set_without_its_expert_buffer(blobs_npz, tmp_path, monkeypatch):
  """A set made before is the row's set: its experts are not retrained to find it."""
  from distill.stages import sets
  calls = []
  monkeypatch.setattr(sets, "run_experts", lambda cfg, workdir: calls.append(workdir))
  monkeypatch.setattr(sets, "run_param_match", lambda cfg, workdir: "the set")
  cfg = _smoke(blobs_npz)
  n = cfg.param_match.num_synthetic
  assert sets.param_match_set("mtt", cfg, str(tmp_path), n, 0, None, None) == "the set"
  assert calls == [str(tmp_path)]  # no set yet: the buffer comes first
  made = synthetic_set.SyntheticSet(
      images=np.zeros((n, 16, 16, 3), np.float32), targets=np.zeros((n, 4), np.float32),
      labels=None, method="mtt", source="blobs", teacher="t", image_mean=np.zeros(3, np.float32),
      image_std=np.ones(3, np.float32), config={}, step=1)
  synthetic_set.save_synthetic(str(tmp_path / "synthetic_mtt.npz"), made)
  assert sets.param_match_set("mtt", cfg, str(tmp_path), n, 0, None, None) == "the set"
  assert calls == [str(tmp_path)]  # the set exists: no experts trained again


def test_bad_settings_raise_clear_errors(expert_run, blobs_npz, tmp_path, capsys):
  cfg = base_config().param_match
  with pytest.raises(DistillError, match="needs a positive param_match.alpha_init"):
    pm.ParamMatch(cfg, experts.expert_model(expert_run[1].meta["arch"], 3), "ce")
  # Teacher-space targets belong to the un-augmented images: no crop + flip.
  with cfg.unlocked():
    cfg.update(dict(augment=True, alpha_init=0.1))
  with pytest.raises(DistillError, match="augment=True with 'mse' experts"):
    pm.ParamMatch(cfg, experts.expert_model(expert_run[1].meta["arch"], 3), "mse")
  pm.ParamMatch(cfg, experts.expert_model(expert_run[1].meta["arch"], 3), "ce")  # labels may
  with cfg.unlocked():
    cfg.update(dict(augment=False, alpha_init=0.0))
  for key, value, message in (("method", "dc", "unknown param_match.method 'dc'"),
                              ("alpha_init", -1.0, "alpha_init=-1.0 must be positive"),
                              ("granularity", "layer", "unknown param_match.granularity"),
                              ("prune_fraction", 1.0, "prune_fraction=1.0 must be in"),
                              ("init", "kmeans", "unknown param_match.init 'kmeans'"),
                              ("syn_steps", 0, "syn_steps=0 must be at least 1"),
                              ("unroll", -1, "unroll=-1 must be >= 0")):
    bad = base_config().param_match
    with bad.unlocked():
      bad[key] = value
    with pytest.raises(DistillError, match=message):
      pm.check_config(bad)
  with cfg.unlocked():
    cfg.update(dict(method="mtt", prune_fraction=0.2))
  with pytest.raises(DistillError, match="with method 'mtt' every W is 1"):
    pm.check_config(cfg)
  _, buffer = expert_run
  with cfg.unlocked():
    cfg.update(dict(method="iadd", prune_fraction=0.0, max_start=3, expert_epochs=1))
  pm.check_config(cfg, buffer.epochs)  # t <= 2, t + M <= 3: fine
  with cfg.unlocked():
    cfg.max_start = buffer.epochs + 1
  with pytest.raises(DistillError, match="past the buffer's last epoch 3; use max_start <= 3"):
    pm.check_config(cfg, buffer.epochs)
  with pytest.raises(DistillError, match="needs more than the buffer's 3 epochs"):
    experts.sample_checkpoints(buffer, 0, 0, max_start=3, expert_epochs=2)
  # "ce" experts need labels.
  unlabelled = tmp_path / "unlabelled.npz"
  np.savez(unlabelled, images=make_blobs(40)[0])
  with pytest.raises(DistillError, match="needs labels, but the source .* has none"):
    run_experts(_smoke(str(unlabelled)), str(tmp_path / "run"))
  os.makedirs(tmp_path / "match")
  os.symlink(expert_run[0] / "experts_ce", tmp_path / "match" / "experts_ce")
  with pytest.raises(DistillError, match="trained with 'ce' but the source .* has no labels"):
    run_param_match(_smoke(str(unlabelled)), str(tmp_path / "match"))
  # The high-loss start ranks images against teacher representations: not for "ce" experts.
  with pytest.raises(DistillError, match="'ce' experts start from a class-balanced subset"):
    run_param_match(_smoke(blobs_npz, "param_match.init=high_loss"), str(tmp_path / "match"))
  assert not os.path.exists(tmp_path / "match" / "synthetic_iadd_ce.npz")
  # Through the command line: one `error:` line and exit status 2.
  assert main(["param-match", "--config", CONFIG + ":smoke", "--workdir", str(tmp_path / "cli"),
               "--set", "param_match.method=dc"]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: unknown param_match.method 'dc'") and "\n" not in err
  assert main(["param-match", "--config", CONFIG + ":smoke", "--workdir", str(tmp_path / "cli2"),
               "--set", f"data.source={blobs_npz}"]) == 2
  assert "no expert trajectories" in capsys.readouterr().err
