"""Seed-replay checkpoints: a run's whole history as its base model plus one fitness vector per step.

An ES step (EGGROLL, arXiv 2511.16652, Sec. 3; ``es_update.py``) is a pure function of the weights
before it, the step's noise (``noise.py``: a function of seed, step and weight name), sigma, the
learning rate and the population's shaped fitness. So the base model and, per step,
``(sigma, lr, fitness)`` rebuild every later state bit for bit, on the same kind of device and
with the same eggroll_ft; an optimizer with state (Adam's moments) is rebuilt by re-running its
steps on the recomputed directions.

The log ``output_dir/es_replay.jsonl``, written by ``ReplayLog`` during training (``EggrollConfig.
es_replay_log``), is a header line and then two lines per step::

    {"format": "eggroll_ft.es_replay", "version": 1, "base_digest": ..., "noise": {...}, ...}
    {"step": 0, "sigma": 0.001, "lr": 1e-06, "fitness": [0.70710677, -0.70710677, ...]}
    {"step": 0, "digest": "..."}

The step line is written and fsynced before the update is applied; the digest line (of the
perturbed weights after the update) once it is. A torn last line (a crash mid-write) is ignored on
reading; a step line without its digest line is still replayed, unchecked.

* ``replay(base, log, until_step)`` rebuilds the weights (and optimizer) after ``until_step``
  steps, checking the base's digest and each passed step's digest;
* ``python -m eggroll_ft.replay BASE LOG --step K --output_dir DIR`` writes that state as a normal
  Hugging Face (or PEFT adapter) checkpoint;
* ``EggrollTrainer.train(resume_from_checkpoint=LOG)`` (with the base as the trainer's model)
  resumes a run from its log (``ReplayResume``).

``log.py`` holds the format (digests, header, reading) and the writer; ``rebuild.py`` re-runs the
steps. Boundary: the package re-runs ES updates from logged fitness; it knows nothing of
generation or rewards, and of the trainer only the ``TrainerCallback`` hooks and what
``ReplayResume.replay`` is handed.
"""
from .log import (LOG_NAME, ReplayHistory, ReplayLog, is_replay_log, model_digest, perturbed_digest, read_log,
                  weights_digest)
from .rebuild import Replayed, ReplayResume, main, replay

__all__ = ["LOG_NAME", "ReplayHistory", "ReplayLog", "ReplayResume", "Replayed", "is_replay_log", "main",
           "model_digest", "perturbed_digest", "read_log", "replay", "weights_digest"]
