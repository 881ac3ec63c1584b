"""Generative models (GAN, WGAN, VAE, DDPM): their training step, sample-quality metrics and `raycraft sample`."""
