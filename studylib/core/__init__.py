"""The model and one training run: ViNy and its heads, masking, augmentation, the training loop, metrics,
and the small utilities they share (atomic files, parameter schemas, progress and device)."""
