"""Brain MRI denoising platform."""
