r"""Where a KRR-ST set parts from its teacher: its learned targets or its images.

A KRR-ST set holds learned images X_s and learned targets Y_s in the
teacher's space. Its outer loss only asks that ridge heads fitted on
(pool features of X_s, Y_s) predict the teacher on real images, so Y_s may
drift from what the teacher says of X_s. A student pretrained on the set
regresses Y_s, not the teacher. This script measures that drift, label-free:

* relative error (1 - R^2, `transfer.relative_error`) of Y_s against the
  teacher's representation of the learned images T(X_s), and of the initial
  subset's teacher targets T(X_0) against T(X_s) (how far the images moved
  in the teacher's eyes);

and, with --pretrain, the control that separates images from targets: a
fresh student pretrained with the protocol's recipe on (X_s, T(X_s)), the
learned images re-labelled by the teacher, read out like the table's rows
(the read-outs are information, never a choice).

The same holds for any set with learned teacher-space targets and a
random or selected real start (`extra.init_indices`): the knowledge-
distillation parameter-matching sets (`synthetic_mtt.npz`,
`synthetic_iadd.npz`) are measured the same way.

Command (from the repository root; the set is `distill krr-st`'s export):
  python experiments/krr_st_targets.py --config experiments/configs/cifar10_effect.py \
      --workdir runs/krr_st_targets --synthetic runs/cifar10_effect/synthetic.npz \
      --pretrain --out experiments/results/krr_st_targets.json
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
from distill.data import datasets, synthetic_set
from distill.eval import transfer
from distill.nn.models import extract_features
from distill.stages import artefacts

import probe_script


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--synthetic", required=True, help="a KRR-ST synthetic.npz")
  parser.add_argument("--pretrain", action="store_true",
                      help="also pretrain a student on the re-labelled learned images")
  args, config, teacher = probe_script.start(parser, argv,
                                             ["linear_probe_5pct", "linear_probe"])
  s = synthetic_set.load_synthetic(args.synthetic)
  if "init_indices" not in s.extra:
    raise SystemExit(f"{args.synthetic}: no extra.init_indices (not a learned set started "
                     f"from real source images)")
  source = artefacts.load_source(config)
  x0 = datasets.normalize(source.images[np.asarray(s.extra["init_indices"])], teacher.mean,
                          teacher.std)
  t_learned, t_initial = teacher.features(s.images), teacher.features(x0)
  out = dict(synthetic=args.synthetic, n=len(s.images), teacher=s.teacher,
             targets_vs_teacher_of_images=transfer.relative_error(s.targets, t_learned),
             teacher_of_initial_vs_learned_images=transfer.relative_error(t_initial, t_learned),
             targets_vs_teacher_of_initial=transfer.relative_error(s.targets, t_initial),
             target_norm_ratio=float(np.linalg.norm(s.targets) / np.linalg.norm(t_learned)),
             image_shift=synthetic_set.image_shift(s.images, x0))
  print(json.dumps(out, indent=1), flush=True)

  if args.pretrain:
    target = artefacts.load_target(config, source.images.shape[1:], teacher.mean, teacher.std)
    t0 = time.perf_counter()
    model, variables = transfer.pretrain(config.pretrain, s.images, t_learned, args.seed,
                                         args.workdir, f"relabelled_seed{args.seed}")
    p = config.probe
    f_train = extract_features(model, variables, target[0], kind=p.representation)
    f_test = extract_features(model, variables, target[2], kind=p.representation)
    out["relabelled_student"] = transfer.probe_accuracies(args.readouts, f_train, target[1],
                                                          f_test, target[3], p, args.seed)
    out["relabelled_student_seconds"] = time.perf_counter() - t0
  out.update(command=" ".join(["python", "experiments/krr_st_targets.py"] + sys.argv[1:]),
             machine=f"{platform.machine()}, {os.cpu_count()} CPUs, jax {jax.__version__}")
  files.write_json(args.out, out)
  print(json.dumps(out.get("relabelled_student", {})), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
