"""Measuring likeness: the identity network (face detection + face embedding) shared by the evaluation
command, the training-time scores and the dataset check (`face_identity`)."""
