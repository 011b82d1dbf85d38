"""Evaluation: the paper's metrics (CSIM, masked-CLIP style, LAION aesthetic, face found) and the identity
network they use."""
