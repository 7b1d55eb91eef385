"""Rewrites of trained SavedModels: inspect, fold, swap-adapter (`tf-lora --help` for the command line)."""

from tf_lora.rewrite.embedding import Replaced, replace_embedding
from tf_lora.rewrite.fold import Fold, FoldReport, fold
from tf_lora.rewrite.inject import Injected, inject
from tf_lora.rewrite.inspect import inspect
from tf_lora.rewrite.saved_model import RewriteError
from tf_lora.rewrite.swap import SwapReport, swap_adapter
from tf_lora.rewrite.verify import verify

__all__ = [
    "Injected",
    "Replaced",
    "replace_embedding",
    "inject",
    "Fold",
    "FoldReport",
    "RewriteError",
    "SwapReport",
    "fold",
    "inspect",
    "swap_adapter",
    "verify",
]
