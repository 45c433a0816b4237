"""The pipeline's stages: one module per dvc.yaml stage (python -m pipeline.stages.<name>)."""
