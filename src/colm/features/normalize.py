"""Adam-moment normalisation of gradient features, and sparsification.

Training uses Adam, whose update is m_hat / (sqrt(v_hat) + eps), not the
gradient, so features are mapped the same way with the selector's own moments:
for example i, m_i = b1 m + (1 - b1) g_i, v_i = b2 v + (1 - b2) g_i^2, bias-
corrected with the step count. After selection the moments become the mean of
m_i, v_i over the selected examples, which (being linear in g_i and g_i^2) is
b1 m + (1 - b1) mean(g_sel) and b2 v + (1 - b2) mean(g_sel^2).
"""

from __future__ import annotations

import torch


class AdamNormalizer:
    """Stateful Adam-style feature normalisation (moments are selector state)."""

    def __init__(self, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8):
        self.beta1, self.beta2, self.eps = beta1, beta2, eps
        self.m: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.step = 0

    def _moments(self, numel: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        if self.m is None:
            self.m = torch.zeros(numel, dtype=torch.float32)
            self.v = torch.zeros(numel, dtype=torch.float32)
        if self.m.numel() != numel:
            raise ValueError(
                f"selector moments have {self.m.numel()} entries but the features have {numel}; "
                "the model's value block changed since this selector state was saved"
            )
        return self.m.to(device), self.v.to(device)

    def normalize(self, g: torch.Tensor) -> torch.Tensor:
        """Features f [n, D] = m_hat_i / (sqrt(v_hat_i) + eps) at the next step."""
        m, v = self._moments(g.shape[1], g.device)
        t = self.step + 1
        m_i = self.beta1 * m + (1 - self.beta1) * g
        v_i = self.beta2 * v + (1 - self.beta2) * g * g
        m_hat = m_i / (1 - self.beta1**t)
        v_hat = v_i / (1 - self.beta2**t)
        return m_hat / (v_hat.sqrt() + self.eps)

    def update(self, g_selected: torch.Tensor) -> None:
        """Set the moments to the mean of m_i, v_i over the selected examples."""
        if g_selected.shape[0] == 0:
            return
        m, v = self._moments(g_selected.shape[1], g_selected.device)
        g = g_selected.float()
        self.m = (self.beta1 * m + (1 - self.beta1) * g.mean(0)).cpu()
        self.v = (self.beta2 * v + (1 - self.beta2) * (g * g).mean(0)).cpu()
        self.step += 1

    def state_dict(self) -> dict:
        return {"m": self.m, "v": self.v, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.m, self.v, self.step = state["m"], state["v"], int(state["step"])


def top_dims(features: torch.Tensor, h: int) -> torch.Tensor:
    """Indices (ascending) of the ``h`` coordinates with the largest |mean| over rows."""
    h = min(h, features.shape[1])
    score = features.mean(0).abs()
    return torch.topk(score, h, sorted=False).indices.sort().values
