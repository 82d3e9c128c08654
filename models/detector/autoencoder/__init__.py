"""The autoencoder baselines (plain conv autoencoder, coarse-noise denoising U-Net); entry points in `api`."""
