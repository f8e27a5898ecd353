"""Evaluation through lm-evaluation-harness (`harness`) with the project's task YAML (`tasks/`)."""
