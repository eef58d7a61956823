"""`kdjax distill` with teacher.aggregation: a student taught by a PATE ensemble's noisy votes.

The phases of a run:
  1. check the config (`check_config`): what would release un-noised teacher outputs while
     claiming privacy is refused before anything is read;
  2. load the ensemble of `kdjax train --config.pate.teachers=N` (teacher.workdir), check its
     partition disjoint;
  3. vote: every teacher labels the first pate.queries examples of pate.public_split on the
     device; only the vote histograms come back (`aggregation.ensemble_counts`);
  4. release: (Confident-)GNMax from the run's seed, on the device; the released labels are
     written to WORKDIR/pate_labels.npz (what an observer of the student's training sees);
  5. account: the (ε, δ) of the release (`rdp.pate_cost`);
  6. train the student with cross-entropy on the answered queries alone (kdjax.trainer, the
     public images as its training set); the unanswered ones are not used (no semi-supervised
     step);
  7. summary.json: the student's eval metrics plus the privacy cost and the query counts.

What this protects: the teachers' training data (the private split), at the reported (ε, δ),
against anyone who sees the released labels, the student, or anything derived from them. What
it does not: the public inputs (the queries are sent to the teachers in the clear and become
the student's training set), and the teachers themselves (never released here). The teachers'
soft outputs are never released: only noisy argmaxes.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import jax
import numpy as np

from kdjax import data, distributed, metrics, objectives
from kdjax import plan as plan_lib
from kdjax.privacy import aggregation, partitions, rdp

AGGREGATIONS = ("gnmax", "plurality")
NOT_PRIVATE = "plurality"


def check_config(config: plan_lib.RunPlan) -> None:
    """Refuse a PATE distillation whose release would not be what it claims (ValueError naming
    the keys)."""
    p, agg = config.pate, config.teacher.aggregation
    if agg not in AGGREGATIONS:
        raise ValueError(f"teacher.aggregation={agg!r}: valid values are '' (no aggregation) "
                         f"and {list(AGGREGATIONS)}")
    if config.loss.name != "ce":
        what = ("the teachers' soft outputs (logits)" if config.loss.name in
                objectives.LOGIT_LOSSES else "the teachers' outputs or features")
        raise ValueError(
            f"teacher.aggregation={agg!r} with loss.name={config.loss.name!r}: that loss trains "
            f"the student on {what}, un-noised, which PATE never releases. The student learns "
            f"the aggregated labels with cross-entropy: set loss.name='ce'")
    if agg == "gnmax":
        if not p.sigma > 0:
            raise ValueError(f"teacher.aggregation='gnmax' with pate.sigma={p.sigma}: without "
                             f"noise the released vote is the exact plurality and nothing is "
                             f"private; set pate.sigma > 0 (e.g. 40), or use "
                             f"teacher.aggregation='plurality' for the non-private baseline")
        if p.threshold > 0 and not p.sigma1 > 0:
            raise ValueError(f"pate.threshold={p.threshold} (Confident-GNMax) needs the noise of "
                             f"its check, pate.sigma1 > 0, got pate.sigma1={p.sigma1}")
        if p.threshold <= 0 and p.sigma1:
            raise ValueError(f"pate.sigma1={p.sigma1} is the noise of Confident-GNMax's "
                             f"threshold check: set pate.threshold > 0 too, or pate.sigma1=0 "
                             f"for plain GNMax")
        if not 0 < p.delta < 1:
            raise ValueError(f"pate.delta={p.delta} must be in (0, 1) (e.g. 1e-5, below 1/N "
                             f"for N private examples)")
    if config.teacher.workdirs:
        raise ValueError("teacher.aggregation reads its teachers from the ensemble in "
                         "teacher.workdir; leave teacher.workdirs empty")
    _check_disjoint(p.public_split, config.data.eval_split)


def _check_disjoint(public: str, evaluation: str) -> None:
    """The student is evaluated on examples it never queried."""
    a, b = partitions.parse_split(public), partitions.parse_split(evaluation)
    if a is None or b is None:
        raise ValueError(f"pate.public_split={public!r} and data.eval_split={evaluation!r} must "
                         f"be NAME or NAME[a:b], so that kdjax can check they do not overlap")
    if a[0] != b[0]:
        return
    lo = max(a[1] or 0, b[1] or 0)
    hi = min(math.inf if a[2] is None else a[2], math.inf if b[2] is None else b[2])
    if lo < hi:
        raise ValueError(
            f"pate.public_split={public!r} overlaps data.eval_split={evaluation!r}: the student "
            f"would be evaluated on examples it trained on; split them, e.g. "
            f"pate.public_split='test[:5000]' and data.eval_split='test[5000:]'")


def _key(seed: int) -> jax.Array:
    # A stream of its own: not the training step's fold_in(rng, step) keys.
    return jax.random.fold_in(jax.random.key(seed), 0x9A7E)


def release(config: plan_lib.RunPlan, counts: np.ndarray) -> aggregation.Answers:
    """The labels `teacher.aggregation` releases for the vote histograms `counts` [Q, C]."""
    p, agg = config.pate, config.teacher.aggregation
    if agg == NOT_PRIVATE:
        labels = aggregation.plurality(counts)
        answers = aggregation.Answers(labels, np.ones(len(counts), bool))
    elif p.threshold > 0:
        answers = aggregation.confident_gnmax(_key(config.seed), counts, threshold=p.threshold,
                                              sigma1=p.sigma1, sigma2=p.sigma)
    else:
        labels = aggregation.gnmax(_key(config.seed), counts, sigma=p.sigma)
        answers = aggregation.Answers(labels, np.ones(len(counts), bool))
    return aggregation.Answers(*(np.asarray(x) for x in answers))


def privacy_summary(config: plan_lib.RunPlan, counts: np.ndarray,
                    answers: aggregation.Answers) -> dict[str, Any]:
    """summary.json's privacy fields (`rdp.pate_cost`; ε = inf for the plurality baseline)."""
    p, agg = config.pate, config.teacher.aggregation
    out: dict[str, Any] = {"privacy/aggregation": agg, "privacy/queries": len(counts),
                           "privacy/answered": int(answers.answered.sum()),
                           "privacy/delta": p.delta}
    if agg == NOT_PRIVATE:
        return {**out, "privacy/epsilon": math.inf, "privacy/private": False}
    confident = p.threshold > 0
    cost = rdp.pate_cost(counts, sigma=p.sigma, delta=p.delta,
                         threshold=p.threshold if confident else None,
                         sigma1=p.sigma1 if confident else None)
    return {**out, "privacy/private": True, "privacy/epsilon": cost.epsilon,
            "privacy/order": cost.order,
            "privacy/analysis": "data-independent RDP (Papernot et al. 2018, Prop. 8), every "
                                "query charged the check and GNMax",
            # From the private votes (the paper's expected cost): an analysis figure, not
            # itself differentially private.
            "privacy/epsilon_data_dependent_unsanitized": cost.epsilon_data_dependent,
            "privacy/mechanism": "confident_gnmax" if confident else "gnmax",
            "privacy/sigma": p.sigma, "privacy/threshold": p.threshold if confident else None,
            "privacy/sigma1": p.sigma1 if confident else None}


