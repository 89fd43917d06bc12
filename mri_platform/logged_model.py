"""The denoiser as MLflow logs it: a pyfunc model from code, rebuilt from a weights-only checkpoint.

`tracking.log_model` hands MLflow this file (``python_model=<this path>``), not an object: MLflow stores the
source and runs it on load, so nothing in the registry is unpickled. The weights travel as the platform's own
checkpoint (``artifacts/checkpoint.pt``: tensors and plain fields, read with ``torch.load(weights_only=True)``),
and the architecture comes from the model zoo by name (`models.build_model`). Loading a champion that someone
tampered with can therefore fail, but cannot run their code.

MLflow runs this module, so its last line registers the model (``set_model``), as models-from-code requires;
the platform itself never imports it.
"""

from __future__ import annotations

from typing import Any

import mlflow.pyfunc
import numpy as np


class Denoiser(mlflow.pyfunc.PythonModel):
    """Input: float32 (N, 1, H, W) in [0, 1]; output: the restored batch, same shape (the network's raw output)."""

    def load_context(self, context: Any) -> None:
        from mri_platform.checkpoints import load_checkpoint
        from mri_platform.tracking import LOGGED_CHECKPOINT

        self.model, self.meta = load_checkpoint(context.artifacts[LOGGED_CHECKPOINT])

    def predict(self, context: Any, model_input: np.ndarray, params: dict | None = None) -> np.ndarray:
        import torch

        batch = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        with torch.inference_mode():
            return self.model(batch).numpy()


mlflow.models.set_model(Denoiser())
