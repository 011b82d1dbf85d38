"""The one face finder: detection, landmarks, masks and orientation, shared by the dataset tools, post-processing and evaluation."""
