"""The patch recipe: 32² multi-window patch GAN / adversarial autoencoder; entry points in `api`."""
