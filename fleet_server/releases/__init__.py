"""Releases and the model registry: bundles published into the update repository, a record per
model version with its stage and model card, and the bench (HIL) reports that gate campaigns."""
