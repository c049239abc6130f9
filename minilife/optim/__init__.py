"""Optimisation: AdamW from its update equations, learning-rate schedules, gradient clipping, loss scaling."""
from minilife.optim.adamw import AdamW
from minilife.optim.clip import clip_grad_norm
from minilife.optim.loss_scale import DynamicLossScaler
from minilife.optim.schedule import EarlyStopping, PlateauScheduler, warmup_cosine_lr

__all__ = ["AdamW", "clip_grad_norm", "DynamicLossScaler", "EarlyStopping", "PlateauScheduler", "warmup_cosine_lr"]
