"""Serving: the model the pipeline registered and promoted in MLflow, behind MLflow's REST server.

``python -m deploy.serve`` finds ``<prefix>-<domain>@champion`` in the pipeline's MLflow registry
(the same store the Dagster assets write) and starts ``mlflow models serve`` on it;
``python -m deploy.recommend`` asks a running server for recommendations. See ``make serve``.
"""
