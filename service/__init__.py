"""The BentoML service that serves the registry's champion denoiser, its web page, and how its Bento is built."""
