"""The config system and the shared training loop (checkpoint, resume)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from distill import pipeline
from distill.config import apply_overrides, base_config, load_config
from distill.errors import DistillError
from distill.loop import Checkpointer, batch_indices, run_loop

QUICKSTART = os.path.join(os.path.dirname(__file__), "..", "experiments", "configs",
                          "fashion_mnist_quickstart.py")


def test_overrides_parse_types_and_reject_unknown_keys():
  c = base_config()
  apply_overrides(c, ["distill.steps=7", "distill.reg=1e-2", "data.source=my/data.npz",
                      "eval.seeds=(3, 4)", "distill.lr_images=1"])
  assert c.distill.steps == 7 and c.distill.reg == 1e-2
  assert c.data.source == "my/data.npz" and c.eval.seeds == (3, 4)
  assert c.distill.lr_images == 1.0 and isinstance(c.distill.lr_images, float)
  with pytest.raises(DistillError, match="unknown config key 'distill.stepz'"):
    apply_overrides(c, ["distill.stepz=3"])
  with pytest.raises(DistillError, match="unknown config key 'distil'"):
    apply_overrides(c, ["distil.steps=3"])
  with pytest.raises(DistillError, match="expects int"):
    apply_overrides(c, ["distill.steps=many"])
  with pytest.raises(DistillError, match="key=value"):
    apply_overrides(c, ["distill.steps"])


def test_config_files_and_variants_load():
  c = load_config(QUICKSTART + ":smoke")
  assert c.distill.steps < load_config(QUICKSTART).distill.steps
  with pytest.raises(DistillError, match="does not exist"):
    load_config("no/such/config.py")


def test_misspelt_key_inside_a_config_file_is_an_error(tmp_path):
  path = tmp_path / "typo.py"
  path.write_text("from distill.config import base_config\n"
                  "def get_config():\n  c = base_config()\n  c.distill.num_synthetc = 5\n"
                  "  return c\n")
  with pytest.raises(DistillError, match="num_synthetc"):
    load_config(str(path))


def test_batch_indices_are_epoch_permutations_and_pure():
  seen = np.concatenate([batch_indices(0, s, 10, 3) for s in range(3)])
  assert len(set(seen.tolist())) == 9  # one epoch: no repeats, ragged batch dropped
  np.testing.assert_array_equal(batch_indices(0, 4, 10, 3), batch_indices(0, 4, 10, 3))
  assert len(batch_indices(0, 0, 5, 8)) == 5


def _quadratic_job(workdir, num_steps, name="job"):
  target = jnp.arange(4.0)
  opt = optax.adam(0.1)
  params = jnp.zeros(4)
  state = {"params": params, "opt_state": opt.init(params)}

  @jax.jit
  def step(state, batch, rng):
    noise = 0.01 * jax.random.normal(rng, (4,))
    loss_fn = lambda p: jnp.sum((p - target * batch) ** 2) + jnp.sum(noise * p)
    loss, g = jax.value_and_grad(loss_fn)(state["params"])
    updates, opt_state = opt.update(g, state["opt_state"])
    return {"params": optax.apply_updates(state["params"], updates),
            "opt_state": opt_state}, {"loss": loss}

  return run_loop(name=name, workdir=str(workdir), state=state, step_fn=step,
                  batch_fn=lambda i: jnp.float32(1 + i % 3), num_steps=num_steps,
                  rng=jax.random.key(0), log_every=2, checkpoint_every=4, quiet=True)


def test_killed_run_resumes_to_the_same_result(tmp_path):
  straight, history = _quadratic_job(tmp_path / "a", 12)
  _quadratic_job(tmp_path / "b", 8)   # "killed" after its step-8 checkpoint
  resumed, resumed_history = _quadratic_job(tmp_path / "b", 12)
  np.testing.assert_allclose(resumed["params"], straight["params"], rtol=1e-6)
  assert [r["step"] for r in resumed_history] == [r["step"] for r in history]
  lines = (tmp_path / "b" / "job" / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(l)["step"] for l in lines] == list(range(2, 13, 2))


def test_non_finite_loss_stops_with_a_clear_error(tmp_path):
  def step(state, batch, rng):
    return state, {"loss": jnp.float32(np.nan)}
  with pytest.raises(DistillError, match="step 1 went bad"):
    run_loop(name="bad", workdir=str(tmp_path), state={"x": jnp.zeros(1)}, step_fn=step,
             batch_fn=lambda i: None, num_steps=3, rng=jax.random.key(0), log_every=1,
             quiet=True)


@pytest.mark.parametrize("bad_metric", ["loss", "solve_ok"])
def test_a_bad_step_between_log_points_is_never_checkpointed(tmp_path, bad_metric):
  # Step 3 goes bad (NaN loss, or a failed solve) and the state turns NaN from
  # there on; logs come every 10 steps and checkpoints every 2. The step-2
  # checkpoint is the last one: the step-4 save must not happen.
  @jax.jit
  def step(state, batch, rng):
    bad = batch == 3
    x = jnp.where(bad | jnp.isnan(state["x"]), jnp.nan, state["x"] + 1.0)
    metrics = {"loss": jnp.where(bad & (bad_metric == "loss"), jnp.nan, 1.0),
               "solve_ok": jnp.where(bad & (bad_metric == "solve_ok"), 0.0, 1.0)}
    return {"x": x}, metrics

  with pytest.raises(DistillError, match="step 3 went bad.*last checkpoint is step 2"):
    run_loop(name="bad", workdir=str(tmp_path), state={"x": jnp.zeros(())}, step_fn=step,
             batch_fn=lambda i: i + 1, num_steps=20, rng=jax.random.key(0), log_every=10,
             checkpoint_every=2, quiet=True)
  ckpt = Checkpointer(str(tmp_path / "bad" / "ckpt"))
  assert ckpt.latest_step() == 2
  assert np.isfinite(ckpt.restore(2, {"x": jnp.zeros(())})["x"])


def test_on_demand_sections_may_change_until_their_artefacts_exist(tmp_path):
  workdir = str(tmp_path)

  def config(*overrides):
    c = base_config()
    apply_overrides(c, overrides)
    return c

  pipeline.prepare_workdir(base_config(), workdir)
  changed = ("experts.epochs=7", "param_match.steps=9")
  pipeline.prepare_workdir(config(*changed), workdir)   # nothing built yet: accepted and stored
  with open(tmp_path / "config.json") as f:
    stored = json.load(f)
  assert stored["experts"]["epochs"] == 7 and stored["param_match"]["steps"] == 9
  os.makedirs(tmp_path / "experts_ce")          # now the experts exist ...
  with pytest.raises(DistillError, match="differs at: experts.epochs"):
    pipeline.prepare_workdir(config("experts.epochs=8", "param_match.steps=9"), workdir)
  # ... while parameter matching (no synthetic_iadd*/mtt* yet) may still change.
  pipeline.prepare_workdir(config(*changed, "param_match.steps=11"), workdir)
  with pytest.raises(DistillError, match="differs at: distill.steps"):
    pipeline.prepare_workdir(config(*changed, "distill.steps=3"), workdir)
  with open(tmp_path / "config.json") as f:
    assert json.load(f)["param_match"]["steps"] == 11
