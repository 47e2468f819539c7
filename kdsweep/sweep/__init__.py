"""Sweeps: an Optuna study over the DVC pipeline, declared in ``experiments/<study>.yaml``.

The pieces, in the order a sweep uses them:

==================  ==============================================================
``spec.py``         the typed study spec (pydantic; errors name the key)
``space.py``        pure: the search space as dimensions, sampling, and turning
                    sampled values into ``params.yaml`` overrides
``plan.py``         validation of a spec against ``params.yaml``, ``dvc.yaml`` and
                    the student's parameter names, before any trial runs
``dvcexp.py``       I/O with DVC and git: ``-S`` values, experiment refs, upstream checks
``preflight.py``    before the first trial: ``dvc repro`` upstream, the student's names
``record.py``       the typed trial record: the only reader and writer of Optuna's user
                    attributes; why each trial ended (complete, pruned, failed, interrupted)
``selection.py``    ranked, best, baseline: one ranking for every reader
``study.py``        Optuna glue: the storage string, the sampler, whether a trial's runner is gone
``devices.py``      each running trial's own GPUs (device sets of ``devices_per_trial``)
``budget.py``       the study's budget, shared by every runner; trial heartbeats
``exprun.py``       one trial's ``dvc exp run``: started, logged, stopped
``outcome.py``      a trial's end in the study: tell, fail, interrupt and retry, push; dead runners' trials
``retention.py``    keep the best trials' outputs, free the others' DVC cache objects
``runner.py``       ``kdsweep run``: workers, one DVC experiment per trial, resume
``slurm.py``        ``kdsweep run --slurm N``: the runners as one Slurm job array (sbatch)
``results.py``      ``kdsweep best``, ``kdsweep report``, ``kdsweep status``
``apply.py``        ``best --apply``: the trial's overrides into ``params.yaml``, hand edits kept
``testeval.py``     the listed trials' test metrics, from their kept checkpoints (shown, never selected on)
``dashboard.py``    ``kdsweep dashboard``: optuna-dashboard over the study's own storage
``cli.py``          the typer commands
==================  ==============================================================

Inside each trial, ``kdsweep distill`` reports to the study through :mod:`kdsweep.trial_hook`
(outside this package, so the distill stage does not depend on the sweep's code).

The spec format is documented in ``docs/study-spec.md``.
"""
