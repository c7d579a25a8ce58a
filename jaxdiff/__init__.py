"""jaxdiff: a JAX-functional toolkit for diffusion models."""