def distill(config: plan_lib.RunPlan, workdir: str, *, progress: bool = True,
            fresh: bool = False) -> dict[str, Any]:
    """Run the phases of the module docstring; returns the summary (also in summary.json)."""
    from kdjax import classification, sharding, trainer

    config = plan_lib.as_plan(config)
    check_config(config)
    manifest = partitions.read_manifest(config.teacher.workdir)
    if manifest["dataset"] != config.data.name:
        raise ValueError(f"the ensemble in teacher.workdir={config.teacher.workdir!r} was trained "
                         f"on {manifest['dataset']!r}, this run uses data.name="
                         f"{config.data.name!r}")
    spec = data.dataset_info(config.data.name, data_dir=config.data.data_dir or None)
    mesh = sharding.mesh_from_config(config.mesh)
    task, student = classification.ImageTask(config), classification.model_spec(config.model, spec)
    members = [task.load_teacher(os.path.join(config.teacher.workdir, t["workdir"]), student,
                                 mesh).model for t in manifest["teachers"]]
    ensemble = aggregation.stack_teachers(members)
    del members

    public = data.load_arrays(config.data.name, config.pate.public_split,
                              data_dir=config.data.data_dir or None)
    queries = config.pate.queries or len(public["label"])
    if queries > len(public["label"]):
        raise ValueError(f"pate.queries={queries} exceeds the {len(public['label'])} examples of "
                         f"pate.public_split={config.pate.public_split!r}")
    images = public["image"][:queries]
    counts = aggregation.ensemble_counts(ensemble, images,
                                         preprocess=classification.preprocess_of(
                                             config.data, images.shape[-1]),
                                         batch_size=config.pate.vote_batch_size)
    answers = release(config, counts)
    privacy = privacy_summary(config, counts, answers)
    answered = answers.answered
    if not answered.any():
        raise ValueError(f"no query passed the threshold pate.threshold={config.pate.threshold} "
                         f"(pate.sigma1={config.pate.sigma1}) of {queries} queries: lower it "
                         f"(the teachers' largest vote count is {int(counts.max())})")
    # Diagnostic only (the public split's labels never reach the student): how often the
    # released label is right, as the paper reports.
    privacy["privacy/answered_label_accuracy"] = float(
        (answers.labels[answered] == public["label"][:queries][answered]).mean())
    print(f"kdjax: PATE {privacy['privacy/aggregation']}: {privacy['privacy/answered']} of "
          f"{queries} queries answered, epsilon={privacy['privacy/epsilon']:.3f} at "
          f"delta={config.pate.delta}", flush=True)
    if distributed.is_primary():
        os.makedirs(workdir, exist_ok=True)
        np.savez(os.path.join(workdir, "pate_labels.npz"), query=np.arange(queries),
                 label=answers.labels, answered=answered)

    summary = trainer.train(config, workdir, distill=False,
                            progress=progress, fresh=fresh,
                            train_arrays={"image": images[answered],
                                          "label": answers.labels[answered]})
    summary = {**summary, **privacy, "teacher": config.teacher.workdir,
               "pate/teachers": len(manifest["teachers"])}
    if distributed.is_primary():
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(metrics.json_safe(summary), f, indent=2)
    return summary
