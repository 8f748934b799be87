"""Hidden-state distillation terms (Minitron's intermediate-state loss), alongside the logit loss.

Student layer j of S is matched to teacher layer round(j * T / S) of T, so a depth-pruned student is
still compared with the teacher at the same relative depth. A learned linear map (part of the
optimizer's parameters, saved in the checkpoint) takes the student's width to the teacher's; it
starts as the identity, which is exact for a student of the same width. The loss is the mean
squared error divided by the teacher state's mean square, so it is scale-free across layers.
"""

from __future__ import annotations

from typing import Any

import torch


class HiddenAlignment(torch.nn.Module):
    def __init__(self, student_layers: int, teacher_layers: int, student_width: int, teacher_width: int):
        super().__init__()
        self.pairs = [(j, round(j * teacher_layers / student_layers)) for j in range(1, student_layers + 1)]
        self.project = torch.nn.Linear(student_width, teacher_width, bias=False)
        with torch.no_grad():
            torch.nn.init.eye_(self.project.weight)

    def forward(self, student_states: tuple[Any, ...], teacher_states: tuple[Any, ...]) -> Any:
        """hidden_states tuples as transformers returns them: index 0 is the embedding output."""
        total = student_states[0].new_zeros((), dtype=torch.float32)
        for j, t in self.pairs:
            target = teacher_states[t].float()
            error = (self.project(student_states[j].float()) - target).pow(2).mean()
            total = total + error / target.pow(2).mean().clamp_min(1e-12)
        return total / len(self.pairs)
