"""The slice recipe: StyleGAN2-style (or compact DCGAN) conditioned GAN + encoder on whole slices; entry points in `api`."""
