"""Serving: the model the pipeline registered and promoted in MLflow, behind an ASGI service.

``python -m deploy.serve`` finds ``<prefix>-<domain>@champion`` in the pipeline's MLflow registry
(the same store the Dagster assets write), or takes an exported model folder, and starts the
FastAPI app of ``deploy.service`` under uvicorn; ``python -m deploy.recommend`` asks a running
service for recommendations. ``deploy`` imports the library (``mmrec``) and MLflow, never
``orchestration``. See ``make serve``.
"""
