"""Hyperparameter sweeps of a recipe with Ray Tune; each trial is a multi-worker Ray Train run.

* :mod:`we_dist.tune.space`: the sweep-file schema, search spaces, validation (no Ray needed);
* :mod:`we_dist.tune.trial`: the Tune trainable that runs one trial through the driver's pieces;
* :mod:`we_dist.tune.report`: the live console table, results table, best trial and plots;
* :mod:`we_dist.tune.sweep`: ``we-dist tune`` (start, resume, report to MLflow).

Example::

    we-dist tune tunes/demo_digits.yaml
    we-dist tune --resume tunes/demo_digits.yaml
"""
