"""Model loading, the model-family description, and the networks the project ships (ArcFace IResNet, a tiny SD for tests)."""
