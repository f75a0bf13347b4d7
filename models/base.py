"""The contract every model follows, whether built in or registered by a plugin."""

from __future__ import annotations

from torch import Tensor, nn



class MultiTaskModel(nn.Module):
    """Base class of the built-in models: a plain module mapping (B, F) features to T outputs.

    ``forward`` returns a list with one (B, O_t) tensor per task, in the dataset's task order.
    Binary and multi-label heads return logits. Models registered by plugins need not subclass
    this, but the training wrapper and the loss weightings call the hooks below when a model
    defines them.
    """

    def regularization_losses(self) -> dict[str, Tensor]:
        """Return named scalar terms that training adds to the loss, such as an L0 penalty."""
        return {}

    def shared_parameters(self) -> list[nn.Parameter]:
        """Return the parameters that more than one task's output depends on.

        Gradient-based loss weightings (PCGrad) combine the tasks' gradients on these and give
        every other parameter its plain gradient. The default is every parameter outside the
        ``towers`` attribute; models with task-specific parts elsewhere, such as MMoE's
        per-task gates, override it.
        """
        towers = getattr(self, "towers", None)
        tower_ids = {id(p) for p in towers.parameters()} if towers is not None else set()
        return [p for p in self.parameters() if id(p) not in tower_ids]

    def last_shared_parameters(self) -> list[nn.Parameter]:
        """Return the weights of the last shared layer, where GradNorm measures gradient norms.

        The default is the last parameter of two or more dimensions among
        :meth:`shared_parameters`, in registration order. An empty list means the model shares
        no layer, and GradNorm cannot run on it.
        """
        matrices = [p for p in self.shared_parameters() if p.dim() >= 2]
        return matrices[-1:]

    def serving_module(self) -> nn.Module:
        """Return the module to deploy for inference; models that prune override this."""
        return self

    def diagnostics(self) -> dict[str, float]:
        """Return named scalars that describe the model's current state, logged every epoch."""
        return {}
