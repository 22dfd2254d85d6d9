"""pyrovae_pde: mechanistic subtypes of neurodegeneration with a physics-informed VAE mixture."""
__version__ = "0.1.0"
