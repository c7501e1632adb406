"""FT-M: FT-L's fine-tuning of one MLP output projection, without the norm bound (EasyEdit's FT-M).

The loss is the NLL of the target tokens only ("masked": prompt tokens carry no loss), with early
stopping, exactly as in :mod:`recipe.editors.ft`; FT-M only drops the L-infinity bound on the change
and uses its own defaults. ``norm_constraint`` is fixed to 0 and not a config key.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from recipe.editors.base import register_editor
from recipe.editors.ft import FTConfig, FTEditor


@dataclass
class FTMConfig(FTConfig):
    layer: int | None = None  # decoder layer whose MLP output projection is tuned; None: configs/models edit_layers.ftm
    steps: int = 25  # most Adam steps per edit (EasyEdit's FT-M: 25)
    lr: float = 5.0e-4  # Adam learning rate (EasyEdit's FT-M: 5e-4)
    norm_constraint: float = field(default=0.0, init=False)  # FT-M: no bound on the change (not configurable)
    stop_loss: float = 5.0e-2  # stop early once the mean target NLL is below this


@register_editor
class FTMEditor(FTEditor):
    name = "ftm"
    config_cls = FTMConfig
