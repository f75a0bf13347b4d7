"""The contract every model follows, whether built in or registered by a plugin."""

from __future__ import annotations

from torch import Tensor, nn


class MultiTaskModel(nn.Module):
    """Base class of the built-in models: a plain module mapping (B, F) features to T outputs.

    ``forward`` returns a list with one (B, O_t) tensor per task, in the dataset's task order.
    Binary and multi-label heads return logits. Models registered by plugins need not subclass
    this, but the training wrapper calls the two hooks below when a model defines them.
    """

    def regularization_losses(self) -> dict[str, Tensor]:
        """Return named scalar terms that training adds to the loss, such as an L0 penalty."""
        return {}

    def serving_module(self) -> nn.Module:
        """Return the module to deploy for inference; models that prune override this."""
        return self

    def diagnostics(self) -> dict[str, float]:
        """Return named scalars that describe the model's current state, logged every epoch."""
        return {}
