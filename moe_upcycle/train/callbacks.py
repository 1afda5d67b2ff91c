"""Routing you can see: per-layer expert load, entropy and router losses in the Trainer's logs, and a
heatmap of expert load per layer at the end of training."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from .lora import base_moe_model

HEATMAP_FILE = "expert_load.png"
LOAD_FILE = "expert_load.json"


def routing_log_entries(stats: dict[str, torch.Tensor], per_expert: bool = True) -> dict[str, float]:
    """Flatten :meth:`RoutingStats.pop` output into ``moe/*`` log keys."""
    load = stats["load"]  # [L, E]
    out = {
        "moe/aux_loss": stats["aux_loss"].mean().item(),
        "moe/z_loss": stats["z_loss"].mean().item(),
        "moe/entropy": stats["entropy"].mean().item(),
        "moe/load_max": load.max().item(),
        "moe/load_min": load.min().item(),
    }
    for layer in range(load.shape[0]):
        out[f"moe/layer{layer}/load_max"] = load[layer].max().item()
        out[f"moe/layer{layer}/load_min"] = load[layer].min().item()
        out[f"moe/layer{layer}/entropy"] = stats["entropy"][layer].item()
        if per_expert:
            for expert in range(load.shape[1]):
                out[f"moe/layer{layer}/expert{expert}"] = load[layer, expert].item()
    return out


def console_view(logs: dict) -> dict:
    """``logs`` without the per-layer ``moe/layerN/...`` keys: the model-wide ``moe/*`` summary stays."""
    return {key: value for key, value in logs.items() if not key.startswith("moe/layer")}


class CompactPrinterCallback(PrinterCallback):
    """Transformers' ``PrinterCallback`` printing :func:`console_view` of the logs (reporters still get every key)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        super().on_log(args, state, control, logs=None if logs is None else console_view(logs), **kwargs)


class CompactProgressCallback(ProgressCallback):
    """Transformers' ``ProgressCallback`` writing :func:`console_view` of the logs under the progress bar."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        super().on_log(args, state, control, logs=None if logs is None else console_view(logs), **kwargs)


def compact_console_logs(trainer: Trainer) -> None:
    """Swap the Trainer's console printer for its compact twin; ``trainer_state.json`` and reporters keep every key."""
    for printer, compact in ((PrinterCallback, CompactPrinterCallback), (ProgressCallback, CompactProgressCallback)):
        if trainer.pop_callback(printer) is not None:
            trainer.add_callback(compact)


def save_heatmap(load: torch.Tensor, moe_layers: list[int], path: Path, title: str) -> None:
    """Save a [layers x experts] heatmap of token fractions as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.2 + 0.55 * load.shape[1], 1.2 + 0.45 * load.shape[0]), dpi=120)
    image = ax.imshow(load.numpy(), cmap="viridis", aspect="auto", vmin=0)
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_xticks(range(load.shape[1]))
    ax.set_yticks(range(load.shape[0]), [str(i) for i in moe_layers])
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label="fraction of tokens")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _sum_across_processes(stats, device: torch.device) -> None:
    """Under DDP, pool the routing statistics of every process (every process logs at the same steps)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    if stats.counts.device != device:
        stats.reset(device)  # this process has not routed anything yet: contribute zeros
    for name in stats.FIELDS:
        dist.all_reduce(getattr(stats, name))


class RoutingStatsCallback(TrainerCallback):
    """Adds ``moe/*`` routing statistics to every training log and saves the load heatmap at the end.

    Insert it first (``trainer.callback_handler.callbacks.insert(0, cb)``) so that the printer and
    reporters (TensorBoard, ...) that run after it see its keys.
    """

    def __init__(self, per_expert: bool = True, heatmap: bool = True):
        self.per_expert, self.heatmap = per_expert, heatmap
        self.total_counts: torch.Tensor | None = None
        self._model = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._model = base_moe_model(model)
        if self._model is not None:
            self._model.track_routing(True)

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if self._model is None or logs is None or "loss" not in logs or self._model.routing_stats is None:
            return
        _sum_across_processes(self._model.routing_stats, next(self._model.parameters()).device)
        stats = self._model.routing_stats.pop()
        if stats is None:
            return
        counts = stats["counts"]
        self.total_counts = counts if self.total_counts is None else self.total_counts + counts
        entries = routing_log_entries(stats, self.per_expert)
        logs.update(entries)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(entries)  # the Trainer appended its copy before calling on_log

    def on_train_end(self, args, state, control, **kwargs):
        if self._model is None or self._model.routing_stats is None:
            return
        _sum_across_processes(self._model.routing_stats, next(self._model.parameters()).device)
        rest = self._model.routing_stats.pop()  # steps after the last log
        if rest is not None:
            self.total_counts = rest["counts"] if self.total_counts is None else self.total_counts + rest["counts"]
        self._model.track_routing(False)
        if self.total_counts is None or not state.is_world_process_zero:
            return
        load = self.total_counts / self.total_counts.sum(dim=1, keepdim=True).clamp_min(1)
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        layers = list(self._model.config.moe_layers)
        (out / LOAD_FILE).write_text(json.dumps({"moe_layers": layers, "load": load.tolist()}, indent=1) + "\n")
        if self.heatmap:
            title = f"expert load over {state.global_step} steps (uniform = {1 / load.shape[1]:.3f})"
            save_heatmap(load, layers, out / HEATMAP_FILE, title)


class RouterBiasCallback(TrainerCallback):
    """Auxiliary-loss-free load balancing (DeepSeek-V3, arXiv 2412.19437, sec. 2.1.2) for sigmoid routers:
    after every optimizer step, each expert's selection bias moves by ``router_bias_update_rate`` towards
    balanced load. A no-op for other routers."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        moe = base_moe_model(model)
        if moe is not None:
            moe.update_router_biases()
