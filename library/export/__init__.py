"""What the frontends load: the kohya LoRA, the embeddings, their metadata, A1111 infotext."""
