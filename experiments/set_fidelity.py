r"""How well does a student pretrained on a table row's set reproduce its teacher?

Every row of the results table pretrains a fresh network to regress targets
in the teacher's space (the teacher's own representations for real subsets,
learned ones for KRR-ST and the knowledge-distillation parameter-matching
sets). The label-free question all of them answer in the end is the one
`full` answers with the whole source: on source images the student never
saw, how much of the teacher's representation does its head not predict
(1 - R^2, `transfer.relative_error`, in the space of the set's standardised
targets, as experiments/full_regression.py measures `full`)? This script asks
it of the table's own pretrained students (restored from
`<workdir>/table/pretrain_<row>_n<n>_<arch>_seed<s>`; a missing one is
pretrained there exactly as the table would), beside the table's 5%-label
probe accuracy on its main target when recorded (information only).

The head is not what the probe reads: the backbone's representation
(`probe.representation`) is. So a second, head-free measure asks how much of
the teacher a linear read of that representation recovers on held-out
source images (`decoding_error`: ridge from the student's features to the
teacher's standardised representation, regularisation chosen on a
validation part of the fitting images, 1 - R^2 on the rest), with `none`
(a fresh backbone per seed) as the no-pretraining reference.

Command (from the repository root; the overrides are the table's):
  python experiments/set_fidelity.py --config experiments/configs/cifar10_effect.py \
      --workdir runs/effect_n100 --rows random krr_st mtt kmeans --seeds 0 1 2 \
      --set krr_st.num_synthetic=100 --set param_match.num_synthetic=100 \
      --set eval.full_epochs=10 --out experiments/results/set_fidelity_n100.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import jax
import numpy as np

from distill import files
from distill.config import load_config
from distill.data import datasets
from distill.eval import table, transfer
from distill.nn.models import build_model, extract_features
from kernels.ridge import ridge_fit, ridge_path, with_bias

REGS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
from distill.stages import artefacts, sets


def held_out_indices(num_source: int, used: set, count: int, seed: int) -> np.ndarray:
  """`count` seeded source indices that no measured set holds or started from."""
  order = np.random.default_rng(seed).permutation(num_source)
  return np.sort(np.array([i for i in order if int(i) not in used][:count]))


def decoding_error(f_fit: np.ndarray, y_fit: np.ndarray, f_test: np.ndarray,
                   y_test: np.ndarray, validation: float = 0.25) -> dict:
  """1 - R^2 of a ridge map from features to targets on the test images.

  Features are centred and scaled (one overall scale) as the linear probe
  does; the reg (trace_over_n) is chosen on the last `validation` fraction of
  the fitting images, then refitted on all of them.

  Args:
    f_fit: (N, p) features, y_fit: (N, d) targets of the fitting images.
    f_test: (M, p), y_test: (M, d) of the test images.
  """
  mu = f_fit.mean(0)
  scale = float(np.sqrt(np.mean(np.sum((f_fit - mu) ** 2, axis=1)))) + 1e-12
  prep = lambda f: np.asarray(with_bias((f - mu) / scale), np.float32)
  x, x_test = prep(f_fit), prep(f_test)
  cut = int(len(x) * (1 - validation))
  paths = np.asarray(ridge_path(x[:cut], y_fit[:cut], np.asarray(REGS, np.float32)))
  val_errors = [transfer.relative_error(x[cut:] @ w, y_fit[cut:]) for w in paths]
  best = int(np.argmax(-np.asarray(val_errors)))
  weights, _ = ridge_fit(x, y_fit, REGS[best])
  return dict(error=transfer.relative_error(x_test @ np.asarray(weights), y_test),
              reg=REGS[best])


def recorded_accuracies(workdir: str, n: int, arch: str, target: str) -> dict:
  """{(row, seed): the table's 5%-label probe top-1 on `target`} of its recorded runs."""
  return {(r["row"], r["seed"]): r["accuracy"]
          for r in files.read_json(os.path.join(workdir, "table.json"), {"runs": []})["runs"]
          if (r["n"], r["arch"], r["target"], r["readout"]) == (n, arch, target,
                                                                 "linear_probe_5pct")}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", required=True)
  parser.add_argument("--workdir", required=True, help="the table's workdir")
  parser.add_argument("--rows", nargs="+", required=True)
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--held_out", type=int, default=2000,
                      help="source images for the head's error (and to decode from)")
  parser.add_argument("--decode_fit", type=int, default=3000,
                      help="further held-out source images to fit the decoding ridge on")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
  parser.add_argument("--out", required=True, help="the .json to write (must not exist)")
  args = parser.parse_args(argv)
  if os.path.exists(args.out):
    raise SystemExit(f"--out {args.out} exists; remove it or choose another path")
  config = load_config(args.config, args.set)
  regress_teacher = [r for r, spec in sets.ROWS.items()
                     if spec.build and spec.recipe in (("teacher", "mse"), ("learned", "mse"))]
  bad = [r for r in args.rows if r not in regress_teacher]
  if bad:
    raise SystemExit(f"rows {bad} have no set of teacher-space targets; choose among "
                     f"{regress_teacher}")
  teacher = artefacts.workdir_teacher(config, args.workdir)
  source = artefacts.load_source(config)
  n = config.krr_st.num_synthetic
  pre = config.pretrain
  arch = table.arch_label(pre.arch)
  target_lbl = table.target_label(artefacts.parse_target(artefacts.main_target(config))[0])
  teacher_fn = jax.jit(lambda x: teacher.represent(teacher.variables, x))

  built = {(row, seed): sets.build_set(row, config, args.workdir, n, seed, source, teacher)
           for row in args.rows for seed in args.seeds}
  used = {int(i) for s in built.values()
          for i in (s.extra.get("indices") or s.extra.get("init_indices") or [])}
  idx = held_out_indices(len(source.images), used, args.held_out + args.decode_fit, seed=12345)
  x_all = datasets.normalize(source.images[idx], teacher.mean, teacher.std)
  y_all = teacher.features(x_all)
  # The head is measured on the last `held_out` images; the decoding ridge is
  # fitted on the first `decode_fit` and measured on the same last ones.
  x_held, y_held = x_all[args.decode_fit:], y_all[args.decode_fit:]
  standardize_teacher = transfer.target_standardizer(y_all[:args.decode_fit])
  kind_read = config.probe.representation

  def decode(model, variables) -> dict:
    f = extract_features(model, variables, x_all, kind=kind_read)
    return decoding_error(f[:args.decode_fit], standardize_teacher(y_all[:args.decode_fit]),
                          f[args.decode_fit:], standardize_teacher(y_held))

  recorded = recorded_accuracies(args.workdir, n, arch, target_lbl)
  runs = []
  for seed in args.seeds:
    model, variables = transfer.fresh_backbone(pre, source.images.shape[1:], seed)
    run = dict(row="none", seed=seed, decoding=decode(model, variables),
               probe_5pct=recorded.get(("none", seed)))
    runs.append(run)
    print(json.dumps(run), flush=True)
  for (row, seed), s in built.items():
    t0 = time.perf_counter()
    kind, loss = sets.ROWS[row].recipe
    model, variables = transfer.pretrain(pre, s.images, s.targets, seed,
                                     os.path.join(args.workdir, "table"),
                                     f"pretrain_{row}_n{n}_{arch}_seed{seed}", kind=kind,
                                     loss=loss, teacher_fn=teacher_fn, quiet=True)
    outputs = transfer.head_predictions(build_model(pre.arch, num_outputs=s.targets.shape[1]),
                                        variables, x_held)
    truth = transfer.target_standardizer(s.targets)(y_held) if pre.standardize_targets else y_held
    run = dict(row=row, seed=seed, held_out_rel_error=transfer.relative_error(outputs, truth),
               decoding=decode(model, variables),
               probe_5pct=recorded.get((row, seed)),
               seconds=time.perf_counter() - t0)
    runs.append(run)
    print(json.dumps(run), flush=True)

  def mean_std(values) -> dict:
    return dict(mean=float(np.mean(values)), seeds=len(values),
                std=float(np.std(values, ddof=1)) if len(values) > 1 else 0.0)

  summary = {}
  for row in ["none", *args.rows]:
    mine = [r for r in runs if r["row"] == row]
    summary[row] = dict(decoding_error=mean_std([r["decoding"]["error"] for r in mine]))
    if row != "none":
      summary[row]["head_error"] = mean_std([r["held_out_rel_error"] for r in mine])
  out = dict(n=n, arch=arch, held_out_images=args.held_out, decode_fit_images=args.decode_fit,
             representation=kind_read, runs=runs, summary=summary,
             command=" ".join(["python", "experiments/set_fidelity.py"] + sys.argv[1:]),
             machine=f"{platform.machine()}, {os.cpu_count()} CPUs, jax {jax.__version__}")
  files.write_json(args.out, out)
  print(json.dumps(summary, indent=1), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
