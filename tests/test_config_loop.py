"""The config system and the shared training loop (checkpoint, resume)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from distill.config import apply_overrides, base_config, load_config, to_dict
from distill.errors import DistillError
from distill.nn.loop import batch_indices, Checkpointer, run_loop
from distill.stages import artefacts

QUICKSTART = os.path.join(os.path.dirname(__file__), "..", "experiments", "configs",
                          "fashion_mnist_quickstart.py")


def test_overrides_parse_types_and_reject_unknown_keys():
  c = base_config()
  apply_overrides(c, ["krr_st.steps=7", "krr_st.reg=1e-2", "data.source=my/data.npz",
                      "eval.seeds=(3, 4)", "krr_st.lr_images=1"])
  assert c.krr_st.steps == 7 and c.krr_st.reg == 1e-2
  assert c.data.source == "my/data.npz" and c.eval.seeds == (3, 4)
  assert c.krr_st.lr_images == 1.0 and isinstance(c.krr_st.lr_images, float)
  with pytest.raises(DistillError, match="unknown config key 'krr_st.stepz'"):
    apply_overrides(c, ["krr_st.stepz=3"])
  with pytest.raises(DistillError, match="unknown config key 'distil'"):
    apply_overrides(c, ["distil.steps=3"])
  with pytest.raises(DistillError, match="expects int"):
    apply_overrides(c, ["krr_st.steps=many"])
  with pytest.raises(DistillError, match="key=value"):
    apply_overrides(c, ["krr_st.steps"])


def test_config_files_and_variants_load():
  c = load_config(QUICKSTART + ":smoke")
  assert c.krr_st.steps < load_config(QUICKSTART).krr_st.steps
  with pytest.raises(DistillError, match="does not exist"):
    load_config("no/such/config.py")


def test_misspelt_key_inside_a_config_file_is_an_error(tmp_path):
  path = tmp_path / "typo.py"
  path.write_text("from distill.config import base_config\n"
                  "def get_config():\n  c = base_config()\n  c.krr_st.num_synthetc = 5\n"
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
  # TensorBoard sees the same curve: the resumed writer purges past step 8.
  board = _tensorboard_scalars(tmp_path / "b" / "job" / "tensorboard", "loss")
  assert board == {json.loads(l)["step"]: pytest.approx(json.loads(l)["loss"]) for l in lines}


def _tensorboard_scalars(directory, tag: str) -> dict:
  """{step: value} of `tag` in a TensorBoard run directory, as TensorBoard shows it
  (a START session log at step s drops the earlier files' events from step s on)."""
  from tensorboardX.proto import event_pb2
  scalars = {}
  for path in sorted(directory.glob("events.out.tfevents.*")):
    data = path.read_bytes()
    offset = 0
    while offset < len(data):   # TFRecord framing: length, crc, payload, crc
      length = int.from_bytes(data[offset:offset + 8], "little")
      event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
      offset += 16 + length
      if event.HasField("session_log") and event.session_log.status == 1:
        scalars = {k: v for k, v in scalars.items() if k < event.step}
      for value in event.summary.value:
        if value.tag == tag:
          scalars[event.step] = value.simple_value
  return scalars


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

  artefacts.prepare_workdir(base_config(), workdir)
  changed = ("experts.epochs=7", "param_match.steps=9")
  artefacts.prepare_workdir(config(*changed), workdir)   # nothing built yet: accepted and stored
  with open(tmp_path / "config.json") as f:
    stored = json.load(f)
  assert stored["experts"]["epochs"] == 7 and stored["param_match"]["steps"] == 9
  os.makedirs(tmp_path / "experts_ce")          # now the experts exist ...
  with pytest.raises(DistillError, match="differs at: experts.epochs"):
    artefacts.prepare_workdir(config("experts.epochs=8", "param_match.steps=9"), workdir)
  # ... while parameter matching (no synthetic_iadd*/mtt* yet) may still change.
  artefacts.prepare_workdir(config(*changed, "param_match.steps=11"), workdir)
  with pytest.raises(DistillError, match="differs at: krr_st.steps"):
    artefacts.prepare_workdir(config(*changed, "krr_st.steps=3"), workdir)
  with open(tmp_path / "config.json") as f:
    assert json.load(f)["param_match"]["steps"] == 11
  # KIP's section likewise, until its job or set exists.
  artefacts.prepare_workdir(config(*changed, "param_match.steps=11", "kip.steps=5"), workdir)
  os.makedirs(tmp_path / "sets")
  (tmp_path / "sets" / "kip_n100.npz").write_bytes(b"")
  with pytest.raises(DistillError, match="differs at: kip.steps"):
    artefacts.prepare_workdir(config(*changed, "param_match.steps=11", "kip.steps=6"), workdir)


def test_a_workdir_made_with_the_old_section_name_is_read_renamed(tmp_path):
  old = json.loads(json.dumps(to_dict(base_config())))
  old["distill"] = old.pop("krr_st")
  (tmp_path / "config.json").write_text(json.dumps(old))
  (tmp_path / "teacher").mkdir()
  artefacts.prepare_workdir(base_config(), str(tmp_path))   # same settings: accepted
  stored = json.loads((tmp_path / "config.json").read_text())
  assert "distill" not in stored and stored["krr_st"] == old["distill"]
  changed = base_config()
  apply_overrides(changed, ["krr_st.steps=3"])
  with pytest.raises(DistillError, match="differs at: krr_st.steps"):
    artefacts.prepare_workdir(changed, str(tmp_path))


def test_a_workdir_with_nothing_built_takes_a_corrected_config(tmp_path):
  typo = base_config()
  apply_overrides(typo, ["data.source=/no/such/data.npz"])
  artefacts.prepare_workdir(typo, str(tmp_path))   # the run then stops at the missing source
  fixed = base_config()
  artefacts.prepare_workdir(fixed, str(tmp_path))
  stored = json.loads((tmp_path / "config.json").read_text())
  assert stored["data"]["source"] == fixed.data.source
  (tmp_path / "teacher").mkdir()                    # something built: the config is fixed now
  with pytest.raises(DistillError, match="differs at: data.source"):
    artefacts.prepare_workdir(typo, str(tmp_path))
