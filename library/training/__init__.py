"""The MagiCapture training loop and everything it needs: data, losses, attention capture, identity, checkpoints."""
