"""Attribution of diffusion-model generations to training images."""
