"""Ray Tune searches over the training platform: every trial is a Ray Train run."""
