"""Measuring likeness: the identity network (face detection + face embedding) shared by the evaluation
command, the training-time scores and the dataset check (`face_identity`); the paper's metrics over
image folders (`folders`, `clip_scores`, `metrics`, `report`) that `evaluate.py` runs."""
