"""soundline: a DVC-driven MLOps pipeline for audio and biomedical-signal models."""
